import json
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pandas as pd
import pytest
import torch

from mixprec.config import RunConfig, option_name
from mixprec.fp8 import COLUMNS as FP8_COLUMNS
from mixprec.master import COLUMNS as UPDATE_COLUMNS
from mixprec.models import build_model, count_params
from mixprec.results import RunSummary, read_summary
from mixprec.run import main
from mixprec.train import warmup_steps_for

EPOCH_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s", "loss_scale",
                 "skipped_steps"]


def _only_run(out: Path) -> Path:
    runs = list((out / "runs").iterdir())
    assert len(runs) == 1
    return runs[0]


def _check_run_dir(run: Path, mode: str, classes: int = 10, epochs: int = 1) -> RunSummary:
    for name in ("config.json", "env.json", "epochs.csv", "steps.csv", "confusion_matrix.csv", "summary.json",
                 "train.log"):
        assert (run / name).exists(), name
    assert not list(run.glob(".*.tmp")), "a temporary file was left behind"
    assert list(json.loads((run / "summary.json").read_text())) == [f.name for f in fields(RunSummary)]
    s = read_summary(run)
    assert s.status == "completed" and s.mode == mode and s.epochs == epochs == s.epochs_completed
    cm = s.confusion_matrix
    assert len(cm) == classes and sum(map(sum, cm)) == s.test_images
    assert abs(sum(cm[i][i] for i in range(classes)) / s.test_images - s.test_accuracy) < 1e-6
    assert list(s.per_class_accuracy.values()) == pytest.approx([row[i] / max(sum(row), 1) for i, row in enumerate(cm)])
    epoch_rows = pd.read_csv(run / "epochs.csv")
    assert s.final_val_accuracy == pytest.approx(epoch_rows.val_acc.iloc[-1])
    assert s.train_time_s == pytest.approx(epoch_rows.epoch_time_s.sum())  # the epochs' time, and nothing else
    assert s.peak_memory_bytes >= sum(s.memory.values())  # the process's peak holds the training step's tensors
    with torch.device("meta"):
        assert s.params == count_params(build_model(s.model, num_classes=classes))
    steps_run = len(pd.read_csv(run / "steps.csv"))
    assert s.warmup_steps == warmup_steps_for(steps_run // epochs) and s.images_per_s > 0  # every run has a figure
    assert set(s.memory) == {"weights", "master_weights", "grads", "optimizer_state", "activations", "compensation",
                             "update_workspace"}
    assert (s.memory["master_weights"] > 0) == (mode == "manual") and s.memory["activations"] > 0
    if mode == "baseline":
        assert s.skipped_steps is None and s.final_loss_scale is None
    else:
        assert s.skipped_steps == epoch_rows.skipped_steps.sum()
    assert list(epoch_rows.columns) == EPOCH_COLUMNS and len(epoch_rows) == epochs
    steps = pd.read_csv(run / "steps.csv")
    assert list(steps.columns) == ["step", "epoch", "loss", "lr", "loss_scale", "skipped", "grad_max_abs",
                                   "grad_zero_frac", "grad_underflow_frac", *FP8_COLUMNS, *UPDATE_COLUMNS]
    assert steps[list(FP8_COLUMNS)].isna().all().all() == (s.fp8 is None)  # NaN unless the run trained in FP8
    assert steps["step"].tolist() == list(range(1, len(steps) + 1))
    if mode == "manual":  # telemetry measured at step 1 (and every --telemetry-every after)
        assert steps["grad_max_abs"][0] > 0 and 0 <= steps["grad_underflow_frac"][0] <= 1
    if mode != "baseline":  # amp's GradScaler and manual's scaler, in the same columns
        assert steps["loss_scale"].notna().all() and (epoch_rows["loss_scale"] > 0).all()
    config = json.loads((run / "config.json").read_text())
    assert set(config) == set(RunConfig.__dataclass_fields__)
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["device_type"] == "cpu"
    return s


@pytest.mark.parametrize("mode", ["baseline", "amp", "manual"])
def test_one_epoch_smoke_run_on_cifar10(mode, real_data, tmp_path):
    code = main(["--mode", mode, "--model", "resnet20", "--epochs", "1", "--subset", "256", "--test-subset", "256",
                 "--data", str(real_data), "--device", "cpu", "--out", str(tmp_path)])
    assert code == 0
    s = _check_run_dir(_only_run(tmp_path), mode)
    assert s.train_images == 256 and s.test_images == 256 and s.test_subset == 256
    assert s.amp_dtype == ("float16" if mode == "amp" else None)  # float16 on a CPU too, unless asked
    assert s.tf32 is False  # a CPU has no TF32
    assert s.half_compute == (None if mode == "baseline" else "emulated")
    if mode != "baseline":  # GradScaler in amp, ours in manual: the same start, no overflow in two steps
        assert s.final_loss_scale == 2.0**16


def test_modes_start_from_the_same_weights():
    from mixprec.models import build_model
    from mixprec.steps import setup_precision
    from mixprec.train import seed_everything

    def initial(mode):
        seed_everything(7)
        model = build_model("resnet20")
        p = setup_precision(RunConfig(mode=mode, model="resnet20"), model, torch.device("cpu"))
        return [t.detach().clone() for t in (p.master.params if p.master else model.parameters())]

    base = initial("baseline")
    assert all(torch.equal(a, b) for a, b in zip(base, initial("manual")))
    assert all(torch.equal(a, b) for a, b in zip(base, initial("amp")))


def test_synthetic_data_run_end_to_end(tiny_cifar, tmp_path):
    """Runs everywhere, shared data or not: manual mode through the CLI on the pickled format."""
    code = main(["--mode", "manual", "--model", "resnet20", "--epochs", "1", "--batch-size", "32",
                 "--data", str(tiny_cifar["pickles"]), "--device", "cpu", "--out", str(tmp_path)])
    assert code == 0
    s = _check_run_dir(_only_run(tmp_path), "manual")
    assert s.train_images == 180 and s.val_images == 20 and s.test_images == 40


def test_channels_last_and_macs_are_recorded(tiny_cifar, tmp_path):
    code = main(["--mode", "manual", "--model", "resnet20", "--epochs", "1", "--batch-size", "32", "--channels-last",
                 "--data", str(tiny_cifar["pickles"]), "--device", "cpu", "--out", str(tmp_path)])
    assert code == 0
    run = _only_run(tmp_path)
    s = _check_run_dir(run, "manual")
    assert s.channels_last is True and s.pretrained is False
    assert s.macs == 40_813_184  # FlopCounterMode's count for one 32x32 image (tests/test_models.py)
    config = json.loads((run / "config.json").read_text())
    assert config["channels_last"] is True and config["pretrained"] is False


def test_pretrained_without_network_stops_before_the_run_in_one_line(tiny_cifar, tmp_path, monkeypatch, capsys):
    import socket

    def no_network(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(socket, "create_connection", no_network)
    code = main(["--mode", "baseline", "--model", "resnet18", "--pretrained", "--data", str(tiny_cifar["pickles"]),
                 "--device", "cpu", "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "cannot download ImageNet weights for resnet18 (no network?)" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("epochs, batch_size, warmup", [(2, 6, 6), (1, 12, 3)])
def test_images_per_s_leaves_out_a_warm_up_scaled_to_the_run(epochs, batch_size, warmup, tiny_cifar, tmp_path):
    # 30 steps an epoch: a fifth of them, 6, are warm-up; the quick start's case, 15 steps in all: 3 (not 20,
    # which left no timed step and recorded images_per_s null)
    code = main(["--mode", "baseline", "--model", "resnet20", "--epochs", str(epochs), "--batch-size",
                 str(batch_size), "--data", str(tiny_cifar["pickles"]), "--device", "cpu", "--out", str(tmp_path)])
    assert code == 0
    s = _check_run_dir(_only_run(tmp_path), "baseline", epochs=epochs)
    assert s.warmup_steps == warmup and 0 < s.warmup_time_s < s.train_time_s
    timed_images = epochs * 180 - warmup * batch_size  # 180 training images an epoch, less the warm-up's
    assert s.images_per_s == pytest.approx(timed_images / (s.train_time_s - s.warmup_time_s))


def test_the_warm_up_is_at_most_20_steps_a_fifth_of_the_epoch_and_leaves_timed_steps():
    assert [warmup_steps_for(n) for n in (0, 1, 2, 9, 10, 15, 99, 100, 391)] == [0, 0, 1, 1, 2, 3, 19, 20, 20]
    assert all(0 < warmup_steps_for(n) < n for n in range(2, 1000))


def test_divergence_fails_the_run_with_its_reason(tiny_cifar, tmp_path):
    code = main(["--mode", "baseline", "--model", "resnet20", "--epochs", "2", "--batch-size", "16",
                 "--lr", "1e30", "--data", str(tiny_cifar["pickles"]), "--device", "cpu", "--out", str(tmp_path)])
    assert code == 1
    s = json.loads((_only_run(tmp_path) / "summary.json").read_text())
    assert s["status"] == "failed" and "training loss became" in s["error"] and "step" in s["error"]
    assert s["test_accuracy"] is None


def test_two_runs_in_the_same_second_get_their_own_directories(tmp_path):
    from mixprec.results import create_run_dir

    dirs = {create_run_dir(tmp_path, "resnet20", "manual", 0) for _ in range(3)}
    assert len(dirs) == 3


BAD = {
    "unknown mode": (["--mode", "fp8"], "invalid choice: 'fp8'"),
    "unknown model": (["--mode", "amp", "--model", "resnet9000"], "invalid choice: 'resnet9000'"),
    "mistyped model": (["--mode", "amp", "--model", "resnet81"],
                       "did you mean resnet18? (give it as --model resnet18)"),
    "zero epochs": (["--mode", "amp", "--epochs", "0"], "--epochs must be a positive integer, got 0"),
    "negative subset": (["--mode", "amp", "--subset", "-5"], "--subset must be a positive integer, got -5"),
    "non-numeric batch": (["--mode", "amp", "--batch-size", "lots"], "invalid int value: 'lots'"),
    "negative lr": (["--mode", "amp", "--lr", "-0.1"], "--lr must be a positive number, got -0.1"),
    "nan lr": (["--mode", "amp", "--lr", "nan"], "--lr must be a positive number, got nan"),
    "missing data": (["--mode", "amp", "--data", "/no/such/cifar"], "does not exist"),
    "subset too large": (["--mode", "amp", "--subset", "1000"], "larger than the 180-image training split"),
    "cuda without cuda": (["--mode", "amp", "--device", "cuda"], "--device cuda was asked for"),
    "pretrained resnet20": (["--mode", "amp", "--model", "resnet20", "--pretrained"],
                            "--pretrained: there are no ImageNet weights for resnet20"),
    "overflow on a missing rank": (["--mode", "manual", "--inject-overflow", "2", "--inject-overflow-rank", "1"],
                                   "--inject-overflow-rank 1: there are only 1 process(es), ranks 0 to 0"),
    "accumulate that does not split the batch": (["--mode", "manual", "--batch-size", "10", "--accumulate", "4"],
                                                 "does not split into --accumulate 4"),
    "label smoothing of 1": (["--mode", "amp", "--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
    "warm-up as long as the run": (["--mode", "amp", "--schedule", "cosine", "--epochs", "2", "--warmup-epochs", "2"],
                                   "--warmup-epochs must be at least 0 and less than --epochs 2"),
    "warm-up of the step schedule": (["--mode", "amp", "--warmup-epochs", "1"], "add --schedule cosine"),
    "nesterov without momentum": (["--mode", "baseline", "--nesterov", "--momentum", "0"],
                                  "--nesterov needs momentum"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_nonzero_without_traceback(case, tiny_cifar, tmp_path):
    args, expect = BAD[case]
    if case == "cuda without cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if "--data" not in args:
        args = args + ["--data", str(tiny_cifar["pickles"])]
    proc = subprocess.run([sys.executable, "-m", "mixprec.run", *args, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def help_entries(text: str) -> dict[str, str]:
    """{option: its own help} from argparse's ``--help``: an option's entry starts at two spaces' indent with its
    option strings ("-h, --help", "--lr LR"), and its help follows after two spaces or more, or on the
    deeper-indented lines below. Anything else (usage, group titles) ends an entry."""
    entries, current = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            invocation, _, first = line.strip().partition("  ")
            current = [first.strip()]
            for option in invocation.split(", "):
                entries[option.split(" ")[0]] = current
        elif current is not None and line.startswith("   "):
            current.append(line.strip())
        else:
            current = None
    return {option: " ".join(filter(None, parts)) for option, parts in entries.items()}


def test_help_entries_reads_each_option_whole():
    text = ("usage: x [-h] [--inject-overflow STEP] [--inject-overflow-rank RANK]\n\noptions:\n"
            "  -h, --help            show this help message and exit\n"
            "  --inject-overflow-rank RANK\n"
            "                        only on this rank, unlike --inject-overflow\n"
            "                        (default: None)\n"
            "  --momentum MOMENTUM   SGD momentum (default: 0.9)\n\n"
            "group:\n  --nesterov            needs --momentum > 0 (default: False)\n")
    assert help_entries(text) == {
        "-h": "show this help message and exit", "--help": "show this help message and exit",
        "--inject-overflow-rank": "only on this rank, unlike --inject-overflow (default: None)",
        "--momentum": "SGD momentum (default: 0.9)", "--nesterov": "needs --momentum > 0 (default: False)"}


def test_help_documents_every_option_and_no_other():
    proc = subprocess.run([sys.executable, "-m", "mixprec.run", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    entries = help_entries(proc.stdout)
    options = {option_name(f.name) for f in fields(RunConfig)}
    # each field is an option of its own (not a word in another option's help, nor the start of a longer option)
    for option in options:
        assert option in entries, option
        assert re.sub(r"\(default: [^)]*\)$", "", entries[option]).strip(), f"{option} has no help of its own"
    assert set(entries) - options == {"-h", "--help", "--resume"}  # and nothing but the fields, --help and --resume


def _bad_path(case, tiny_cifar, tmp_path):
    """Build the broken input for one case; returns (extra args, expected message)."""
    if case == "empty data dir":
        (tmp_path / "empty").mkdir()
        return ["--data", str(tmp_path / "empty")], "is empty"
    if case == "truncated archive":
        raw = tiny_cifar["tar"].read_bytes()
        (tmp_path / "cut.tar.gz").write_bytes(raw[: len(raw) // 3])
        return ["--data", str(tmp_path / "cut.tar.gz")], "truncated or corrupt"
    if case == "missing batch":
        folder = tmp_path / "p" / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for f in (tiny_cifar["pickles"] / "cifar-10-batches-py").iterdir():
            if f.name != "data_batch_2":
                (folder / f.name).write_bytes(f.read_bytes())
        return ["--data", str(tmp_path / "p")], "data_batch_2 is missing"
    if case == "unwritable out":
        (tmp_path / "a_file").write_text("not a directory")
        return ["--data", str(tiny_cifar["pickles"]), "--out", str(tmp_path / "a_file" / "results")], \
            "pass --out with a writable directory"
    if case == "resume of a non-run":
        return ["--resume", str(tmp_path)], "not a mixprec run directory"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["empty data dir", "truncated archive", "missing batch", "unwritable out",
                                  "resume of a non-run"])
def test_bad_paths_are_one_line_and_nonzero_without_traceback(case, tiny_cifar, tmp_path):
    extra, expect = _bad_path(case, tiny_cifar, tmp_path)
    args = ["--mode", "manual", "--out", str(tmp_path / "out")] + extra
    proc = subprocess.run([sys.executable, "-m", "mixprec.run", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], proc.stderr


def test_native_float16_autocast_on_cpu_warns_and_runs(tiny_cifar, tiny_models, tmp_path, capsys):
    code = main(["--mode", "amp", "--half-compute", "native", "--model", "tiny", "--epochs", "1", "--batch-size",
                 "16", "--subset", "32", "--test-subset", "10", "--data", str(tiny_cifar["pickles"]), "--device",
                 "cpu", "--out", str(tmp_path)])
    assert code == 0
    err = capsys.readouterr().err
    assert "warning: --half-compute native on a CPU runs PyTorch's naive FP16 kernels" in err  # slow, and says so
    assert "torch.autocast(float16), GradScaler from 65536" in err  # float16 with its scaler, as with emulated
    run = _only_run(tmp_path)
    assert "warning: --half-compute native" in (run / "train.log").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["amp_dtype"], summary["half_compute"]) == ("float16", "native")


def test_concurrent_runs_share_a_results_directory_safely(tiny_cifar, tmp_path):
    args = ["--mode", "manual", "--model", "resnet20", "--epochs", "1", "--batch-size", "32", "--device", "cpu",
            "--data", str(tiny_cifar["pickles"]), "--out", str(tmp_path)]
    procs = [subprocess.Popen([sys.executable, "-m", "mixprec.run", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 2
    for run in runs:
        assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_a_run_failed_in_epoch_two_keeps_epoch_one(tiny_cifar, tiny_models, tmp_path):
    # 2**16 halves to 1 after 16 overflows; the 17th, in epoch 2 (11 steps an epoch), would go below min_scale=1
    code = main(["--mode", "manual", "--model", "tiny", "--epochs", "2", "--batch-size", "16", "--device", "cpu",
                 "--inject-overflow", ",".join(map(str, range(1, 20))), "--data", str(tiny_cifar["pickles"]),
                 "--out", str(tmp_path)])
    assert code == 1
    run = _only_run(tmp_path)
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "failed" and "min_scale=1" in s["error"] and s["test_accuracy"] is None
    assert len(pd.read_csv(run / "epochs.csv")) == 1 and len(pd.read_csv(run / "steps.csv")) == 11


def test_compile_traces_the_model_in_every_mode_and_is_recorded(tiny_cifar, tmp_path, monkeypatch):
    """``--compile`` goes through torch.compile; Dynamo's eager backend keeps the test fast (inductor's C++
    build takes a minute a model here) while still tracing the model, emulated FP16 included."""
    compiled = []
    real_compile = torch.compile

    def eager_compile(model, **kwargs):
        compiled.append(model)
        return real_compile(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    from torch._dynamo.utils import counters

    for mode in ("baseline", "manual"):
        counters.clear()
        out = tmp_path / mode
        code = main(["--mode", mode, "--model", "resnet20", "--epochs", "1", "--batch-size", "64", "--compile",
                     "--data", str(tiny_cifar["pickles"]), "--device", "cpu", "--out", str(out)])
        assert code == 0
        run = _only_run(out)
        s = _check_run_dir(run, mode)
        assert s.compile is True and json.loads((run / "config.json").read_text())["compile"] is True
        assert counters["stats"]["unique_graphs"] >= 1  # Dynamo really traced the model
    assert len(compiled) == 2


def test_the_report_requires_summary_fields_that_the_record_has():
    from mixprec.report.runs import REQUIRED
    from mixprec.results import SUMMARY_REQUIRED

    assert set(SUMMARY_REQUIRED) <= {f.name for f in fields(RunSummary)}
    assert REQUIRED["summary.json"] is SUMMARY_REQUIRED  # derived, not restated


STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z "  # train.log's ISO 8601 UTC prefix


def _tiny_run(tiny_cifar, out, *extra, mode="manual", epochs=2):
    return main(["--mode", mode, "--model", "tiny", "--epochs", str(epochs), "--batch-size", "32", "--device", "cpu",
                 "--data", str(tiny_cifar["pickles"]), "--out", str(out), *extra])


def test_log_every_adds_a_progress_line_every_n_steps_and_train_log_is_timestamped(tiny_cifar, tiny_models, tmp_path,
                                                                                  capsys):
    assert _tiny_run(tiny_cifar, tmp_path / "plain") == 0  # off by default: no progress lines
    plain = (_only_run(tmp_path / "plain") / "train.log").read_text().splitlines()
    assert plain and all(re.match(STAMP, line) for line in plain)
    assert not [line for line in plain if re.match(STAMP + "step ", line)]
    capsys.readouterr()

    assert _tiny_run(tiny_cifar, tmp_path / "logged", "--log-every", "2") == 0  # 5 steps per epoch, 10 in all
    run = _only_run(tmp_path / "logged")
    lines = (run / "train.log").read_text().splitlines()
    assert all(re.match(STAMP, line) for line in lines)
    progress = [re.sub(STAMP, "", line) for line in lines if re.match(STAMP + "step ", line)]
    steps = pd.read_csv(run / "steps.csv")
    pattern = (r"step (\d+) \(epoch (\d)/2, (\d)/5\)  loss (\S+)  lr 0\.1  loss scale (\S+)  \d+ img/s")
    matched = [re.fullmatch(pattern, line) for line in progress]
    assert all(matched), progress
    assert [int(m[1]) for m in matched] == [2, 4, 6, 8, 10]
    assert [(int(m[2]), int(m[3])) for m in matched] == [(1, 2), (1, 4), (2, 1), (2, 3), (2, 5)]
    for m in matched:  # the mean of the epoch's last 2 steps (1 at epoch 2's first)
        step, in_epoch = int(m[1]), int(m[3])
        window = steps[(steps.step > step - min(2, in_epoch)) & (steps.step <= step)]
        assert float(m[4]) == pytest.approx(window.loss.mean(), abs=1e-4)
        assert float(m[5]) == steps.loss_scale[step - 1]
    err = capsys.readouterr().err  # the console's lines are the bare ones
    assert "[mixprec] step 2 (epoch 1/2, 2/5)  loss " in err


def test_tensorboard_writes_each_steps_and_epochs_scalars_also_across_an_extension(tiny_cifar, tiny_models, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert _tiny_run(tiny_cifar, tmp_path, "--tensorboard", epochs=1) == 0
    run = _only_run(tmp_path)
    first_test = json.loads((run / "summary.json").read_text())["test_accuracy"]
    assert main(["--resume", str(run), "--epochs", "2"]) == 0  # the second epoch's scalars follow the first's
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    steps, epochs = pd.read_csv(run / "steps.csv"), pd.read_csv(run / "epochs.csv")
    assert [s for s, _ in scalars["step/loss"]] == steps.step.tolist() == list(range(1, 11))
    for tag, column in (("step/loss", "loss"), ("step/lr", "lr"), ("step/loss_scale", "loss_scale"),
                        ("step/skipped", "skipped")):
        assert [v for _, v in scalars[tag]] == pytest.approx(steps[column].astype(float).tolist(), rel=1e-6), tag
    for tag in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert scalars[f"epoch/{tag}"] == [(5, pytest.approx(epochs[tag][0], rel=1e-6)),
                                           (10, pytest.approx(epochs[tag][1], rel=1e-6))], tag
    summary = json.loads((run / "summary.json").read_text())
    assert scalars["test/accuracy"] == [(5, pytest.approx(first_test, rel=1e-6)),  # each length's test result
                                        (10, pytest.approx(summary["test_accuracy"], rel=1e-6))]


def test_tensorboard_without_the_package_stops_before_the_run_in_one_line(tiny_cifar, tiny_models, tmp_path,
                                                                          monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    for name in [m for m in sys.modules if m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)
    assert _tiny_run(tiny_cifar, tmp_path, "--tensorboard") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tensorboard needs the tensorboard package: pip install 'mixprec[tensorboard]'" in err[0]
    assert not (tmp_path / "runs").exists()
