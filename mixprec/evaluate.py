"""``python -m mixprec.evaluate RUN_DIR``: evaluate a run's weights again, in the run's own precision, writing
nothing into the run directory.

The run's ``config.json`` (read through :func:`mixprec.config.config_from_json`, which upgrades older runs, as
``--resume`` and the report do) gives the model, the mode and its precision options, and the data split
(``--subset``, ``--test-subset``). The weights are ``checkpoint.pt``'s (``--checkpoint last``: the end of the
last epoch, or where an interruption stopped the run) or ``best.pt``'s (``best``: the epoch with the best
validation accuracy). They are evaluated on the test or the validation split by :func:`mixprec.train.evaluate`
through the mode's forward pass alone (:func:`mixprec.steps.setup_inference`): the FP32 model, the FP32 model
under autocast, or manual mode's half model with FP32 BatchNorm, with the half arithmetic resolved for the
device (emulated on a CPU), as the run evaluated. On the run's device and kernels, the last checkpoint's test
accuracy is the run's own ``summary.json`` ``test_accuracy`` (``tests/test_evaluate.py`` checks it). FP8 runs
are refused: their evaluation depends on the FP8 scaling state of the moment, which ``best.pt`` does not keep.

It prints the accuracy, the mean cross-entropy loss and the accuracy of each class; ``--out FILE`` also writes
them, with the confusion matrix, as JSON. Bad input (no such run, no such checkpoint) is one line and exit code 2.

Example::

    python -m mixprec.evaluate results/runs/resnet20-manual-s0-20261123T012301Z --checkpoint best --split val
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli import OneLineParser, UsageError
from .config import HelpFormatter, add_device_option, config_from_json

PROG = "python -m mixprec.evaluate"
CHECKPOINTS = {"last": "checkpoint.pt", "best": "best.pt"}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, formatter_class=HelpFormatter,
                      description="Evaluate a run's last or best weights on the test or validation split, in the "
                      "run's own precision, and print accuracy, loss and per-class accuracy. Writes nothing into "
                      "the run directory.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, results/runs/<name>/")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="the test set, or the run's validation split (as split for the run: --subset and "
                   "--test-subset as it had them)")
    p.add_argument("--checkpoint", choices=tuple(CHECKPOINTS), default="last",
                   help="last: checkpoint.pt, the weights at the end of the last epoch (or where an interruption "
                   "stopped the run); best: best.pt, those of the epoch with the best validation accuracy")
    p.add_argument("--test-time-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="average the logits of each image and its mirror image (default: as the run did)")
    add_device_option(p)
    p.add_argument("--data", default=None, help="the CIFAR-10 data (default: the run's own --data)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the results to FILE as JSON")
    return p


def load_run(run_dir: Path, which: str):
    """The run's configuration and the checkpoint ``which`` (``last`` or ``best``), or a :class:`UsageError`."""
    import torch

    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such run directory; pass a directory under results/runs/")
    try:
        cfg = config_from_json(json.loads((run_dir / "config.json").read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"{run_dir}: not a mixprec run directory ({type(e).__name__} reading config.json); "
                         "pass a directory under results/runs/") from None
    if cfg.fp8 != "off":
        raise UsageError(f"{run_dir} trained with --fp8 {cfg.fp8}, whose evaluation depends on the FP8 scales of "
                         "the moment, which the checkpoints do not all keep; its summary.json has its test result")
    path = run_dir / CHECKPOINTS[which]
    try:
        return cfg, torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        hint = ("; best.pt is written after the first epoch, use --checkpoint last" if which == "best"
                else "; every run writes it before its first epoch, so this run never started")
        raise UsageError(f"{run_dir}: no {path.name} in it{hint}") from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say so, on one line
        raise UsageError(f"{run_dir}: {path.name} cannot be read ({type(e).__name__})") from None


def when(state: dict, epochs: int) -> str:
    """Which weights a checkpoint holds, for the output: ``"after epoch 3 of 3"``, ``"in epoch 2 of 3, after
    step 7 of 15"`` (an interruption's), ``"before the first epoch"``."""
    from .checkpoint import position

    done = state["epoch"]
    if state.get("partial_epoch") is not None:
        return position(state, epochs)  # where the interruption stopped it, as --resume says
    return f"after epoch {done} of {epochs}" if done else "before the first epoch"


def evaluate_run(run_dir: str | Path, split: str = "test", checkpoint: str = "last",
                 test_time_flip: bool | None = None, device: str = "auto", data: str | None = None) -> dict:
    """Evaluate the weights ``checkpoint`` (``last`` or ``best``) of the run in ``run_dir`` on ``split``
    (``test`` or ``val``), in the run's precision: a dict with ``accuracy``, ``loss``, ``per_class_accuracy``,
    ``confusion_matrix`` (:func:`mixprec.train.scores`) and what was evaluated how."""
    import torch

    from . import device as dev
    from .data import CifarLoader, load_cifar10, make_splits
    from .models import build_model
    from .steps import setup_inference
    from .train import EVAL_BATCH_SIZE, evaluate, scores

    run_dir = Path(run_dir)
    cfg, state = load_run(run_dir, checkpoint)
    flip = cfg.test_time_flip if test_time_flip is None else test_time_flip
    target = dev.resolve_device(device)
    dev.configure(target, cfg.deterministic, cfg.tf32)  # the run's cuDNN and TF32 settings
    splits = make_splits(load_cifar10(data if data is not None else cfg.data), cfg.subset, cfg.test_subset)
    images, labels = splits.test if split == "test" else splits.val
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build_model(cfg.model, num_classes=len(splits.classes)).to(target, memory_format=memory_format)
    forward, dtype, how = setup_inference(cfg, model, target)  # manual mode: the half model, as it trained
    model.load_state_dict(state["model"])
    loader = CifarLoader(images, labels, EVAL_BATCH_SIZE, train=False, device=target, memory_format=memory_format)
    found = scores(*evaluate(forward, model, loader, labels, flip), labels, splits.classes)
    return {"run_dir": str(run_dir), "checkpoint": CHECKPOINTS[checkpoint], "weights": when(state, cfg.epochs),
            "split": split, "images": len(labels), "test_time_flip": flip, "model": cfg.model, "mode": cfg.mode,
            "device": str(target), "dtype": dtype, "half_compute": how, **found}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        found = evaluate_run(args.run_dir, args.split, args.checkpoint, args.test_time_flip, args.device, args.data)
        if args.out is not None:
            from .results import write_json

            try:
                write_json(Path(args.out), found)
            except OSError as e:
                raise UsageError(f"cannot write --out {args.out} ({e.strerror}); pass a writable file") from None
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    precision = found["dtype"] + (f", {found['half_compute']} half compute" if found["half_compute"] else "")
    print(f"{found['model']} {found['mode']} ({precision}) on {found['device']}: {found['checkpoint']}, "
          f"{found['weights']}; {found['split']} split, {found['images']} images"
          + (", test-time flip" if found["test_time_flip"] else ""))
    print(f"accuracy {found['accuracy']:.4f}  loss {found['loss']:.4f}")
    width = max(map(len, found["per_class_accuracy"]))
    for name, accuracy in found["per_class_accuracy"].items():
        print(f"  {name:<{width}}  {accuracy:.4f}")
    if args.out is not None:
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
