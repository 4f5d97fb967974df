"""experiments/gpu_study.py: the budget rule, the stopping of a stage at the budget, the archive's contents and
a second attempt's skipping; experiments/bench_gpu.py: its rows and the memory they measure (on the CPU)."""

import json
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import bench_gpu  # noqa: E402
import gpu_study  # noqa: E402
from gpu_study import REHEARSAL, Stage, Study, fits, plan, train_estimate  # noqa: E402


def test_the_budget_rule_starts_only_what_ends_in_time_with_the_reserve_left():
    assert fits(elapsed=100, estimate=300, reserve=80, budget=480)  # ends exactly at the budget
    assert not fits(elapsed=100.5, estimate=300, reserve=80, budget=480)
    assert not fits(elapsed=0, estimate=None, reserve=0, budget=480)  # never measured: not started
    assert not fits(elapsed=0, estimate=float("nan"), reserve=0, budget=480)


def test_a_runs_estimate_grows_with_epochs_flips_and_earlier_overruns():
    sizes = gpu_study.GPU
    one = train_estimate(0.128, 128, sizes, epochs=1, flip=False)
    assert one == pytest.approx(1.15 * 45_000 * 1e-3 + 5_000 * 1e-3 / 3 + 10_000 * 1e-3 / 3 + sizes.run_overhead)
    assert train_estimate(0.128, 128, sizes, epochs=10, flip=False) - sizes.run_overhead == pytest.approx(
        10 * (one - sizes.run_overhead - 10_000 * 1e-3 / 3) + 10_000 * 1e-3 / 3)
    assert train_estimate(0.128, 128, sizes, epochs=1, flip=True) > one
    assert train_estimate(0.128, 128, sizes, epochs=1, flip=False, overrun=1.5) == pytest.approx(1.5 * one)
    assert train_estimate(None, 128, sizes, epochs=1, flip=False) is None


def test_the_plan_puts_tests_first_then_speed_then_resnet18_then_the_rest():
    stages = plan(gpu_study.GPU, "data.tar.gz", Path("/r"))
    names = [s.name for s in stages]
    assert names[:3] == ["data", "cuda-tests", "half-agreement"]
    assert names[3:7] == [f"bench {m}" for m in gpu_study.BENCH_MODELS]
    assert names[7:11] == [*(f"train resnet18 {mode} seed 0" for mode in ("baseline", "amp", "manual")),
                           "compile resnet18"]
    runs = [s for s in stages if s.kind == "train"]
    assert all("--no-tf32" in s.argv and "--device" in s.argv for s in runs)  # one setting for the report to compare
    assert {s.model for s in runs} == {"resnet18", "resnet34", "resnet50", "efficientnet_b0"}


def _members(archive: Path) -> set[str]:
    with tarfile.open(archive) as tar:
        return set(tar.getnames())


def test_a_study_skips_what_does_not_fit_archives_what_ran_and_a_second_attempt_skips_it(tiny_cifar, tmp_path):
    sizes = replace(REHEARSAL, budget_s=60, reserve=10,
                    estimates={"data": 30, "cuda-tests": 1000, "half-agreement": 15, "bench": 1000, "compile": 1000})
    results, out = tmp_path / "results", tmp_path / "out"
    stages = {s.name: s for s in plan(sizes, str(tiny_cifar["tar"]), results)}
    chosen = [stages[n] for n in ("data", "cuda-tests", "half-agreement", "train resnet18 baseline seed 0")]
    (results / "bench").mkdir(parents=True)
    (results / "bench" / "left-over.pt").write_bytes(b"checkpoint")  # checkpoints never travel back

    study = Study(sizes, str(tiny_cifar["tar"]), results, out, sys.executable, start=time.monotonic())
    study.run(chosen)
    archive = study.finish()
    state = json.loads((results / "gpu-study.json").read_text())["stages"]
    assert state["data"]["status"] == "completed"
    assert state["cuda-tests"]["status"] == "skipped (budget)" and "past the budget" in state["cuda-tests"]["reason"]
    assert state["half-agreement"]["status"] == "completed"  # a later, cheaper stage still starts
    assert state["train resnet18 baseline seed 0"]["reason"] == "no step time measured for it in stage 2"
    assert not study.failed
    logs = f"logs/{study.stamp}"
    assert {"gpu-study.json", "bench/half_agreement.md", f"{logs}/gpu-study.log", f"{logs}/data.log",
            f"{logs}/half-agreement.log"} <= _members(archive)
    assert not any(name.endswith(".pt") for name in _members(archive))
    assert "| conv 3x3 |" in (results / "bench" / "half_agreement.md").read_text()

    time.sleep(1)  # a new attempt's log folder is named by the second it starts
    again = Study(sizes, str(tiny_cifar["tar"]), results, out, sys.executable, start=time.monotonic())
    again.run(chosen[:3])
    log = (again.logs / "gpu-study.log").read_text()
    assert "data: completed before" in log and "half-agreement: completed before" in log
    assert not (again.logs / "data.log").exists()


