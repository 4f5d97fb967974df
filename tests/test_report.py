"""``python -m mixprec.report``: hand-made run directories with known numbers, broken ones, and one real tiny study."""

import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

from mixprec.config import RunConfig, loss_scaler_kind
from mixprec.report import (
    comparison_markdown,
    comparison_table,
    fp8_figure,
    grid_markdown,
    grid_table,
    group_runs,
    load_results,
    loss_scale_figure,
    lost_updates_figure,
    main,
    make_report,
    time_to_accuracy_figure,
)
from mixprec.report.figures import accuracy_diff_figure, confusion_figure, memory_figure
from mixprec.report.tables import paired_t
from mixprec.results import write_csv, write_json
from mixprec.run import summary
from mixprec.train import RunResult

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MIB = 2**20
ERROR = "python -m mixprec.report: error:"


def make_run(root: Path, name: str, *, mode="baseline", seed=0, acc=0.80, val_acc=None, time_s=10.0, peak_mib=100.0,
             torch_version="2.5.1", status="completed", amp_dtype=None, loss_scales=None, skipped=(), cpu_capability="AVX2",
             **options):
    """A run directory as mixprec.run writes it, with known numbers: 100 test images, 10 per class, of
    which ``acc * 100`` are right (the first classes get the extra ones; the wrong ones go to the next class).
    Its summary.json is mixprec.run's own :class:`~mixprec.results.RunSummary` of a made-up result, so that it
    cannot drift from what a run records."""
    run = root / "runs" / name
    run.mkdir(parents=True)
    cfg = RunConfig(mode=mode, seed=seed, device="cpu", **{"model": "resnet20", "epochs": 2, **options})
    write_json(run / "config.json", asdict(cfg))
    write_json(run / "env.json", {"torch": torch_version, "cuda": None, "device_type": "cpu", "device_name": "Test CPU",
                                  "cpu": "Test CPU", "cpu_capability": cpu_capability, "git_commit": "0123456789abcdef",
                                  "git_dirty": False})
    splits = SimpleNamespace(train=(None, range(1000)), val=(None, range(100)), test=(None, range(100)))
    scaler = loss_scaler_kind(mode, amp_dtype, cfg.loss_scale)  # as steps.setup_precision records it
    result = RunResult(status=status, error=None if status == "completed" else f"{status} at epoch 1, step 3",
                       device="cpu", amp_dtype=amp_dtype, half_compute="emulated" if mode == "manual" else None,
                       params=1000, loss_scaler=scaler)
    if status != "completed":
        write_json(run / "summary.json", summary(cfg, result, splits).to_json())
        return run
    right = round(acc * 100)
    cm = [[0] * 10 for _ in range(10)]
    for i in range(10):
        cm[i][i] = right // 10 + (i < right % 10)
        cm[i][(i + 1) % 10] = 10 - cm[i][i]
    scales = loss_scales or [None] * 4
    result.epochs = [
        {"epoch": 1, "train_loss": 2.0, "train_acc": 0.3, "val_loss": 1.8, "val_acc": 0.4, "lr": cfg.lr,
         "epoch_time_s": time_s / 2, "loss_scale": scales[1], "skipped_steps": 0},
        {"epoch": 2, "train_loss": 1.5, "train_acc": 0.5, "val_loss": 1.6,
         "val_acc": acc if val_acc is None else val_acc, "lr": cfg.lr, "epoch_time_s": time_s / 2,
         "loss_scale": scales[3], "skipped_steps": len(skipped)}]
    result.steps = [{"step": s, "epoch": (s + 1) // 2, "loss": loss, "lr": cfg.lr, "loss_scale": scale,
                     "skipped": s in skipped, "grad_max_abs": 0.1, "grad_zero_frac": 0.0, "grad_underflow_frac": 0.0}
                    for s, loss, scale in zip((1, 2, 3, 4), (2.1, 1.9, 1.6, 1.4), scales)]
    result.train_time_s, result.train_images = time_s, 1000  # 1000 / time_s images per second: no warm-up steps
    result.skipped_steps, result.final_loss_scale = len(skipped), scales[-1]
    result.peak_memory_bytes = int(peak_mib * MIB)
    result.memory = {"weights": MIB, "master_weights": 2 * MIB if mode == "manual" else 0, "grads": MIB,
                     "optimizer_state": MIB, "activations": 8 * MIB}
    result.test = {"accuracy": acc, "loss": 1.0, "confusion_matrix": cm,
                   "per_class_accuracy": {c: cm[i][i] / 10 for i, c in enumerate(CLASSES)}}
    write_csv(run / "epochs.csv", pd.DataFrame(result.epochs))  # as mixprec.run writes them
    write_csv(run / "steps.csv", pd.DataFrame(result.steps))
    write_json(run / "summary.json", summary(cfg, result, splits).to_json())
    return run


