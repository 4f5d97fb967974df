import signal
import subprocess
import sys

import pytest
import torch

from mixprec.results import read_json, write_json
from mixprec.study import Stop, main, plan


def _study(*argv: str) -> int:
    try:
        return main(list(argv))
    except SystemExit as e:  # argparse's own one-line errors
        return e.code


def test_plan_runs_every_combination_seeds_slowest_with_shared_options_passed_on():
    args, combos = plan(["--models", "resnet20", "resnet18", "--modes", "baseline", "manual", "--seeds", "0", "1",
                         "--lr", "0.05", "0.1", "--epochs", "3", "--subset", "500", "--out", "somewhere"])
    assert len(combos) == 2 * 2 * 2 * 2
    assert [c.label for c in combos[:4]] == [
        "resnet20 baseline seed 0 lr=0.05 momentum=0.9 weight_decay=0.0005",
        "resnet20 manual seed 0 lr=0.05 momentum=0.9 weight_decay=0.0005",
        "resnet20 baseline seed 0 lr=0.1 momentum=0.9 weight_decay=0.0005",
        "resnet20 manual seed 0 lr=0.1 momentum=0.9 weight_decay=0.0005"]
    assert all("seed 0" in c.label for c in combos[:8]) and all("seed 1" in c.label for c in combos[8:])
    argv = combos[-1].argv
    assert argv[:6] == ["--mode", "manual", "--model", "resnet18", "--seed", "1"]
    assert argv[argv.index("--epochs") + 1] == "3" and argv[argv.index("--subset") + 1] == "500"
    assert argv[argv.index("--out") + 1] == "somewhere"
    _, single = plan(["--models", "resnet20", "--modes", "amp"])
    assert [c.label for c in single] == ["resnet20 amp seed 0"]  # no grid: no grid suffix
    _, ablation = plan(["--models", "resnet20", "--modes", "manual", "--loss-scale", "none",
                        "--master-weights", "none"])
    assert [c.label for c in ablation] == ["resnet20 manual seed 0 loss_scale=none master_weights=none"]
    _, fp8 = plan(["--models", "resnet20", "--modes", "manual", "--fp8", "current",
                   "--inject-overflow", "3,5"])
    assert [c.label for c in fp8] == ["resnet20 manual seed 0 inject_overflow=3,5 fp8=current"]  # a log file each
    _, own_lr = plan(["--lr=0.1", "--models", "resnet20", "--modes", "amp"])  # the study's own --lr, not run's
    assert [c.argv[c.argv.index("--lr") + 1] for c in own_lr] == ["0.1"] and "--lr=0.1" not in own_lr[0].argv


