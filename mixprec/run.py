"""``python -m mixprec.run --mode baseline|amp|manual``: train one model in one mode, write its run directory.

Writes ``config.json``, ``env.json`` and ``train.log`` first; ``epochs.csv``, ``steps.csv`` and
``checkpoint.pt`` (and ``best.pt`` when validation accuracy improves) after every epoch, with the telemetry
sources' own tables (``layer_grads.csv``); and ``confusion_matrix.csv``, ``test_predictions.csv`` and
``summary.json`` at the end. Exit codes: 0 completed; 1 failed (diverged,
or the loss scale collapsed), with the reason in the summary; 2 bad input, with a one-line error;
130/143 interrupted by SIGINT/SIGTERM, after a checkpoint (``--resume RUN_DIR`` continues; with a larger
``--epochs``, it also extends a finished run). ``--tensorboard`` adds ``tensorboard/`` (:class:`TensorBoardLog`).
"""

from __future__ import annotations

import signal
import sys
import threading
import warnings
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from . import distributed
from .cli import UsageError, handling_signals
from .config import ABLATION_OPTIONS, parse_command
from .results import RunSummary, read_json, write_json

PROG = "python -m mixprec.run"


def images_per_s(result) -> float | None:
    """Training throughput after warm-up: the first epoch's first ``result.warmup_steps`` steps (at most
    20, at most a fifth of the epoch) are left out (None when the run had no steps after them)."""
    images = result.train_images - result.warmup_images
    seconds = result.train_time_s - result.warmup_time_s
    return images / seconds if images > 0 and seconds > 0 else None


def summary(cfg, result, splits) -> RunSummary:
    """The run's :class:`~mixprec.results.RunSummary`, from its configuration, its result and its data."""
    test = result.test or {}
    return RunSummary(
        **RunSummary.copied("config", cfg), **RunSummary.copied("result", result),
        epochs_completed=len(result.epochs), train_images=len(splits.train[1]), val_images=len(splits.val[1]),
        test_images=len(splits.test[1]), images_per_s=images_per_s(result),
        skipped_steps=result.skipped_steps if cfg.mode != "baseline" else None,
        ablation={k: getattr(cfg, k) for k in ABLATION_OPTIONS},
        test_accuracy=test.get("accuracy"), test_loss=test.get("loss"),
        per_class_accuracy=test.get("per_class_accuracy"), confusion_matrix=test.get("confusion_matrix"),
        final_val_accuracy=result.epochs[-1]["val_acc"] if result.epochs else None)


def timestamp() -> str:
    """Now, as ISO 8601 in UTC to the millisecond: ``2026-11-23T01:23:01.042Z``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RunLog:
    """One line per event to stderr (through tqdm, so bars stay intact) and to ``train.log``, where each line
    starts with its UTC time (:func:`timestamp`), as timm's and Lightning's log files do; the console keeps
    the bare line."""

    def __init__(self):
        self.run_dir: Path | None = None

    def __call__(self, msg: str) -> None:
        if not distributed.is_main():  # rank 0 speaks for all ranks
            return
        tqdm.write(f"[mixprec] {msg}", file=sys.stderr)
        if self.run_dir is not None:
            with open(self.run_dir / "train.log", "a") as f:
                f.write(f"{timestamp()} {msg}\n")


def summary_writer():
    """``torch.utils.tensorboard.SummaryWriter``, or a :class:`UsageError` saying how to install the
    ``tensorboard`` package it needs (an optional dependency of mixprec)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: pip install 'mixprec[tensorboard]' "
                         "(or pip install tensorboard), or drop --tensorboard") from None
    return SummaryWriter


class TensorBoardLog:
    """``--tensorboard``: the run's scalars in ``RUN_DIR/tensorboard/``, written from what ``on_epoch`` hands
    over, so that training never waits for them (nothing is read off the device for them) and the loop knows
    nothing of TensorBoard. Every scalar is indexed by the optimizer step, as Lightning's are: ``step/loss``,
    ``step/lr`` and, with a loss scaler, ``step/loss_scale`` and ``step/skipped`` at each step; ``epoch/...``
    (``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``lr``, ``epoch``, and ``skipped_steps`` with a
    scaler) at each epoch's last step; ``test/accuracy`` and ``test/loss`` at the end. A resumed run's
    ``checkpoint`` says what was written already; TensorBoard hides anything written after it (``purge_step``).

    Example (what ``python -m mixprec.run --tensorboard`` does)::

        tensorboard = TensorBoardLog(run_dir)
        result = train(cfg, splits, on_epoch=lambda result, state, improved: tensorboard.write(result))
        tensorboard.close(result)
    """

    def __init__(self, run_dir: Path, checkpoint: dict | None = None):
        done = checkpoint["progress"] if checkpoint is not None else {"steps": [], "epochs": []}
        self.steps_done, self.epochs_done = len(done["steps"]), len(done["epochs"])
        self.writer = summary_writer()(run_dir / "tensorboard",
                                       purge_step=self.steps_done + 1 if checkpoint is not None else None)

    def write(self, result) -> None:
        """The steps and epochs ``result`` has finished since the last call."""
        add = self.writer.add_scalar
        for row in result.steps[self.steps_done:]:
            add("step/loss", row["loss"], row["step"])
            add("step/lr", row["lr"], row["step"])
            if row["loss_scale"] is not None:
                add("step/loss_scale", row["loss_scale"], row["step"])
                add("step/skipped", float(row["skipped"]), row["step"])
        step = result.steps[-1]["step"] if result.steps else 0
        for row in result.epochs[self.epochs_done:]:
            for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch"):
                add(f"epoch/{key}", row[key], step)
            if row["loss_scale"] is not None:
                add("epoch/skipped_steps", row["skipped_steps"], step)
        self.steps_done, self.epochs_done = len(result.steps), len(result.epochs)
        self.writer.flush()

    def close(self, result) -> None:
        """The last epochs' scalars and, if the run completed, its test result; then the files are closed."""
        self.write(result)
        if result.test:
            step = result.steps[-1]["step"] if result.steps else 0
            self.writer.add_scalar("test/accuracy", result.test["accuracy"], step)
            self.writer.add_scalar("test/loss", result.test["loss"], step)
        self.writer.close()


