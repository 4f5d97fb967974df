"""Nothing lost: checkpoints, resume, interruption by signal, and resume's refusals."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import torch

from mixprec.config import RunConfig
from mixprec.run import main

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
    data = tiny_cifar["pickles"]
    straight = _cli(*_args(data, tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr

    run, proc = _interrupt_after_first_epoch(_args(data, tmp_path / "b"), signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr.read()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["test_accuracy"] is None
    done = torch.load(run / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= done < EPOCHS
    assert len(pd.read_csv(run / "epochs.csv")) == done

    resumed = _cli("--resume", str(run), "--data", str(data))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} from its checkpoint after epoch {done}" in resumed.stderr

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


def _fake_run(tmp_path, status=None) -> Path:
    run = tmp_path / "runs" / "resnet20-manual-s0-x"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(asdict(RunConfig(mode="manual", model="resnet20", epochs=3))))
    if status:
        (run / "summary.json").write_text(json.dumps({"status": status}))
    return run


@pytest.mark.parametrize("case,expect", [
    ("not a run", "not a mixprec run directory"),
    ("conflict", "--epochs 9 conflicts with the run's own 3"),
    ("completed", "already completed"),
    ("no checkpoint", "no checkpoint.pt"),
])
def test_resume_refuses_with_one_line(case, expect, tmp_path, capsys):
    if case == "not a run":
        args = ["--resume", str(tmp_path)]
    else:
        run = _fake_run(tmp_path, "completed" if case == "completed" else None)
        args = ["--resume", str(run)] + (["--epochs", "9"] if case == "conflict" else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0]