@pytest.mark.parametrize("argv, message", [
    (["--mode", "amp"], "--mode is set per combination by the study"),
    (["--seeds", "0", "0"], "--seeds lists a value twice"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--models", "resnet20", "--modes", "baseline", "--loss-scale", "none"], "an ablation of manual mode"),
    (["--models", "nope"], "invalid choice: 'nope'"),
    (["--models", "resnet20", "resnet81"], "invalid choice: 'resnet81'; did you mean resnet18? (give it as --models "
                                           "resnet18)"),
    pytest.param(["--device", "cuda"], "--device cuda was asked for but",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
])
def test_bad_study_input_is_one_line_before_anything_runs(argv, message, tmp_path, capsys):
    code = _study(*argv, "--out", str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_study_skips_completed_resumes_interrupted_and_records_failures(tiny_cifar, tmp_path, capsys):
    out = tmp_path / "study"
    common = ["--models", "resnet20", "--modes", "baseline", "--epochs", "1", "--batch-size", "64",
              "--data", str(tiny_cifar["pickles"]), "--device", "cpu", "--out", str(out), "--no-report"]
    assert _study(*common, "--seeds", "0", "1") == 0
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 2 and [read_json(r / "summary.json")["seed"] for r in runs] == [0, 1]
    assert (out / "study-logs" / "resnet20_baseline_seed_0.log").exists()

    # seed 1 was interrupted after its epoch (its checkpoint is there): the study continues it in place
    seed1 = next(r for r in runs if read_json(r / "summary.json")["seed"] == 1)
    summary = read_json(seed1 / "summary.json")
    write_json(seed1 / "summary.json", {**summary, "status": "interrupted", "test_accuracy": None})
    capsys.readouterr()
    assert _study(*common, "--seeds", "0", "1") == 0
    err = capsys.readouterr().err
    assert "resnet20 baseline seed 0: completed before" in err and "skipped" in err
    assert sorted((out / "runs").iterdir()) == runs  # resumed in place, nothing new
    assert read_json(seed1 / "summary.json")["status"] == "completed"
    # exactly: both evaluations ran in a fresh process of this interpreter with this environment (same kernels)
    assert read_json(seed1 / "summary.json")["test_accuracy"] == summary["test_accuracy"]
    assert "--resume" in (out / "study-logs" / "resnet20_baseline_seed_1.log").read_text()
    study = read_json(out / "study.json")
    assert [c["status"] for c in study["combinations"]] == ["skipped", "completed"]

    # seed 1 killed outright (no summary; its epoch's checkpoint is there): continued in place too, not begun anew
    (seed1 / "summary.json").unlink()
    assert _study(*common, "--seeds", "1") == 0
    assert sorted((out / "runs").iterdir()) == runs
    assert read_json(seed1 / "summary.json")["test_accuracy"] == summary["test_accuracy"]
    # killed before its first checkpoint: nothing to continue from, so a new run
    (seed1 / "summary.json").unlink()
    (seed1 / "checkpoint.pt").unlink()
    assert _study(*common, "--seeds", "1") == 0
    assert len(list((out / "runs").iterdir())) == 3

    # a combination that fails (here: more images asked for than the data has) is recorded; the study goes on
    code = _study(*common, "--seeds", "2", "0", "--subset", "100000")
    err = capsys.readouterr().err
    assert code == 1 and "resnet20 baseline seed 2: failed (exit 2)" in err and "--subset" in err
    study = read_json(out / "study.json")
    assert [c["status"] for c in study["combinations"]] == ["failed", "failed"]
    assert all("--subset 100000" in c["error"] for c in study["combinations"])



@pytest.mark.parametrize("old, argv", [(False, ["--master-weights", "none"]), (True, [])])
def test_a_run_made_with_the_old_master_weights_flag_counts_as_done(tmp_path, old, argv):
    """Runs made before --master-weights say master_weights false (--no-master-weights) or true in config.json:
    the study finds them as the runs of --master-weights none and of the default fp32."""
    from dataclasses import asdict

    from mixprec.config import RunConfig
    from mixprec.study import find_run

    combo, = plan(["--models", "resnet20", "--modes", "manual", "--out", str(tmp_path), *argv])[1]
    run = tmp_path / "runs" / "resnet20-manual-s0-old"
    run.mkdir(parents=True)
    write_json(run / "config.json", {**asdict(RunConfig(mode="manual", model="resnet20", out=str(tmp_path))),
                                     "master_weights": old})
    write_json(run / "summary.json", {"status": "completed"})
    assert find_run(str(tmp_path), combo.argv) == (run, "completed")
    other, = plan(["--models", "resnet20", "--modes", "manual", "--out", str(tmp_path), "--master-weights", "kahan"])[1]
    assert find_run(str(tmp_path), other.argv) is None

def test_options_that_do_not_change_training_do_not_make_a_completed_run_new(tmp_path):
    """Rerunning a study with --log-every or --tensorboard added, or --data elsewhere, finds the runs it made;
    an option that changes the training (--epochs) does not."""
    from dataclasses import asdict

    from mixprec.config import RunConfig
    from mixprec.study import find_run

    run = tmp_path / "runs" / "resnet20-manual-s0-done"
    run.mkdir(parents=True)
    write_json(run / "config.json", asdict(RunConfig(mode="manual", model="resnet20", out=str(tmp_path))))
    write_json(run / "summary.json", {"status": "completed"})
    base = ["--models", "resnet20", "--modes", "manual", "--out", str(tmp_path)]
    for extra in ([], ["--log-every", "10"], ["--tensorboard"], ["--data", "elsewhere"]):
        combo, = plan([*base, *extra])[1]
        assert find_run(str(tmp_path), combo.argv) == (run, "completed"), extra
    longer, = plan([*base, "--epochs", "3"])[1]
    assert find_run(str(tmp_path), longer.argv) is None


CHILD = """
import signal, sys
def note(signum, frame):
    print("got", signum, flush=True)
signal.signal(signal.SIGTERM, note)
signal.signal(signal.SIGINT, note)
print("ready", flush=True)
sys.stdin.read()  # runs on, whatever signals come, until the test closes its stdin
"""


def test_a_stop_signal_reaches_the_run_in_progress_once():
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    sent = []
    pass_on = child.send_signal
    child.send_signal = lambda signum: (sent.append(signum), pass_on(signum))  # what Stop passes on, in order
    try:
        assert child.stdout.readline().strip() == "ready"
        stop = Stop()
        stop.child = child
        stop(signal.SIGTERM, None)
        assert child.stdout.readline().split() == ["got", str(int(signal.SIGTERM))]  # the run got it
        assert child.poll() is None  # the run checkpoints and goes on to its exit; here it just goes on
        stop(signal.SIGINT, None)  # a second Ctrl-C while the run is still running...
        assert child.poll() is None and sent == [signal.SIGTERM]  # ...is not passed on: the run stops once
        assert stop.signum == signal.SIGINT  # the study itself knows it was asked to stop
    finally:
        child.stdin.close()
        rest = child.stdout.read()
        code = child.wait(timeout=30)
    assert code == 0 and rest == ""  # the child ran to its end, and no other signal reached it


def test_study_ends_with_one_line_per_group_and_still_writes_the_report(tmp_path, capsys):
    from tests.test_report import make_run

    out = tmp_path / "study"
    for seed, acc in enumerate((0.80, 0.84)):  # completed runs of the study's own configurations: all skipped
        make_run(out, f"base{seed}", seed=seed, acc=acc, out=str(out))
        make_run(out, f"amp{seed}", mode="amp", amp_dtype="bfloat16", seed=seed, acc=acc + 0.02, out=str(out))
    code = _study("--models", "resnet20", "--modes", "baseline", "amp", "--seeds", "0", "1", "--epochs", "2",
                  "--device", "cpu", "--out", str(out))
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert printed[0].split() == ["model", "mode", "n", "test", "accuracy", "(%)", "vs", "baseline", "(pp)"]
    assert [line.split() for line in printed[1:3]] == [["resnet20", "baseline", "2", "82.00", "-"],
                                                       ["resnet20", "amp", "(bfloat16)", "2", "84.00", "+2.00"]]
    assert printed[3:] == ["", f"report written to {out / 'report' / 'report.md'}"]  # not the report's tables
    assert (out / "report" / "report.md").exists() and (out / "report" / "comparison.csv").exists()
