"""Nothing lost: checkpoints, resume, interruption by signal, and resume's refusals."""

import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch

from mixprec import checkpoint
from mixprec.config import RunConfig
from mixprec.run import main
from tests.conftest import train_keeping_checkpoint

EPOCHS = 4


def _args(data, out, *extra):
    return ["--mode", "manual", "--model", "resnet20", "--epochs", str(EPOCHS), "--batch-size", "32",
            "--device", "cpu", "--deterministic", "--data", str(data), "--out", str(out), *extra]


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "mixprec.run", *args], capture_output=True, text=True,
                          timeout=300, **kw)


def _run_dir(out: Path) -> Path:
    (run,) = (out / "runs").iterdir()
    return run


def _interrupt_after_first_epoch(args, sig) -> tuple[Path, subprocess.Popen]:
    out = Path(args[args.index("--out") + 1])
    proc = subprocess.Popen([sys.executable, "-m", "mixprec.run", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        runs = list((out / "runs").glob("*/epochs.csv")) if (out / "runs").exists() else []
        if runs:
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    proc.wait(timeout=120)
    return _run_dir(out), proc


def test_interrupted_then_resumed_run_ends_bit_identical(tiny_cifar, tmp_path):
    """Bit for bit, because every side runs the same kernels: the straight, the interrupted and the resumed run
    are all fresh processes of this interpreter with this process's environment (ATEN_CPU_CAPABILITY,
    ONEDNN_MAX_CPU_ISA, OMP_NUM_THREADS and all), hence the same instruction set and thread count, on the same
    batch shapes. Only the resume itself could make them differ."""
    data = tiny_cifar["pickles"]
    straight = _cli(*_args(data, tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr

    run, proc = _interrupt_after_first_epoch(_args(data, tmp_path / "b"), signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr.read()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["test_accuracy"] is None
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    done, part = saved["epoch"], saved["partial_epoch"]
    assert 1 <= done < EPOCHS
    assert len(pd.read_csv(run / "epochs.csv")) == done

    resumed = _cli("--resume", str(run), "--data", str(data))
    assert resumed.returncode == 0, resumed.stderr
    where = (f"in epoch {done + 1} of {EPOCHS}, after step {part['steps_done']} of {len(part['losses'])}"
             if part is not None else f"at the start of epoch {done + 1} of {EPOCHS}")  # where the signal fell
    assert f"resuming {run} from its checkpoint {where}" in resumed.stderr
    assert f"; resuming {where}" in resumed.stderr  # the trainer's line says the same

    a, b = _run_dir(tmp_path / "a"), run
    ca, cb = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (a, b))
    assert ca["epoch"] == cb["epoch"] == EPOCHS
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key
    assert all(torch.equal(x, y) for x, y in zip(ca["master"], cb["master"]))
    ea, eb = (pd.read_csv(d / "epochs.csv").drop(columns="epoch_time_s") for d in (a, b))
    pd.testing.assert_frame_equal(ea, eb)
    pd.testing.assert_frame_equal(pd.read_csv(a / "steps.csv"), pd.read_csv(b / "steps.csv"))
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sb["status"] == "completed" and sa["test_accuracy"] == sb["test_accuracy"]
    assert sa["confusion_matrix"] == sb["confusion_matrix"]
    best = torch.load(b / "best.pt", weights_only=True)
    assert best["val_acc"] == max(pd.read_csv(b / "epochs.csv")["val_acc"])


def test_sigint_exits_130_and_keeps_a_checkpoint(tiny_cifar, tmp_path):
    run, proc = _interrupt_after_first_epoch(_args(tiny_cifar["pickles"], tmp_path), signal.SIGINT)
    assert proc.returncode == 130
    err = proc.stderr.read()
    assert "Traceback" not in err and f"--resume {run}" in err
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] >= 1


def _fake_run(tmp_path, status=None, **options) -> Path:
    run = tmp_path / "runs" / "resnet20-manual-s0-x"
    run.mkdir(parents=True)
    cfg = RunConfig(mode="manual", model="resnet20", epochs=3, **options)
    (run / "config.json").write_text(json.dumps(asdict(cfg)))
    if status:
        (run / "summary.json").write_text(json.dumps({"status": status}))
    return run


@pytest.mark.parametrize("case,expect", [
    ("not a run", "not a mixprec run directory"),
    ("conflict", "--lr 0.5 conflicts with the run's own 0.1"),
    ("completed", "that run has already completed its 3 epochs; extend it with --epochs N (more than 3)"),
    ("no checkpoint", "no checkpoint.pt"),
    ("fewer epochs", "--epochs 2 is fewer than the run's own 3; --epochs only extends a run"),
    ("cosine extended", "--epochs 9 cannot extend a --schedule cosine run, whose lr anneals to 0 over its own 3 "
                        "epochs (a 9-epoch run's would not have); start a new run with --epochs 9"),
])
def test_resume_refuses_with_one_line(case, expect, tmp_path, capsys):
    extra = {"conflict": ["--lr", "0.5"], "fewer epochs": ["--epochs", "2"], "cosine extended": ["--epochs", "9"]}
    if case == "not a run":
        args = ["--resume", str(tmp_path)]
    else:
        run = _fake_run(tmp_path, "completed" if case in ("completed", "cosine extended") else None,
                        **({"schedule": "cosine"} if case == "cosine extended" else {}))
        args = ["--resume", str(run), *extra.get(case, [])]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0]


class StopAfter:
    """A stop request that turns true at its n-th check (checked before each epoch and after each step)."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def is_set(self):
        self.calls += 1
        return self.calls >= self.n


def test_a_run_stopped_mid_epoch_resumes_from_that_step(tiny_cifar):
    """Bit for bit: the full, the stopped and the resumed run train in this one process, one after the other,
    with the same kernels and thread count."""
    from mixprec.data import load_cifar10, make_splits

    splits = make_splits(load_cifar10(tiny_cifar["pickles"]))
    cfg = RunConfig(mode="manual", model="resnet20", epochs=3, batch_size=32, device="cpu", telemetry_every=2,
                    layer_stats_every=3)  # measures steps 1, 4, 7 (the stop comes right after it), 10 and 13

    run = partial(train_keeping_checkpoint, cfg, splits)
    full, end = run()
    # checks: before epoch 1, its 5 steps, before epoch 2, epoch 2's steps 1 and 2 -> stop after step 2
    cut, mid = run(stop=StopAfter(9))
    assert cut.status == "interrupted" and "epoch 2, step 2 of 5" in cut.error
    assert mid["epoch"] == 1 and mid["partial_epoch"]["steps_done"] == 2
    # what the resume's log lines say: where it goes on, not "after epoch 1"
    assert checkpoint.position(mid, cfg.epochs) == "in epoch 2 of 3, after step 2 of 5"
    assert checkpoint.position({**mid, "partial_epoch": None}, cfg.epochs) == "at the start of epoch 2 of 3"
    assert checkpoint.position(end, cfg.epochs) == "after its last epoch (3 of 3), at the test evaluation"
    resumed, end2 = run(resume=mid)
    assert resumed.status == "completed"
    for key in end["model"]:
        assert torch.equal(end["model"][key], end2["model"][key]), key
    drop = lambda rows: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]
    assert drop(full.epochs) == drop(resumed.epochs)
    pd.testing.assert_frame_equal(pd.DataFrame(full.steps), pd.DataFrame(resumed.steps))
    layers = pd.DataFrame(full.tables["layer_grads"])
    assert sorted(layers.step.unique()) == [1, 4, 7, 10, 13]
    pd.testing.assert_frame_equal(layers, pd.DataFrame(resumed.tables["layer_grads"]))
    assert full.test == resumed.test and full.train_images == resumed.train_images


@pytest.mark.parametrize("kind", ["stochastic", "kahan"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_stochastic_and_kahan_runs_stopped_mid_epoch_resume_bit_identical(tiny_cifar, tiny_models, kind, dtype):
    """--master-weights stochastic and kahan under --deterministic: stopped after epoch 2's second step and
    resumed from that checkpoint, the run ends with the same half weights, compensation buffers or rounding
    generator, optimizer state and steps.csv rows as one that ran straight through."""
    from mixprec.data import load_cifar10, make_splits

    splits = make_splits(load_cifar10(tiny_cifar["pickles"]))
    cfg = RunConfig(mode="manual", model="tiny", epochs=2, batch_size=40, device="cpu", telemetry_every=2,
                    master_weights=kind, manual_dtype=dtype, deterministic=True)

    run = partial(train_keeping_checkpoint, cfg, splits)
    full, end = run()
    # checks: before epoch 1, its 4 steps (of 40 of the 180 training images), before epoch 2, epoch 2's steps
    # 1 and 2 -> stop after step 2
    cut, mid = run(stop=StopAfter(8))
    assert cut.status == "interrupted" and mid["partial_epoch"]["steps_done"] == 2
    assert mid["master"] is not None and end["master"] is not None
    resumed, end2 = run(resume=mid)
    assert resumed.status == "completed"
    for key in end["model"]:
        assert torch.equal(end["model"][key], end2["model"][key]), key
    if kind == "kahan":
        assert all(torch.equal(a, b) for a, b in zip(end["master"]["compensation"], end2["master"]["compensation"],
                                                       strict=True))
        assert any(c.any() for c in end["master"]["compensation"])  # it carried something
    else:
        assert torch.equal(end["master"]["generator"], end2["master"]["generator"])
    assert str(end["optimizer"]) == str(end2["optimizer"])
    pd.testing.assert_frame_equal(pd.DataFrame(full.steps), pd.DataFrame(resumed.steps))
    assert pd.DataFrame(full.steps)["update_lost_nearest_frac"].notna().sum() > 0


def test_resume_with_more_epochs_extends_a_finished_run_to_what_a_longer_run_ends_with(tiny_cifar, tiny_models,
                                                                                       tmp_path, capsys):
    """--resume RUN --epochs 2 of a finished 1-epoch run (--schedule step, whose lr does not depend on the total)
    continues from its last checkpoint. Bit for bit with a straight 2-epoch run, as both train in this process
    with the same kernels."""
    args = ["--mode", "manual", "--model", "tiny", "--batch-size", "32", "--device", "cpu", "--deterministic",
            "--schedule", "step", "--data", str(tiny_cifar["pickles"])]
    assert main([*args, "--epochs", "2", "--out", str(tmp_path / "straight")]) == 0
    assert main([*args, "--epochs", "1", "--out", str(tmp_path / "extended")]) == 0
    straight, run = _run_dir(tmp_path / "straight"), _run_dir(tmp_path / "extended")
    assert json.loads((run / "summary.json").read_text())["epochs_completed"] == 1
    capsys.readouterr()

    assert main(["--resume", str(run), "--epochs", "2"]) == 0
    err = capsys.readouterr().err
    assert f"extending {run} from 1 to 2 epochs" in err and "at the start of epoch 2 of 2" in err
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == summary["epochs_completed"] == 2
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (straight, run))
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert all(torch.equal(x, y) for x, y in zip(a["master"], b["master"], strict=True))
    ea, eb = (pd.read_csv(d / "epochs.csv").drop(columns="epoch_time_s") for d in (straight, run))
    assert len(eb) == 2
    pd.testing.assert_frame_equal(ea, eb)
    pd.testing.assert_frame_equal(pd.read_csv(straight / "steps.csv"), pd.read_csv(run / "steps.csv"))
    assert summary["test_accuracy"] == json.loads((straight / "summary.json").read_text())["test_accuracy"]

    assert main(["--resume", str(run)]) == 2  # done: now a 2-epoch run, completed
    assert "already completed its 2 epochs" in capsys.readouterr().err