def test_a_stage_that_outruns_the_budget_is_stopped_and_the_archive_still_written(tmp_path):
    sizes = replace(REHEARSAL, budget_s=3, reserve=0, estimates={"data": 1})
    study = Study(sizes, "unused", tmp_path / "results", tmp_path / "out", sys.executable, start=time.monotonic())
    study.run([Stage("sleeper", "data", ["-c", "import time; time.sleep(60)"])])
    assert json.loads(study.state_file.read_text())["stages"]["sleeper"]["status"] == "stopped at the budget"
    assert "logs/" + study.stamp + "/sleeper.log" in _members(study.finish())


def test_bench_rows_measure_the_half_models_memory(tmp_path):
    csv = tmp_path / "bench" / "resnet20.csv"
    assert bench_gpu.main(["--model", "resnet20", "--device", "cpu", "--batch-size", "4", "--warmup", "1",
                           "--steps-per-round", "1", "--max-rounds", "1", "--out", str(csv)]) == 0
    rows = pd.read_csv(csv).set_index("variant")
    assert list(rows.index) == ["fp32", "tf32", "amp", "manual"] and rows["error"].isna().all()
    assert (rows["images_per_s"] > 0).all() and not rows["tf32"].any()  # no TF32 on a CPU
    fp32, amp, manual = rows.loc["fp32"], rows.loc["amp"], rows.loc["manual"]
    assert manual["memory_master_weights"] == fp32["memory_grads"]  # FP32 copies of every parameter
    assert manual["memory_weights"] < 0.55 * fp32["memory_weights"]  # FP16 but for BatchNorm
    for half in (amp, manual):  # FP16 saved for backward: half the bytes (0.50 at batch 128; at batch 4 the
        assert half["memory_activations"] < 0.6 * fp32["memory_activations"]  # FP32 BatchNorm statistics show)
    gpu_study.bench_tables(tmp_path)
    table = (tmp_path / "bench" / "speed_memory.md").read_text()
    assert table.count("| resnet20 ") == 4
    assert "- resnet20: manual / amp images/s" in table and "(target >= 0.9)" in table


def test_a_runs_estimate_comes_from_the_bench_step_and_earlier_runs_lower_it_at_most_to_three_quarters(tmp_path):
    results = tmp_path / "results"
    (results / "bench").mkdir(parents=True)
    pd.DataFrame([dict(model="resnet18", variant=v, batch_size=128, median_step_s=s, error=None)
                  for v, s in (("fp32", 0.05), ("amp", 0.02), ("manual", 0.022))]).to_csv(
        results / "bench" / "resnet18.csv", index=False)
    sizes = gpu_study.GPU
    study = Study(sizes, "unused", results, tmp_path / "out", sys.executable)
    run = {s.mode: s for s in plan(sizes, "unused", results) if s.name.startswith("train resnet18 ")
           and s.name.endswith("seed 0")}
    epochs = int(gpu_study.RECIPE["--epochs"])
    assert study.estimate(run["amp"]) == pytest.approx(train_estimate(0.02, 128, sizes, epochs, flip=True))
    study.overruns = [0.1]  # the first run took a tenth of its estimate
    assert study.estimate(run["manual"]) == pytest.approx(train_estimate(0.022, 128, sizes, epochs, True, 0.75))
    study.overruns = [0.1, 1.3]
    assert study.estimate(run["baseline"]) == pytest.approx(train_estimate(0.05, 128, sizes, epochs, True, 1.3))
    resnet50 = next(s for s in plan(sizes, "unused", results) if s.kind == "train" and s.model == "resnet50")
    assert study.estimate(resnet50) is None  # never benchmarked: not started