class StopRequest(threading.Event):
    """Set by SIGINT/SIGTERM; the trainer stops after the current step. A second signal stops at once."""

    signum: int | None = None

    def __call__(self, signum, frame):
        if self.is_set():
            raise KeyboardInterrupt
        self.signum = signum
        self.set()


def main(argv: list[str] | None = None) -> int:
    log = RunLog()
    stop = StopRequest()
    with handling_signals(stop), warnings.catch_warnings():
        warnings.showwarning = lambda message, *args, **kwargs: log(f"warning: {message}")
        try:
            return _run(argv, log, stop)
        except UsageError as e:
            if distributed.is_main():
                print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        except BaseException as e:
            if log.run_dir is not None:  # a crash still leaves a summary that says what happened
                write_json(log.run_dir / "summary.json", {"status": "failed", "error": f"{type(e).__name__}: {e}"})
            raise


def _run(argv: list[str] | None, log: RunLog, stop: StopRequest) -> int:
    cfg, resume_dir = parse_command(argv)
    if cfg.tensorboard:
        summary_writer()  # a missing package is said now, before any data is read
    from .train import setup_device  # after parsing, so that --help and a mistyped option answer in ~3 s, not ~8

    try:
        # fail on a missing GPU, or a batch the processes cannot share, before decoding any data; under torchrun,
        # join the other ranks
        device = setup_device(cfg)
        return _train_and_write(cfg, resume_dir, device, log, stop)
    finally:
        distributed.shutdown()


def _train_and_write(cfg, resume_dir: Path | None, device, log: RunLog, stop: StopRequest) -> int:
    import pandas as pd

    from . import checkpoint as ckpt
    from .data import load_cifar10, make_splits
    from .results import create_run_dir, environment, write_csv, write_torch
    from .train import train

    if cfg.pretrained and resume_dir is None:
        from .models import build_model

        build_model(cfg.model, pretrained=True)  # download the weights now: no network fails before the run starts
    checkpoint = None
    if resume_dir is not None:
        checkpoint = ckpt.load(resume_dir, cfg.epochs)
    splits = make_splits(load_cifar10(cfg.data), cfg.subset, cfg.test_subset)
    if not distributed.is_main():  # rank 0 writes the run directory; the others only train
        return _exit_code(train(cfg, splits, log=log, resume=checkpoint, stop=stop, device=device), stop)
    if resume_dir is None:
        run_dir = log.run_dir = create_run_dir(cfg.out, cfg.model, cfg.mode, cfg.seed)
        write_json(run_dir / "config.json", asdict(cfg))
        write_json(run_dir / "env.json", environment(device))
        log(f"run directory {run_dir}")
    else:
        run_dir = log.run_dir = resume_dir
        saved = read_json(run_dir / "config.json")
        if saved["epochs"] != cfg.epochs:  # --epochs extends the run (config.check_extension): it is now that long
            write_json(run_dir / "config.json", {**saved, "epochs": cfg.epochs})
            log(f"extending {run_dir} from {saved['epochs']} to {cfg.epochs} epochs")
        log(f"resuming {run_dir} from its checkpoint {ckpt.position(checkpoint, cfg.epochs)}")
    tensorboard = TensorBoardLog(run_dir, checkpoint) if cfg.tensorboard else None

    def save_progress(result, state: dict, improved: bool):
        if result.epochs:
            write_csv(run_dir / "epochs.csv", pd.DataFrame(result.epochs))
            write_csv(run_dir / "steps.csv", pd.DataFrame(result.steps))
            for table, rows in result.tables.items():  # telemetry sources' own tables (layer_grads.csv)
                write_csv(run_dir / f"{table}.csv", pd.DataFrame(rows))
        write_torch(run_dir / "checkpoint.pt", state)
        if improved:
            write_torch(run_dir / "best.pt", ckpt.best(state, result.epochs[-1]["val_acc"]))
        if tensorboard is not None:
            tensorboard.write(result)

    result = train(cfg, splits, log=log, on_epoch=save_progress, resume=checkpoint, stop=stop, device=device)
    if tensorboard is not None:
        tensorboard.close(result)
    if result.test:
        cm = pd.DataFrame(result.test["confusion_matrix"], index=splits.classes, columns=splits.classes)
        write_csv(run_dir / "confusion_matrix.csv", cm.rename_axis("true\\predicted").reset_index())
        # every test image's label and prediction, in the test split's order: which images a mode changes
        write_csv(run_dir / "test_predictions.csv",
                  pd.DataFrame({"label": splits.test[1].numpy(), "prediction": result.test["predictions"]}))
    write_json(run_dir / "summary.json", summary(cfg, result, splits).to_json())
    if result.status == "interrupted":
        log(f"{result.error}: python -m mixprec.run --resume {run_dir}")
    elif result.status != "completed":
        log(f"failed: {result.error}")
    else:
        log(f"test accuracy {result.test['accuracy']:.4f}, training {result.train_time_s:.1f}s, "
            f"summary in {run_dir / 'summary.json'}")
    return _exit_code(result, stop)


def _exit_code(result, stop: StopRequest) -> int:
    if result.status == "interrupted":
        return 128 + (stop.signum or signal.SIGINT)
    return 0 if result.status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