def md_rows(text: str) -> list[dict]:
    """The first markdown table in ``text`` as one dict per row."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip()[1:-1].split("|")] for line in lines]
    return [dict(zip(split[0], row)) for row in split[2:]]


def report(root: Path, capsys) -> tuple[Path, str, str]:
    out = root / "report"
    assert main([str(root)]) == 0
    captured = capsys.readouterr()
    return out, captured.out, captured.err


def test_comparison_has_exact_means_stds_ratios_welch_p_and_its_interval(tmp_path, capsys):
    for seed, (acc, t, peak) in enumerate([(0.80, 10.0, 100.0), (0.82, 12.0, 110.0), (0.84, 14.0, 120.0)]):
        make_run(tmp_path, f"base{seed}", seed=seed, acc=acc, time_s=t, peak_mib=peak)
    for seed, (acc, t, peak) in enumerate([(0.85, 5.0, 50.0), (0.87, 7.0, 60.0)]):
        make_run(tmp_path, f"amp{seed}", mode="amp", amp_dtype="bfloat16", seed=seed, acc=acc, time_s=t,
                 peak_mib=peak)
    out, stdout, _ = report(tmp_path, capsys)

    table = pd.read_csv(out / "comparison.csv")
    assert table["mode"].tolist() == ["baseline", "amp (bfloat16)"]
    base, amp = table.iloc[0], table.iloc[1]
    assert (base["n"], amp["n"]) == (3, 2) and base["seeds"] == "0,1,2"
    assert base["test_accuracy_mean"] == pytest.approx(0.82, abs=1e-12)
    assert base["test_accuracy_std"] == pytest.approx(0.02, abs=1e-12)  # ddof=1
    assert amp["test_accuracy_mean"] == pytest.approx(0.86, abs=1e-12)
    assert amp["test_accuracy_std"] == pytest.approx(0.01 * math.sqrt(2), abs=1e-12)
    assert (base["train_time_s_mean"], base["train_time_s_std"]) == pytest.approx((12.0, 2.0))
    assert (amp["train_time_s_mean"], amp["train_time_s_std"]) == pytest.approx((6.0, math.sqrt(2)))
    assert (base["peak_memory_mib_mean"], base["peak_memory_mib_std"]) == pytest.approx((110.0, 10.0))
    assert amp["images_per_s_mean"] == pytest.approx((200 + 1000 / 7) / 2)
    assert base["speedup_vs_baseline"] == 1.0 and base["memory_ratio_vs_baseline"] == 1.0
    assert math.isnan(base["accuracy_diff_pp"]) and math.isnan(base["welch_p"])
    # time and memory pair the seeds both modes ran (0 and 1): (10 + 12) / (5 + 7) and (50 + 60) / (100 + 110)
    assert amp["speedup_vs_baseline"] == pytest.approx(22 / 12)
    assert amp["memory_ratio_vs_baseline"] == pytest.approx(110 / 210)
    assert amp["accuracy_diff_pp"] == pytest.approx(4.0)
    # Welch by hand: t^2 = 0.04^2 / (0.0002/2 + 0.0004/3) = 48/7, Welch-Satterthwaite df = 49/17
    p = 2 * stats.t.sf(math.sqrt(48 / 7), 49 / 17)
    assert amp["welch_p"] == pytest.approx(p, rel=1e-9) and p == pytest.approx(0.0824407, rel=1e-6)
    # its 95% interval: 4 pp -/+ t(0.975, df) x the standard error sqrt(0.0002/2 + 0.0004/3) = sqrt(7/30000)
    half_width = 100 * stats.t.ppf(0.975, 49 / 17) * math.sqrt(7 / 30000)
    assert (amp["accuracy_diff_ci95_low_pp"], amp["accuracy_diff_ci95_high_pp"]) == pytest.approx(
        (4.0 - half_width, 4.0 + half_width), rel=1e-9)
    assert math.isnan(base["accuracy_diff_ci95_low_pp"])

    md = (out / "comparison.md").read_text()
    rows = md_rows(md)
    assert rows[0]["test accuracy (%)"] == "82.00 ± 2.00" and rows[1]["test accuracy (%)"] == "86.00 ± 1.41"
    assert rows[0]["speedup vs baseline"] == "1.00" and rows[0]["memory vs baseline"] == "1.00"
    assert rows[0]["accuracy vs baseline (pp)"] == "" and rows[0]["Welch p"] == ""
    assert (rows[1]["speedup vs baseline"], rows[1]["memory vs baseline"]) == ("1.83", "0.52")
    assert rows[1]["ratios measured on"] == "Test CPU (AVX2) (seeds: 2)"
    assert (rows[1]["accuracy vs baseline (pp)"], rows[1]["Welch p"]) == ("+4.00", "0.0824")
    assert rows[1]["Welch 95% CI (pp)"] == f"[{4.0 - half_width:+.2f}, {4.0 + half_width:+.2f}]"
    assert rows[0]["Welch 95% CI (pp)"] == ""
    assert rows[0]["peak memory (MiB)"] == "110.0 ± 10.0" and rows[1]["skipped steps"] == "0"
    assert "n = 1" not in md and "peak resident memory" in md
    assert "environment" not in rows[0] and "lr" not in rows[0]  # one environment, no grid
    assert md.split("\n\n")[0] in stdout
    assert not (out / "grid.md").exists()


def test_comparison_pairs_seeds_both_modes_ran_with_the_paired_t_interval_and_p_value(tmp_path, capsys):
    for seed, acc in enumerate((0.80, 0.82, 0.84, 0.90)):  # seed 3 has no manual run: it is not paired
        make_run(tmp_path, f"base{seed}", seed=seed, acc=acc)
    for seed, acc in enumerate((0.81, 0.85, 0.86)):  # 1, 3 and 2 pp above the baseline's run of the same seed
        make_run(tmp_path, f"manual{seed}", mode="manual", seed=seed, acc=acc)
    out, _, _ = report(tmp_path, capsys)

    base, manual = pd.read_csv(out / "comparison.csv").set_index("mode").loc[["baseline", "manual"]].to_dict("records")
    assert (manual["paired_seeds"], manual["paired_n"]) == ("0,1,2", 3)
    # by hand: differences 1, 3, 2 pp have mean 2 and sd 1, so t = 2 / (1 / sqrt 3) with 2 degrees of freedom
    assert manual["paired_diff_pp"] == pytest.approx(2.0, abs=1e-9)
    p = 2 * stats.t.sf(2 * math.sqrt(3), 2)
    assert manual["paired_p"] == pytest.approx(p, rel=1e-6) and p == pytest.approx(0.0741799, rel=1e-5)
    half_width = stats.t.ppf(0.975, 2) / math.sqrt(3)
    assert (manual["paired_diff_ci95_low_pp"], manual["paired_diff_ci95_high_pp"]) == pytest.approx(
        (2.0 - half_width, 2.0 + half_width), rel=1e-6)
    test = stats.ttest_rel([0.81, 0.85, 0.86], [0.80, 0.82, 0.84])  # and what scipy says
    assert manual["paired_p"] == pytest.approx(test.pvalue, rel=1e-9)
    assert manual["paired_diff_ci95_low_pp"] == pytest.approx(100 * test.confidence_interval(0.95).low, rel=1e-9)
    # Welch's columns stay, over all seeds: 84 - 84 = 0 pp, unpaired
    assert manual["accuracy_diff_pp"] == pytest.approx(0.0, abs=1e-9)
    assert manual["welch_p"] == pytest.approx(stats.ttest_ind([0.81, 0.85, 0.86], [0.80, 0.82, 0.84, 0.90],
                                                              equal_var=False).pvalue, rel=1e-9)
    assert math.isnan(base["paired_diff_pp"]) and math.isnan(base["paired_n"]) and math.isnan(base["paired_p"])

    md = (out / "comparison.md").read_text()
    rows = md_rows(md)
    assert (rows[1]["paired n"], rows[1]["paired diff (pp)"], rows[1]["paired p"]) == ("3", "+2.00", "0.0742")
    assert rows[1]["paired 95% CI (pp)"] == f"[{2.0 - half_width:+.2f}, {2.0 + half_width:+.2f}]" == "[-0.48, +4.48]"
    assert rows[0]["paired n"] == rows[0]["paired 95% CI (pp)"] == ""
    assert "from the paired t-test" in md and "Welch's unpaired t-test" in md
    assert ("resnet20 / manual: paired difference over seeds 0, 1, 2 only, the seeds that both it and its baseline "
            "ran (it has 3 run(s), its baseline 4).") in md
    assert md.split("\n\n")[1] in (out / "report.md").read_text()  # the notes say which test each interval is from


def test_holm_adjusts_a_family_of_p_values_and_leaves_non_tests_blank():
    from mixprec.report.tables import holm

    # by hand: sorted 0.01, 0.02, 0.03, 0.5 times 4, 3, 2, 1 -> 0.04, 0.06, 0.06 (kept monotone), 0.5
    assert holm([0.03, math.nan, 0.01, 0.5, 0.02]) == pytest.approx([0.06, math.nan, 0.04, 0.5, 0.06], nan_ok=True)
    assert holm([0.4, 0.9]).tolist() == [0.8, 0.9] and holm([0.7, 0.8]).tolist() == [1.0, 1.0]  # capped at 1
    assert holm([0.2]).tolist() == [0.2] and holm([]).size == 0


def test_report_adjusts_each_models_paired_p_values_together_with_holm(tmp_path, capsys):
    for seed, acc in enumerate((0.80, 0.82, 0.84)):
        make_run(tmp_path, f"base{seed}", seed=seed, acc=acc)
    for seed, acc in enumerate((0.81, 0.85, 0.86)):  # +1, +3, +2 pp: paired p 0.0742 (the test above)
        make_run(tmp_path, f"manual{seed}", mode="manual", seed=seed, acc=acc)
    for seed, acc in enumerate((0.70, 0.73, 0.74)):  # -10, -9, -10 pp: a far smaller p
        make_run(tmp_path, f"amp{seed}", mode="amp", seed=seed, acc=acc)
    out, _, _ = report(tmp_path, capsys)

    table = pd.read_csv(out / "comparison.csv").set_index("mode")
    p_manual, p_amp = table.loc["manual", "paired_p"], table.loc["amp", "paired_p"]
    assert p_amp < p_manual
    assert table.loc["amp", "paired_p_holm"] == pytest.approx(2 * p_amp, rel=1e-9)  # smallest of 2: times 2
    assert table.loc["manual", "paired_p_holm"] == pytest.approx(p_manual, rel=1e-9)  # largest: times 1
    assert math.isnan(table.loc["baseline", "paired_p_holm"])  # a baseline is not a test
    md = (out / "comparison.md").read_text()
    assert md_rows(md)[[r["mode"] for r in md_rows(md)].index("manual")]["paired p, Holm"] == "0.0742"
    assert "adjusted by Holm's method" in md
    assert "(p 0.074; Holm-adjusted 0.074)" in (out / "report.md").read_text()


def test_accuracy_diff_figure_draws_each_difference_with_its_interval_and_cuts_the_two_seed_ones(tmp_path):
    make_run(tmp_path, "base-only", acc=0.80)
    assert accuracy_diff_figure(group_runs(load_results(tmp_path)[0])) is None  # nothing to compare with
    for seed, acc in ((1, 0.82), (2, 0.84)):
        make_run(tmp_path, f"base{seed}", seed=seed, acc=acc)
    for seed, acc in enumerate((0.81, 0.85, 0.86)):  # +1, +3, +2 pp: paired +2 [-0.48, +4.48]
        make_run(tmp_path, f"manual{seed}", mode="manual", seed=seed, acc=acc)
    for seed, acc in ((0, 0.90), (1, 0.72)):  # +10 and -10 pp: two seeds, an interval of about +-127 pp
        make_run(tmp_path, f"none{seed}", mode="manual", seed=seed, acc=acc, loss_scale="none")
    make_run(tmp_path, "amp0", mode="amp", acc=0.79)  # one seed: a point, no interval
    fig = accuracy_diff_figure(group_runs(load_results(tmp_path)[0]))
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["amp (n = 1)", "manual (n = 3)", "manual (loss_scale=none) (n = 2)"]
    points = [line for line in ax.lines if line.get_marker() == "o"]
    # amp: one seed against the mean of FP32's three (82%); manual: paired; none: paired over seeds 0 and 1
    assert [p.get_xdata()[0] for p in points] == pytest.approx([-3.0, 2.0, 0.0], abs=1e-9)
    assert [p.get_ydata()[0] for p in points] == [0, 1, 2]
    assert points[0].get_markerfacecolor() == "white" and points[1].get_markerfacecolor() != "white"
    half = stats.t.ppf(0.975, 2) / math.sqrt(3)
    assert ax.get_xlim() == pytest.approx((-1.15 * (2 + half), 1.15 * (2 + half)))  # the 3-seed rows set the span
    assert sorted(line.get_marker() for line in ax.lines if line.get_marker() in "<>") == ["<", ">"]  # cut: arrows
    texts = [t.get_text() for t in ax.texts]
    assert texts[0] == "-3.00" and texts[1] == f"+2.00 [{2 - half:+.2f}, {2 + half:+.2f}]"
    assert texts[2].startswith("+0.00 [-127.") or texts[2].startswith("-0.00 [-127.")
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["paired by seed (t, n - 1 df)",
                                                                  "one seed: no interval"]


def test_fewer_than_two_shared_seeds_leave_the_paired_columns_blank_and_say_so(tmp_path, capsys):
    for seed, acc in ((0, 0.80), (1, 0.82)):
        make_run(tmp_path, f"base{seed}", seed=seed, acc=acc)
    for seed, acc in ((1, 0.85), (2, 0.87)):  # seed 1 alone is shared
        make_run(tmp_path, f"manual{seed}", mode="manual", seed=seed, acc=acc)
    out, _, _ = report(tmp_path, capsys)

    manual = pd.read_csv(out / "comparison.csv", dtype={"paired_seeds": str}).set_index("mode").loc["manual"]
    assert (manual["paired_seeds"], manual["paired_n"]) == ("1", 1)
    assert all(math.isnan(manual[c]) for c in ("paired_diff_pp", "paired_diff_ci95_low_pp",
                                                "paired_diff_ci95_high_pp", "paired_p"))
    assert not math.isnan(manual["welch_p"])  # Welch's test needs no pairs
    md = (out / "comparison.md").read_text()
    row = md_rows(md)[1]
    assert row["paired n"] == "1" and row["paired diff (pp)"] == row["paired 95% CI (pp)"] == row["paired p"] == ""
    assert "resnet20 / manual: 1 seed(s) shared with its baseline (1): no paired difference." in md


def test_per_class_table_gives_the_mean_over_seeds_with_its_t_interval(tmp_path, capsys):
    # make_run gives the first (right % 10) classes 9 of 10 right and the others 8: accuracy 0.80 -> every class
    # 0.8; 0.82 -> airplane, automobile 0.9; 0.84 -> airplane to cat 0.9
    for seed, acc in enumerate((0.80, 0.82, 0.84)):
        make_run(tmp_path, f"base{seed}", seed=seed, acc=acc)
    make_run(tmp_path, "manual0", mode="manual", acc=0.81)
    out, _, _ = report(tmp_path, capsys)

    table = pd.read_csv(out / "per_class_accuracy.csv").set_index("class")
    base = "resnet20 / baseline"
    assert list(table.columns) == [base, f"{base} ci95_low", f"{base} ci95_high", "resnet20 / manual",
                                   "resnet20 / manual ci95_low", "resnet20 / manual ci95_high"]
    t = stats.t.ppf(0.975, 2)
    for cls, values in (("airplane", [0.8, 0.9, 0.9]), ("bird", [0.8, 0.8, 0.9]), ("deer", [0.8] * 3),
                        ("all", [0.80, 0.82, 0.84])):
        mean, half = float(np.mean(values)), t * float(np.std(values, ddof=1)) / math.sqrt(3)
        assert table.loc[cls, [base, f"{base} ci95_low", f"{base} ci95_high"]].tolist() == pytest.approx(
            [mean, mean - half, mean + half], abs=1e-12), cls
    assert table.loc["airplane", "resnet20 / manual"] == pytest.approx(0.9)  # one seed: no interval
    assert table[["resnet20 / manual ci95_low", "resnet20 / manual ci95_high"]].isna().all().all()

    md = (out / "per_class_accuracy.md").read_text()
    rows = {r["class"]: r for r in md_rows(md)}
    half = 100 * t * 0.02 / math.sqrt(3)
    assert rows["all"][base] == f"82.00 [{82 - half:.2f}, {82 + half:.2f}]" == "82.00 [77.03, 86.97]"
    assert rows["deer"][base] == "80.00 [80.00, 80.00]" and rows["airplane"]["resnet20 / manual"] == "90.00"
    assert "t distribution over the group's n seeds" in md and "paired columns" in md
    assert md.split("\n\n")[1].strip() in (out / "report.md").read_text()


def test_one_seed_gives_no_std_no_p_value_and_says_so(tmp_path, capsys):
    make_run(tmp_path, "b0", seed=0, acc=0.80)
    make_run(tmp_path, "b1", seed=1, acc=0.82)
    make_run(tmp_path, "m0", mode="manual", seed=0, acc=0.78, loss_scales=[1.0] * 4, loss_scale="none")
    make_run(tmp_path, "r18-b0", model="resnet18", acc=0.70)
    make_run(tmp_path, "r18-a0", model="resnet18", mode="amp", amp_dtype="bfloat16", seed=0, acc=0.72)
    make_run(tmp_path, "r18-a1", model="resnet18", mode="amp", amp_dtype="bfloat16", seed=1, acc=0.74)
    out, _, _ = report(tmp_path, capsys)

    table = pd.read_csv(out / "comparison.csv").set_index(["model", "mode"])
    manual = table.loc[("resnet20", "manual (loss_scale=none)")]
    assert manual["n"] == 1 and math.isnan(manual["test_accuracy_std"]) and math.isnan(manual["welch_p"])
    assert manual["accuracy_diff_pp"] == pytest.approx(-3.0)  # 78 - mean(80, 82)
    amp = table.loc[("resnet18", "amp (bfloat16)")]
    assert amp["test_accuracy_std"] == pytest.approx(0.01 * math.sqrt(2)) and math.isnan(amp["welch_p"])
    rows = {(r["model"], r["mode"]): r for r in md_rows((out / "comparison.md").read_text())}
    assert rows[("resnet20", "manual (loss_scale=none)")]["test accuracy (%)"] == "78.00"
    assert rows[("resnet20", "manual (loss_scale=none)")]["Welch p"] == ""
    text = (out / "report.md").read_text()
    assert ("n = 1: no uncertainty can be given for resnet20 / manual (loss_scale=none): one seed gives no "
            "standard deviation, and no p-value against its baseline.") in text
    assert "n = 1: no uncertainty can be given for resnet18 / baseline" in text
    assert ("n = 1: no uncertainty can be given for the difference between resnet18 / amp (bfloat16) and its "
            "baseline") in text
    assert "no uncertainty can be given for resnet20 / baseline" not in text  # it has two seeds


def test_environments_are_separate_rows_never_averaged(tmp_path, capsys):
    for seed, acc in enumerate((0.80, 0.82)):
        make_run(tmp_path, f"old{seed}", seed=seed, acc=acc, time_s=10.0, torch_version="2.5.1")
    for seed, acc in enumerate((0.90, 0.92)):
        make_run(tmp_path, f"new{seed}", seed=seed, acc=acc, time_s=20.0, torch_version="2.6.0")
    make_run(tmp_path, "new-amp", mode="amp", amp_dtype="bfloat16", acc=0.91, time_s=5.0, torch_version="2.6.0")
    out, _, _ = report(tmp_path, capsys)

    table = pd.read_csv(out / "comparison.csv")
    assert table["environment"].tolist() == ["CPU / torch 2.5.1", "CPU / torch 2.6.0", "CPU / torch 2.6.0"]
    assert table["n"].tolist() == [2, 2, 1]
    assert table["test_accuracy_mean"].tolist() == pytest.approx([0.81, 0.91, 0.91])
    assert table["speedup_vs_baseline"].iloc[2] == pytest.approx(4.0)  # against its own environment's baseline
    rows = md_rows((out / "comparison.md").read_text())
    assert [r["environment"] for r in rows] == table["environment"].tolist()
    text = (out / "report.md").read_text()
    assert "| 2.5.1" in text and "| 2.6.0" in text  # both environments are listed
    assert not (out / "loss_scale.png").exists()  # baseline and bfloat16 amp have no loss scale
    assert "No loss-scale figure: no run had a loss scale" in text


def test_cpu_models_pool_for_accuracy_but_ratios_pair_seeds_on_one_machine(tmp_path, capsys):
    make_run(tmp_path, "base0", seed=0, acc=0.80, time_s=10.0, peak_mib=100.0, cpu_capability="AVX2")
    make_run(tmp_path, "base1", seed=1, acc=0.82, time_s=20.0, peak_mib=200.0, cpu_capability="AVX512")
    make_run(tmp_path, "manual0", mode="manual", seed=0, acc=0.84, time_s=8.0, peak_mib=60.0, cpu_capability="AVX512")
    make_run(tmp_path, "manual1", mode="manual", seed=1, acc=0.86, time_s=10.0, peak_mib=50.0, cpu_capability="AVX512")
    out, _, _ = report(tmp_path, capsys)

    table = pd.read_csv(out / "comparison.csv").set_index("mode")
    assert "environment" not in table  # one environment: CPU / torch 2.5.1, both CPU models in it
    assert table["n"].tolist() == [2, 2]
    assert table.loc["manual", "accuracy_diff_pp"] == pytest.approx(4.0)  # pooled over both machines
    # only seed 1 ran in both modes on one machine (AVX512): 20 s / 10 s, 50 MiB / 200 MiB
    assert table.loc["manual", "speedup_vs_baseline"] == pytest.approx(2.0)
    assert table.loc["manual", "memory_ratio_vs_baseline"] == pytest.approx(0.25)
    assert table.loc["manual", "ratios_measured_on"] == "Test CPU (AVX512) (seeds: 1)"
    assert table.loc["baseline", "ratios_measured_on"] == "Test CPU (AVX2) (seeds: 1); Test CPU (AVX512) (seeds: 1)"
    text = (out / "comparison.md").read_text()
    assert "resnet20 / manual: time and memory ratios from 1 of its 2 seeds" in text


def test_grid_marks_the_best_per_model_by_validation_not_test_accuracy(tmp_path, capsys):
    # test accuracy points the other way every time
    make_run(tmp_path, "a", lr=0.1, seed=0, val_acc=0.70, acc=0.90)
    make_run(tmp_path, "b", lr=0.1, seed=1, val_acc=0.72, acc=0.90)
    make_run(tmp_path, "c", lr=0.05, val_acc=0.75, acc=0.60)
    make_run(tmp_path, "d", model="resnet18", lr=0.1, val_acc=0.66, acc=0.50)
    make_run(tmp_path, "e", model="resnet18", lr=0.05, val_acc=0.61, acc=0.95)
    out, stdout, _ = report(tmp_path, capsys)

    grid = pd.read_csv(out / "grid.csv")
    assert list(grid.columns) == ["mode", "lr", "momentum", "weight_decay", "model", "n", "val_accuracy_mean", "best"]
    cells = {(r.model, r.lr): (r.n, r.val_accuracy_mean, r.best) for r in grid.itertuples()}
    assert cells[("resnet20", 0.1)] == (2, pytest.approx(0.71), False)
    assert cells[("resnet20", 0.05)] == (1, pytest.approx(0.75), True)
    assert cells[("resnet18", 0.1)] == (1, pytest.approx(0.66), True)
    assert cells[("resnet18", 0.05)] == (1, pytest.approx(0.61), False)
    md = (out / "grid.md").read_text()
    rows = {r["lr"]: r for r in md_rows(md)}
    assert rows["0.05"]["resnet20"] == "**75.00**" and rows["0.1"]["resnet20"] == "71.00"
    assert rows["0.1"]["resnet18"] == "**66.00**" and rows["0.05"]["resnet18"] == "61.00"
    assert "never by test accuracy" in md and md.split("\n\n")[0] in (out / "report.md").read_text()
    assert md.split("\n\n")[0] in stdout
    assert "lr" in pd.read_csv(out / "comparison.csv").columns  # the varying option is a column


def test_grid_keeps_every_cell_when_another_option_is_unset_in_some_runs(tmp_path):
    for i, (lr, clip) in enumerate([(0.1, None), (0.1, 1.0), (0.05, None), (0.05, 1.0)]):
        make_run(tmp_path, f"r{i}", lr=lr, clip_grad_norm=clip, val_acc=0.5 + i / 100)
    groups = group_runs(load_results(tmp_path)[0])
    rows = md_rows(grid_markdown(grid_table(groups)))
    assert [(r["clip_grad_norm"], r["lr"], r["resnet20"]) for r in rows] == [
        ("1", "0.05", "**53.00**"), ("1", "0.1", "51.00"), ("", "0.05", "**52.00**"), ("", "0.1", "50.00")]


def test_a_group_title_says_what_an_option_left_unset_means(tmp_path):
    make_run(tmp_path, "full", subset=None)
    make_run(tmp_path, "part", subset=500)
    make_run(tmp_path, "clip", subset=500, clip_grad_norm=1.0)
    titles = [g.title for g in group_runs(load_results(tmp_path)[0])]
    assert titles == ["resnet20 / baseline, subset=500, clip_grad_norm=1",
                      "resnet20 / baseline, subset=500, clip_grad_norm=none",
                      "resnet20 / baseline, subset=all, clip_grad_norm=none"], titles


def test_an_fp8_option_is_shown_only_for_fp8_runs(tmp_path):
    make_run(tmp_path, "fp32")
    make_run(tmp_path, "fp16", mode="manual")
    make_run(tmp_path, "fp8-delayed", mode="manual", fp8="delayed")
    make_run(tmp_path, "fp8-delayed-32", mode="manual", fp8="delayed", fp8_amax_history=32)
    make_run(tmp_path, "fp8-current", mode="manual", fp8="current")
    groups = group_runs(load_results(tmp_path)[0])
    rows = md_rows(comparison_markdown(comparison_table(groups), groups))
    assert [(r["mode"], r["fp8_amax_history"]) for r in rows] == [
        ("baseline", ""), ("manual", ""), ("manual (fp8=current)", "16"), ("manual (fp8=delayed)", "16"),
        ("manual (fp8=delayed)", "32")]


def test_a_run_from_before_the_fp8_option_is_grouped_as_its_recipe(tmp_path):
    """Runs made before --fp8 wrote manual_dtype float8 and fp8_scaling; the report reads them as --fp8 runs."""
    make_run(tmp_path, "new", mode="manual", fp8="current", seed=0)
    old = make_run(tmp_path, "old", mode="manual", seed=1)
    config = json.loads((old / "config.json").read_text())
    del config["fp8"]
    write_json(old / "config.json", {**config, "manual_dtype": "float8", "fp8_scaling": "current"})
    groups = group_runs(load_results(tmp_path)[0])
    assert [(g.short, g.n) for g in groups] == [("manual (fp8=current)", 2)]


def test_the_loss_scaler_is_read_from_the_summary_or_implied_for_older_runs(tmp_path):
    recorded = make_run(tmp_path, "recorded", mode="manual", loss_scale="none")
    for name, options in (("amp", dict(mode="amp", amp_dtype="float16")),
                          ("bf16", dict(mode="amp", amp_dtype="bfloat16")),
                          ("static", dict(mode="manual", loss_scale="1024"))):
        older = make_run(tmp_path, name, **options)
        summary = json.loads((older / "summary.json").read_text())
        del summary["loss_scaler"]  # written before summary.json recorded it
        write_json(older / "summary.json", summary)
    summary = json.loads((recorded / "summary.json").read_text())
    write_json(recorded / "summary.json", {**summary, "loss_scaler": "none"})
    runs = {r.path.name: r for r in load_results(tmp_path)[0]}
    assert {name: r.summary["loss_scaler"] for name, r in runs.items()} == {
        "recorded": "none", "amp": "GradScaler", "bf16": None, "static": "static"}


def test_broken_and_unfinished_runs_are_named_and_not_counted(tmp_path, capsys):
    make_run(tmp_path, "good0", seed=0, acc=0.80)
    make_run(tmp_path, "good1", seed=1, acc=0.82)
    (make_run(tmp_path, "bad-json", seed=2, acc=0.10) / "summary.json").write_text('{"status": "compl')
    (make_run(tmp_path, "no-epochs", seed=3, acc=0.10) / "epochs.csv").unlink()
    no_acc = make_run(tmp_path, "no-test-accuracy", seed=4, acc=0.10)
    summary = json.loads((no_acc / "summary.json").read_text())
    (no_acc / "summary.json").write_text(json.dumps({**summary, "test_accuracy": None}))
    (make_run(tmp_path, "still-running", seed=5, acc=0.10) / "summary.json").unlink()
    make_run(tmp_path, "stopped", seed=6, status="interrupted")
    make_run(tmp_path, "diverged", seed=7, status="failed")
    out, _, stderr = report(tmp_path, capsys)

    table = pd.read_csv(out / "comparison.csv")
    assert table["n"].tolist() == [2] and table["test_accuracy_mean"].iloc[0] == pytest.approx(0.81)
    reasons = {"bad-json": "summary.json is not valid JSON", "no-epochs": "no epochs.csv",
               "no-test-accuracy": "has no test_accuracy", "still-running": "no summary.json",
               "stopped": "interrupted: interrupted at epoch 1, step 3", "diverged": "failed: failed at epoch 1"}
    text = (out / "report.md").read_text()
    assert "2 completed run(s) counted" in text and "6 run directories not counted" in text
    for name, reason in reasons.items():
        line = [line for line in stderr.splitlines() if f"runs/{name}:" in line]
        assert len(line) == 1 and reason in line[0], (name, stderr)
        assert f"- `runs/{name}`: " in text and reason in text
    assert "Traceback" not in stderr


def _usage_case(case: str, tmp_path: Path) -> Path:
    if case == "missing":
        return tmp_path / "nowhere"
    if case == "a file":
        (tmp_path / "results.txt").write_text("not a directory")
        return tmp_path / "results.txt"
    if case == "only failed":
        make_run(tmp_path, "f0", status="failed")
        make_run(tmp_path, "f1", status="interrupted", seed=1)
    return tmp_path  # "empty": nothing in it


@pytest.mark.parametrize("case, expect", [("missing", "does not exist"), ("a file", "is not a directory"),
                                          ("empty", "holds no run directories"),
                                          ("only failed", "holds no completed runs (2 not counted")])
def test_nothing_to_report_is_one_line_and_exit_2(case, expect, tmp_path, capsys):
    root = _usage_case(case, tmp_path)
    assert main([str(root)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(ERROR)]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert expect in errors[0] and "python -m mixprec.run" in errors[0] and "Traceback" not in err
    assert not (tmp_path / "report").exists()


def test_cli_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mixprec.report", str(tmp_path / "nowhere")], check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(ERROR)


def test_loss_scale_figure_overlays_the_scalers_per_seed_marks_skips_and_is_absent_without_a_scaler(tmp_path):
    scaled, unscaled = tmp_path / "fp16", tmp_path / "bf16"
    make_run(scaled, "base")
    make_run(scaled, "amp", mode="amp", amp_dtype="float16", loss_scales=[65536.0, 65536.0, 32768.0, 32768.0],
             skipped=(3,))
    make_run(scaled, "manual", mode="manual", loss_scales=[65536.0] * 4)
    make_run(scaled, "manual1", mode="manual", seed=1, loss_scales=[65536.0, 32768.0, 32768.0, 32768.0],
             skipped=(2,))
    make_run(unscaled, "base")
    make_run(unscaled, "amp", mode="amp", amp_dtype="bfloat16")

    groups = group_runs(load_results(scaled)[0])
    assert [g.label for g in groups] == ["baseline", "amp (float16)", "manual"]
    fig = loss_scale_figure(groups)
    seed0, seed1 = [ax for ax in fig.axes if ax.get_visible() and ax.lines]
    assert seed0.get_yscale() == "log" and seed0.get_title() == "resnet20, seed 0"
    scalers = [line for line in seed0.lines if line.get_marker() != "x"]
    assert [line.get_label() for line in scalers] == ["amp (float16) (torch.amp.GradScaler)",
                                                      "manual (DynamicLossScaler)"]
    assert scalers[0].get_ydata().tolist() == [65536.0, 65536.0, 32768.0, 32768.0]
    crosses = [line for line in seed0.lines if line.get_marker() == "x"]
    assert len(crosses) == 1 and crosses[0].get_xdata().tolist() == [3]
    assert crosses[0].get_ydata().tolist() == [32768.0]
    assert seed1.get_title() == "resnet20, seed 1" and [line.get_xdata().tolist() for line in seed1.lines
                                                        if line.get_marker() == "x"] == [[2]]
    rows = md_rows(comparison_markdown(comparison_table(groups), groups))
    assert rows[1]["final loss scale"] == "32768" and rows[1]["skipped steps"] == "1"
    assert rows[2]["skipped steps"] == "0.5" and rows[2]["final loss scale"] == "32768, 65536"
    assert loss_scale_figure(group_runs(load_results(unscaled)[0])) is None  # bfloat16 amp has no scaler
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [  # one legend, below the panels
        "amp (float16) (torch.amp.GradScaler)", "skipped step", "manual (DynamicLossScaler)"]


def test_skipped_is_read_once_as_booleans_and_the_table_and_the_figure_agree(tmp_path):
    from mixprec.report.tables import telemetry_table

    run = make_run(tmp_path, "manual", mode="manual", loss_scales=[4.0, 2.0, 2.0, 2.0])
    steps = pd.read_csv(run / "steps.csv")
    steps["skipped"] = ["0", "1", "", "False"]  # a hand-written file, with an empty cell
    write_csv(run / "steps.csv", steps)
    (loaded,), _ = load_results(tmp_path)
    assert loaded.steps["skipped"].dtype == bool and loaded.steps["skipped"].tolist() == [False, True, False, False]
    groups = group_runs([loaded])
    assert telemetry_table(groups)["skipped_steps"].tolist() == ["seed 0: 1 (steps 2)"]
    (ax,) = [ax for ax in loss_scale_figure(groups).axes if ax.lines]
    assert [line.get_xdata().tolist() for line in ax.lines if line.get_marker() == "x"] == [[2]]


def test_loss_scale_figure_names_a_static_or_no_loss_scale_as_such(tmp_path):
    make_run(tmp_path, "dynamic", mode="manual", loss_scales=[65536.0] * 4)
    make_run(tmp_path, "static", mode="manual", loss_scale="1024", loss_scales=[1024.0] * 4)
    make_run(tmp_path, "none", mode="manual", loss_scale="none", loss_scales=[1.0] * 4)
    fig = loss_scale_figure(group_runs(load_results(tmp_path)[0]))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "manual (DynamicLossScaler)", "manual (loss_scale=1024) (static loss scale)",
        "manual (loss_scale=none) (no loss scaling)"]


def test_fp8_figure_draws_each_telemetry_column_on_axes_that_start_at_zero_or_a_power_of_two(tmp_path):
    make_run(tmp_path, "fp16", mode="manual")
    run = make_run(tmp_path, "fp8", mode="manual", fp8="delayed")
    steps = pd.read_csv(run / "steps.csv")
    for role in ("weight", "activation", "grad"):
        steps[f"fp8_{role}_saturated_frac"] = [0.0] * 4  # never saturated: the axis must not go below zero
        steps[f"fp8_{role}_flushed_frac"] = [1e-5, 0.0, 2e-5, 0.0]
        steps[f"fp8_{role}_scale"] = [1100.0, 1200.0, 1300.0, 1400.0]  # within one octave
    write_csv(run / "steps.csv", steps)
    groups = group_runs(load_results(tmp_path)[0])
    assert fp8_figure(groups[:1]) is None  # no FP8 run, no figure
    fig = fp8_figure(groups)
    axes = [ax for ax in fig.axes if ax.lines]
    assert len(axes) == 9 and all(len(ax.lines) == 1 for ax in axes)  # 3 statistics x 3 tensor classes, 1 run
    saturated, flushed, scale = axes[0], axes[3], axes[6]
    # in percent, as telemetry.md gives them
    assert saturated.get_ylim() == (0.0, 1e-3) and flushed.get_ylim() == pytest.approx((0.0, 4e-3))
    assert flushed.lines[0].get_ydata().tolist() == pytest.approx([1e-3, 0.0, 2e-3, 0.0])
    assert scale.get_yscale() == "log" and scale.get_ylim() == (1024.0, 2048.0)


def test_time_to_accuracy_plots_the_seeds_mean_validation_accuracy_at_their_mean_cumulative_time(tmp_path):
    make_run(tmp_path, "base0", seed=0, val_acc=0.60, time_s=10.0)
    make_run(tmp_path, "base1", seed=1, val_acc=0.70, time_s=14.0)
    make_run(tmp_path, "manual0", mode="manual", seed=0, val_acc=0.65, time_s=8.0)
    groups = group_runs(load_results(tmp_path)[0])
    (ax,) = [ax for ax in time_to_accuracy_figure(groups).axes if ax.get_visible() and ax.lines]
    base, manual = ax.lines
    # epochs take time_s / 2 each; validation accuracy 40% after epoch 1, val_acc after epoch 2
    assert base.get_xdata().tolist() == pytest.approx([6.0, 12.0]) and base.get_ydata().tolist() == pytest.approx(
        [40.0, 65.0])
    assert manual.get_xdata().tolist() == pytest.approx([4.0, 8.0]) and manual.get_ydata().tolist() == pytest.approx(
        [40.0, 65.0])
    assert len(ax.collections) == 1  # the spread of the two baseline seeds; manual has one seed
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["baseline (n=2)", "manual (n=1)"]


def test_inference_benchmark_rows_become_a_table_and_a_broken_csv_is_skipped_with_a_warning(tmp_path, capsys):
    from mixprec.bench_infer import main as bench_infer

    make_run(tmp_path, "base0")
    assert bench_infer(["--model", "resnet20", "--mode", "baseline", "manual", "--image-size", "32", "--repeats", "3",
                        "--warmup", "1", "--device", "cpu", "--out", str(tmp_path / "bench_infer.csv")]) == 0
    bench = pd.read_csv(tmp_path / "bench_infer.csv")
    out, stdout, _ = report(tmp_path, capsys)
    rows = md_rows((out / "inference.md").read_text().split("\n\n", 1)[1])
    assert [(r["model"], r["mode"], r["precision"]) for r in rows] == [("resnet20", "baseline", "float32"),
                                                                       ("resnet20", "manual", "float16")]
    manual = bench.iloc[1]
    assert rows[1]["latency (ms)"] == f"{manual.mean_ms:.2f} ± {manual.std_ms:.2f}"
    assert rows[1]["speedup vs FP32"] == f"{manual.speedup_vs_fp32:.2f}" and rows[0]["speedup vs FP32"] == "1.00"
    assert rows[1]["peak (MiB)"] == f"{manual.peak_memory_bytes / MIB:,.0f}" and rows[1]["input"] == "1 x 32x32"
    assert "## Inference latency and memory" in (out / "report.md").read_text() and "inference.md" in stdout

    bench.drop(columns="mean_ms").to_csv(tmp_path / "bench_infer.csv", index=False)
    _, _, stderr = report(tmp_path, capsys)
    assert "warning: no inference table: bench_infer.csv lacks the column(s) mean_ms" in stderr
    assert not (out / "inference.md").exists() and "Inference" not in (out / "report.md").read_text()


def test_report_of_a_real_tiny_study(tiny_cifar, tmp_path, capsys):
    from mixprec.run import main as run

    for mode in ("baseline", "manual"):
        assert run(["--mode", mode, "--model", "resnet20", "--epochs", "1", "--batch-size", "64", "--device", "cpu",
                    "--test-subset", "40", "--data", str(tiny_cifar["pickles"]), "--out", str(tmp_path)]) == 0
    summaries = {s["mode"]: s for s in (json.loads(p.read_text()) for p in tmp_path.glob("runs/*/summary.json"))}
    out, _, _ = report(tmp_path, capsys)

    figures = ["accuracy_diff.png", "confusion_matrices.png", "curves.png", "time_to_accuracy.png", "loss_scale.png",
               "memory.png"]
    for name in ["comparison.md", "comparison.csv", "per_class_accuracy.md", "per_class_accuracy.csv", "report.md",
                 *figures]:
        assert (out / name).exists(), name
    assert not list(out.glob(".*.tmp"))
    text = (out / "report.md").read_text()
    for name in figures:
        assert f"]({name})" in text
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 600
    assert (out / "comparison.md").read_text().split("\n\n")[0] in text
    assert f"`python -m mixprec.report {tmp_path}`" in text and "Do not edit by hand" in text

    table = pd.read_csv(out / "comparison.csv").set_index("mode")
    base, manual = summaries["baseline"], summaries["manual"]
    assert table["n"].tolist() == [1, 1]
    assert table.loc["baseline", "test_accuracy_mean"] == pytest.approx(base["test_accuracy"], abs=1e-12)
    assert table.loc["manual", "speedup_vs_baseline"] == pytest.approx(base["train_time_s"] / manual["train_time_s"])
    assert table.loc["manual", "memory_ratio_vs_baseline"] == pytest.approx(
        manual["peak_memory_bytes"] / base["peak_memory_bytes"])
    assert table.loc["manual", "final_loss_scale_mean"] == manual["final_loss_scale"]
    per_class = pd.read_csv(out / "per_class_accuracy.csv").set_index("class")
    assert list(per_class.index) == [*CLASSES, "all"]
    column = per_class["resnet20 / manual"]
    assert column["all"] == pytest.approx(manual["test_accuracy"])
    assert column[CLASSES[3]] == pytest.approx(manual["per_class_accuracy"][CLASSES[3]])


def test_layer_heatmaps_show_each_groups_layers_by_step_and_only_where_measured(tiny_cifar, tiny_models, tmp_path,
                                                                                  capsys):
    from mixprec.report.figures import LAYER_PANELS, layer_grads_figure, layer_grid
    from mixprec.run import main as run

    common = ["--model", "tiny", "--epochs", "1", "--batch-size", "40", "--device", "cpu", "--test-subset", "40",
              "--data", str(tiny_cifar["pickles"]), "--out", str(tmp_path)]
    assert run(["--mode", "baseline", *common]) == 0
    out, _, _ = report(tmp_path, capsys)
    assert not (out / "layer_grads_activation.png").exists()
    for seed in ("0", "1"):
        assert run(["--mode", "manual", "--seed", seed, "--layer-stats-every", "2", *common]) == 0
    out, _, _ = report(tmp_path, capsys)
    assert "](layer_grads_activation.png)" in (out / "report.md").read_text()
    assert (out / "layer_grads_weight.png").exists()

    groups = [g for g in group_runs(load_results(tmp_path)[0]) if g.runs[0].layers is not None]
    (manual,) = groups
    grid = layer_grid(manual.runs, "activation", "zero_frac")
    assert list(grid.index) == ["conv", "bn", "fc"] and list(grid.columns) == [1, 3]
    by_seed = [r.layers.query("tensor == 'activation' and statistic == 'zero_frac' and layer == 'bn' and step == 3")
               for r in manual.runs]
    assert grid.loc["bn", 3] == pytest.approx(sum(float(f.value.iloc[0]) for f in by_seed) / 2)  # mean over seeds
    fig = layer_grads_figure(groups, "weight")
    assert len(fig.axes) == len(LAYER_PANELS) + len(LAYER_PANELS)  # one row of panels, and a colour bar for each
    # the table: means over layers, steps and seeds; the least headroom seen
    table = pd.read_csv(out / "layer_grads.csv").set_index("tensor")
    both = pd.concat(r.layers for r in manual.runs)
    act = both[both.tensor == "activation"]
    assert table.loc["activation", "zero_frac"] == pytest.approx(act[act.statistic == "zero_frac"].value.mean())
    assert table.loc["activation", "least_headroom_log2"] == act[act.statistic == "headroom_log2"].value.min()
    assert "## Gradients layer by layer" in (out / "report.md").read_text()


def test_telemetry_table_lists_skips_per_seed_and_means_over_measured_steps(tmp_path, capsys):
    make_run(tmp_path, "b0", mode="baseline")
    m0 = make_run(tmp_path, "m0", mode="manual", loss_scales=[4.0, 2.0, 1.0, 1.0], skipped=(2, 3))
    m1 = make_run(tmp_path, "m1", mode="manual", seed=1, loss_scales=[4.0] * 4)
    for run, underflow, lost in ((m0, [0.1, None, None, 0.3], None),
                                 (m1, [0.2, None, None, None], [0.1, 0.2, 0.6, 0.8])):
        steps = pd.read_csv(run / "steps.csv")
        steps["grad_underflow_frac"] = underflow  # NaN: a step that measured nothing
        if lost is not None:
            steps["update_lost_frac"], steps["decay_lost_frac"] = lost, [1.0] * 4
        write_csv(run / "steps.csv", steps)
    out, _, _ = report(tmp_path, capsys)
    rows = md_rows((out / "telemetry.md").read_text())
    assert [r["mode"] for r in rows] == ["baseline", "manual"]
    manual = rows[1]
    assert manual["skipped steps"] == "seed 0: 2 (steps 2, 3); seed 1: 0"
    assert manual["gradients below FP16 normal unscaled (%)"] == "20"  # mean of 0.1, 0.3, 0.2: NaNs left out
    assert manual["updates lost to rounding (%)"] == "42.5"  # from the one seed that has the column
    assert manual["updates lost to rounding, last epoch (%)"] == "70"  # steps 3 and 4 are epoch 2's
    assert rows[0]["updates lost to rounding (%)"] == "" and "FP8 gradients flushed to 0 (%)" not in manual
    assert "## Skipped steps and precision telemetry" in (out / "report.md").read_text()
    assert list(pd.read_csv(out / "telemetry.csv")["update_lost_frac"].isna()) == [True, False]
    assert (out / "lost_updates.png").exists() and "lost_updates.png" in (out / "report.md").read_text()


def test_lost_updates_figure_draws_both_fractions_per_seed_beside_the_lr_and_only_without_master_weights(tmp_path):
    make_run(tmp_path, "masters", mode="manual")
    assert lost_updates_figure(group_runs(load_results(tmp_path)[0])) is None
    for seed in (0, 1):
        run = make_run(tmp_path, f"nomw{seed}", mode="manual", seed=seed, master_weights="none")
        steps = pd.read_csv(run / "steps.csv")
        steps["update_lost_frac"], steps["decay_lost_frac"] = [0.1, None, 0.3, 0.5 + seed / 10], [1.0] * 4
        write_csv(run / "steps.csv", steps)
    fig = lost_updates_figure(group_runs(load_results(tmp_path)[0]))
    lost, lr = fig.axes
    assert [line.get_ydata().tolist() for line in lost.lines] == [[10, 30, 50], [100] * 3, [10, 30, 60], [100] * 3]
    assert [line.get_label() for line in lost.lines][:2] == [
        "resnet20 / manual (master_weights=none): updates lost", "resnet20 / manual (master_weights=none): weight "
        "decays lost"] and len(lr.lines) == 2 and lost.get_ylim() == (0, 105)


def test_lost_updates_figure_draws_what_nearest_rounding_would_lose_beside_stochastic_and_kahan(tmp_path):
    for kind in ("stochastic", "kahan"):
        run = make_run(tmp_path, kind, mode="manual", master_weights=kind)
        steps = pd.read_csv(run / "steps.csv")
        steps["update_lost_frac"], steps["decay_lost_frac"] = [0.1, None, 0.2, 0.3], None
        steps["update_lost_nearest_frac"] = [0.9, None, 0.95, 1.0]
        write_csv(run / "steps.csv", steps)
    lost, _ = lost_updates_figure(group_runs(load_results(tmp_path)[0])).axes
    assert sorted(line.get_label() for line in lost.lines) == [
        "resnet20 / manual (master_weights=kahan): updates lost",
        "resnet20 / manual (master_weights=kahan): updates nearest rounding would lose",
        "resnet20 / manual (master_weights=stochastic): updates lost",
        "resnet20 / manual (master_weights=stochastic): updates nearest rounding would lose"]  # no decay: not measured
    assert [line.get_ydata().tolist() for line in lost.lines][:2] == [[10, 20, 30], [90, 95, 100]]


def test_lost_updates_figure_draws_a_panel_per_weight_precision_and_a_colour_per_kind(tmp_path):
    for kind, dtype in (("none", "float16"), ("kahan", "float16"), ("none", "bfloat16")):
        run = make_run(tmp_path, f"{kind}-{dtype}", mode="manual", master_weights=kind, manual_dtype=dtype)
        steps = pd.read_csv(run / "steps.csv")
        steps["update_lost_frac"], steps["decay_lost_frac"] = [0.1, None, 0.2, 0.3], None
        write_csv(run / "steps.csv", steps)
    fig = lost_updates_figure(group_runs(load_results(tmp_path)[0]))
    fp16, bf16 = fig.axes[:2]  # the panels, then their learning-rate axes
    assert (fp16.get_title(), bf16.get_title()) == ("float16 weights", "bfloat16 weights")
    colours = {line.get_label().split(": ")[0]: line.get_color() for ax in (fp16, bf16) for line in ax.lines}
    assert colours == {"resnet20 / manual (master_weights=kahan)": "C2",
                       "resnet20 / manual (master_weights=none)": "C3",
                       "resnet20 / manual (master_weights=none, manual_dtype=bfloat16)": "C3"}  # none is red in both
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["master weights none", "master weights kahan", "updates lost", "learning rate (right axis)"]


def test_memory_figure_draws_compensation_and_workspace_only_where_a_group_holds_them(tmp_path):
    make_run(tmp_path, "masters", mode="manual")
    legend = lambda: [t.get_text() for t in memory_figure(group_runs(load_results(tmp_path)[0])).legends[0].texts]
    assert legend()[:5] == ["weights", "master weights", "grads", "optimizer state", "activations"]
    assert "compensation" not in legend() and "update workspace" not in legend()
    kahan = make_run(tmp_path, "kahan", mode="manual", master_weights="kahan")
    summary_json = json.loads((kahan / "summary.json").read_text())
    summary_json["memory"] |= {"master_weights": 0, "compensation": MIB, "update_workspace": 2 * MIB}
    write_json(kahan / "summary.json", summary_json)
    assert legend()[5:7] == ["compensation", "update workspace"]


def test_a_run_from_before_master_weights_had_kinds_is_grouped_as_none(tmp_path):
    """Runs made before --master-weights wrote master_weights false; the report reads them as none."""
    make_run(tmp_path, "new", mode="manual", master_weights="none", seed=0)
    old = make_run(tmp_path, "old", mode="manual", seed=1)
    config = json.loads((old / "config.json").read_text())
    write_json(old / "config.json", {**config, "master_weights": False})
    masters = make_run(tmp_path, "masters", mode="manual", seed=2)
    write_json(masters / "config.json", {**json.loads((masters / "config.json").read_text()), "master_weights": True})
    groups = group_runs(load_results(tmp_path)[0])
    assert sorted((g.short, g.n) for g in groups) == [("manual", 1), ("manual (master_weights=none)", 2)]


def test_runs_named_in_timings_excluded_count_for_accuracy_but_not_for_time(tmp_path, capsys):
    make_run(tmp_path, "base0", seed=0, acc=0.80, time_s=100.0)
    make_run(tmp_path, "base1", seed=1, acc=0.82, time_s=20.0)
    make_run(tmp_path, "manual0", mode="manual", seed=0, acc=0.84, time_s=300.0)  # the loaded machine's time
    make_run(tmp_path, "manual1", mode="manual", seed=1, acc=0.86, time_s=10.0)
    write_json(tmp_path / "timings-excluded.json", {"runs/base0": "CI ran beside it", "runs/manual0": "CI ran beside it"})
    out, _, _ = report(tmp_path, capsys)

    table = pd.read_csv(out / "comparison.csv").set_index("mode")
    assert table["n"].tolist() == [2, 2] and table.loc["manual", "accuracy_diff_pp"] == pytest.approx(4.0)
    assert table["train_time_s_mean"].tolist() == pytest.approx([20.0, 10.0])  # seed 1 only
    assert table.loc["manual", "speedup_vs_baseline"] == pytest.approx(2.0)
    assert table.loc["manual", "ratios_measured_on"] == "Test CPU (AVX2) (seeds: 1)"
    assert "resnet20 / manual: the times of seed(s) 0 are not counted" in (out / "comparison.md").read_text()
    assert "- `runs/manual0`: CI ran beside it" in (out / "report.md").read_text()
    (ax,) = [ax for ax in time_to_accuracy_figure(group_runs(load_results(tmp_path)[0])).axes if ax.lines]
    assert [line.get_xdata()[-1] for line in ax.lines] == pytest.approx([20.0, 10.0])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["baseline (n=1)", "manual (n=1)"]


def test_time_to_accuracy_says_so_when_every_run_of_a_model_is_untimed(tmp_path, capsys):
    make_run(tmp_path, "base0")
    make_run(tmp_path, "manual0", mode="manual")
    make_run(tmp_path, "other0", model="resnet18")
    write_json(tmp_path / "timings-excluded.json", {"runs/base0": "loaded", "runs/manual0": "loaded"})
    fig = time_to_accuracy_figure(group_runs(load_results(tmp_path)[0]))
    panels = {ax.get_title().split(":")[0]: ax for ax in fig.axes if ax.get_visible()}  # one panel per model
    untimed, timed = panels["resnet20"], panels["resnet18"]
    assert not untimed.lines and untimed.get_legend() is None and timed.lines
    assert [t.get_text() for t in untimed.texts] == ["no timed run (timings-excluded.json names them all)"]
    # when every run of the study is untimed, there is no time figure at all, and the report says why
    write_json(tmp_path / "timings-excluded.json", {f"runs/{r}": "loaded" for r in ("base0", "manual0", "other0")})
    assert time_to_accuracy_figure(group_runs(load_results(tmp_path)[0])) is None
    out, _, _ = report(tmp_path, capsys)
    assert not (out / "time_to_accuracy.png").exists()
    assert "No time figure: `timings-excluded.json` names every run" in (out / "report.md").read_text()


@pytest.mark.parametrize("content, expect", [
    ({"runs/nope": "loaded"}, "names 'runs/nope', which is not a run directory"),
    ({"runs/base0": ""}, "is not a mapping of run directories to reasons"),
    (["runs/base0"], "is not a mapping of run directories to reasons"),
])
def test_a_bad_timings_excluded_file_is_one_line_and_exit_2(content, expect, tmp_path, capsys):
    make_run(tmp_path, "base0")
    write_json(tmp_path / "timings-excluded.json", content)
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(ERROR) and expect in err and "\n" not in err


def test_the_training_step_benchmark_is_a_section_of_the_report_with_its_targets(tmp_path):
    make_run(tmp_path, "base")
    (tmp_path / "bench").mkdir()
    common = dict(model="resnet50", batch_size=128, device="Test GPU", torch="2.11.0", error=None)
    pd.DataFrame([{**common, "variant": v, "median_step_s": s, "images_per_s": 128 / s, "peak_memory_bytes": m}
                  for v, s, m in (("fp32", 0.1, 4e9), ("amp", 0.04, 2.5e9), ("manual", 0.05, 2.8e9))]).to_csv(
        tmp_path / "bench" / "resnet50.csv", index=False)
    make_report(tmp_path)
    text = (tmp_path / "report" / "speed_memory.md").read_text()
    assert "## Training step: speed and memory" in (tmp_path / "report" / "report.md").read_text()
    assert "- resnet50: amp / fp32 images/s 2.50x (target >= 2.0): met" in text
    assert "- resnet50: manual / amp images/s 0.80x (target >= 0.9): MISSED" in text
    row = md_rows(text.split("\n\n")[1])[1]
    assert (row["variant"], row["vs FP32"], row["memory vs FP32"]) == ("amp", "2.5", "0.62")


def _predictions(run: Path, labels, predictions) -> None:
    write_csv(run / "test_predictions.csv", pd.DataFrame({"label": labels, "prediction": predictions}))


def test_findings_open_the_report_with_each_modes_paired_difference(tmp_path, capsys):
    for seed, (base, manual) in enumerate([(0.80, 0.78), (0.82, 0.81), (0.81, 0.78)]):
        make_run(tmp_path, f"b{seed}", seed=seed, acc=base)
        make_run(tmp_path, f"m{seed}", mode="manual", seed=seed, acc=manual)
    make_run(tmp_path, "a0", mode="amp", amp_dtype="float16", acc=0.79)
    out, _, _ = report(tmp_path, capsys)
    text = (out / "report.md").read_text()
    assert text.index("## Findings") < text.index("## Environment") < text.index("## Comparison with the baseline")
    diff, p, low, high = paired_t(np.array([0.78, 0.81, 0.78]), np.array([0.80, 0.82, 0.81]))
    assert "**resnet20**: FP32 reached 81.00% test accuracy (n = 3).\n- amp (float16)" in text
    assert (f"- manual: 79.00% (n = 3), {100 * diff:+.2f} pp against FP32, 95% CI [{100 * low:+.2f}, "
            f"{100 * high:+.2f}] paired over 3 seeds (p {p:.2g}; Holm-adjusted {p:.2g}); 0 skipped steps on average; "
            "peak memory 1.00x FP32's.") in text  # amp, one seed, is no test: the family is manual's alone
    assert "- amp (float16): 79.00% (n = 1), -2.00 pp against FP32 (one seed: no interval)" in text


def test_difference_maps_pair_seeds_and_count_the_predictions_that_flip(tmp_path):
    from mixprec.report.figures import confusion_difference_figure, flips_figure, prediction_flips

    labels = np.repeat(np.arange(10), 10)
    for seed in (0, 1):
        base, manual = make_run(tmp_path, f"b{seed}", seed=seed), make_run(tmp_path, f"m{seed}", mode="manual",
                                                                            seed=seed, acc=0.7)
        fp32 = labels.copy()
        fp32[:20 + seed] = (labels[:20 + seed] + 1) % 10  # FP32 wrong on the first 20 (21) images
        mixed = fp32.copy()
        mixed[20 + seed: 25 + seed] = 0  # 5 that FP32 got right (classes 2: not 0), now wrong
        mixed[:3] = labels[:3]  # 3 that FP32 got wrong, now right
        mixed[3] = (labels[3] + 2) % 10  # wrong both times, differently
        _predictions(base, labels, fp32)
        _predictions(manual, labels, mixed)
    runs = load_results(tmp_path)[0]
    by_name = {r.path.name: r for r in runs}
    assert prediction_flips(by_name["m0"], by_name["b0"]) == {"lost": 0.05, "gained": 0.03, "other": 0.01}
    assert prediction_flips(by_name["b1"], by_name["b0"]) == {"lost": 0.01, "gained": 0.0, "other": 0.0}  # image 20
    groups = group_runs(runs)
    fig = flips_figure(groups)
    (ax,) = fig.axes
    assert [round(p.get_width(), 6) for p in ax.patches] == [5.0, 3.0, 1.0]  # means over the two seeds
    diff = confusion_difference_figure(groups)
    (panel, colorbar) = diff.axes
    image = panel.images[0].get_array()
    # make_run's matrices: FP32 80 of 100 right, manual 70; the diagonal loses 10 points of the classes hit
    assert image.diagonal().sum() == pytest.approx(-100.0)
    assert "seeds 0, 1" in panel.get_title()


def test_grid_figures_wrap_at_four_panels(tmp_path):
    for i, lr in enumerate((0.1, 0.2, 0.3, 0.4, 0.5)):
        make_run(tmp_path, f"g{i}", lr=lr)
    fig = confusion_figure(group_runs(load_results(tmp_path)[0]))
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(drawn) == 5 and len({round(ax.get_position().y0, 3) for ax in drawn}) == 2  # 4 + 1
