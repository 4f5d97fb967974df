"""python -m mixprec.evaluate: a run's weights evaluated again, in its own precision, with nothing written into the
run directory."""

import json
from pathlib import Path

import pytest
import torch

from mixprec.evaluate import main as evaluate_main
from mixprec.run import main as run_main

pytestmark = pytest.mark.usefixtures("tiny_models")


def _tiny_run(tiny_cifar, out: Path, mode: str) -> Path:
    assert run_main(["--mode", mode, "--model", "tiny", "--epochs", "2", "--batch-size", "32", "--device", "cpu",
                     "--data", str(tiny_cifar["pickles"]), "--out", str(out)]) == 0
    (run,) = (out / "runs").iterdir()
    return run


def _files(run: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in run.rglob("*")}


@pytest.mark.parametrize("mode", ["baseline", "amp", "manual"])
def test_the_last_checkpoint_scores_what_the_run_recorded_and_the_run_dir_is_untouched(mode, tiny_cifar, tmp_path,
                                                                                     capsys):
    """Bit for bit: the run and its evaluation are in this process, with the same kernels (manual mode's half
    model with FP32 BatchNorm, amp's emulated autocast)."""
    run = _tiny_run(tiny_cifar, tmp_path / "out", mode)
    before = _files(run)
    capsys.readouterr()
    assert evaluate_main([str(run), "--device", "cpu", "--out", str(tmp_path / "eval.json")]) == 0
    summary = json.loads((run / "summary.json").read_text())
    found = json.loads((tmp_path / "eval.json").read_text())
    assert found["accuracy"] == summary["test_accuracy"] and found["loss"] == summary["test_loss"]
    assert found["per_class_accuracy"] == summary["per_class_accuracy"]
    assert found["confusion_matrix"] == summary["confusion_matrix"]
    assert found["split"] == "test" and found["images"] == summary["test_images"]
    assert found["weights"] == "after epoch 2 of 2"
    assert found["dtype"] == {"baseline": "float32", "amp": "autocast float16", "manual": "float16"}[mode]
    out = capsys.readouterr().out
    assert f"accuracy {summary['test_accuracy']:.4f}" in out and "  airplane  " in out
    assert _files(run) == before


def test_the_best_checkpoint_on_the_validation_split_scores_its_recorded_val_accuracy(tiny_cifar, tmp_path, capsys):
    run = _tiny_run(tiny_cifar, tmp_path / "out", "manual")
    best = torch.load(run / "best.pt", weights_only=True)
    assert evaluate_main([str(run), "--checkpoint", "best", "--split", "val", "--device", "cpu",
                          "--out", str(tmp_path / "eval.json")]) == 0
    found = json.loads((tmp_path / "eval.json").read_text())
    assert found["accuracy"] == best["val_acc"] and found["weights"] == f"after epoch {best['epoch']} of 2"
    assert f"best.pt, after epoch {best['epoch']} of 2; val split, 20 images" in capsys.readouterr().out


@pytest.mark.parametrize("case, expect", [
    ("no such dir", "no such run directory"),
    ("not a run", "not a mixprec run directory"),
    ("no best.pt", "no best.pt in it; best.pt is written after the first epoch, use --checkpoint last"),
])
def test_bad_input_is_one_line_and_exit_code_2(case, expect, tmp_path, capsys):
    run = tmp_path / "run"
    if case != "no such dir":
        run.mkdir()
    if case == "no best.pt":
        (run / "config.json").write_text(json.dumps({"mode": "manual", "model": "tiny"}))
    assert evaluate_main([str(run), *(["--checkpoint", "best"] if case == "no best.pt" else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0] and err[0].startswith("python -m mixprec.evaluate: error: ")
