"""Statistics over seeds (means, t intervals, Welch's and the paired t-test, time and memory ratios against the
baseline) and the tables: comparison, grid, per-class accuracy and inference, as pandas frames, markdown and CSV.
Imports :mod:`.runs` and :mod:`.groups`."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import options_with
from ..results import write_csv, write_text
from .groups import Group, find_baseline, machine_label, show_value, sort_key
from .runs import INFERENCE_CSV, STEP_BENCH, STEP_BENCH_TABLE, UNTIMED, BadRun, Run, as_float, read_csv

GRID = options_with("grid")
MIB = 2**20


def welch(a, b) -> tuple[float, float, float]:
    """Welch's t-test (unequal variances) of mean(a) - mean(b): the two-sided p-value and the 95% confidence
    interval of the difference (Welch-Satterthwaite degrees of freedom); NaNs unless both sides have n >= 2."""
    from scipy.stats import ttest_ind

    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan, math.nan
    with warnings.catch_warnings():  # identical samples: scipy warns and returns NaN, which is the answer
        warnings.simplefilter("ignore", RuntimeWarning)
        test = ttest_ind(a, b, equal_var=False)
        ci = test.confidence_interval(0.95)
        return float(test.pvalue), float(ci.low), float(ci.high)


def paired_t(a, b) -> tuple[float, float, float, float]:
    """The paired t-test of ``a - b``, element by element (``a[i]`` and ``b[i]`` one seed's results in two modes):
    the mean difference, its two-sided p-value and its 95% confidence interval, ``mean ± t(0.975, n-1) * sd / sqrt(n)``
    of the n differences (``scipy.stats.ttest_rel``); all four NaN with fewer than 2 pairs."""
    from scipy.stats import ttest_rel

    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2:
        return math.nan, math.nan, math.nan, math.nan
    with warnings.catch_warnings():  # identical differences: scipy warns and returns NaN or inf, which is the answer
        warnings.simplefilter("ignore", RuntimeWarning)
        test = ttest_rel(a, b)
        ci = test.confidence_interval(0.95)
        return float(np.mean(a - b)), float(test.pvalue), float(ci.low), float(ci.high)


def holm(p) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values of one family of tests (NaN entries are not tests and stay NaN): the
    i-th smallest of m p-values becomes ``max over j <= i of min(1, (m - j + 1) * p_j)``. Rejecting where the
    adjusted value is below 0.05 keeps the chance of any false alarm in the family at 5% (Holm 1979)."""
    p = np.asarray(p, float)
    adjusted = np.full(len(p), math.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    m = len(order)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return adjusted


def t_interval(values) -> tuple[float, float, float]:
    """The mean of ``values`` (NaNs left out) and its 95% confidence interval, ``mean ± t(0.975, n-1) * sd / sqrt(n)``
    (sample sd, ddof=1); the interval is NaN for fewer than 2 values, all three for none."""
    from scipy.stats import t

    v = np.asarray(values, float)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan, math.nan
    half = float(t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half


def seed_pairs(group: Group, base: Group, key: str = "test_accuracy") -> tuple[list, np.ndarray, np.ndarray]:
    """The seeds that both ``group`` and ``base`` ran, in order, and ``key`` per seed on each side. Runs of one seed
    start from the same weights and see the same batches in every mode, so these pairs are the design's own.
    A seed run more than once on one side (copies of a setting) counts once, as the mean of its runs."""
    def per_seed(g: Group) -> pd.Series:
        values = pd.Series([as_float(r.summary.get(key)) for r in g.runs], index=[r.seed for r in g.runs], dtype=float)
        return values.dropna().groupby(level=0, sort=False).mean()

    mine, theirs = per_seed(group), per_seed(base)
    seeds = sorted(set(mine.index) & set(theirs.index), key=sort_key)
    return seeds, mine[seeds].to_numpy(), theirs[seeds].to_numpy()


def group_stats(group: Group) -> dict:
    """Means and sample standard deviations (ddof=1, NaN for one seed) over the group's seeds."""
    acc, time_s = group.values("test_accuracy"), group.values("train_time_s")
    peak = group.values("peak_memory_bytes") / MIB
    return {
        "n": group.n,
        "seeds": ",".join(str(r.seed) for r in group.runs),
        "test_accuracy_mean": acc.mean(), "test_accuracy_std": acc.std(),
        "train_time_s_mean": time_s.mean(), "train_time_s_std": time_s.std(),
        "images_per_s_mean": group.values("images_per_s").mean(),
        "peak_memory_mib_mean": peak.mean(), "peak_memory_mib_std": peak.std(),
        "skipped_steps_mean": group.values("skipped_steps").mean(),
        "final_loss_scale_mean": group.values("final_loss_scale").mean(),
    }


def paired_runs(group: Group, base: Group) -> list[tuple[Run, Run]]:
    """``(run, baseline run)`` for each of ``group``'s timed runs that has a timed baseline run of the same seed on
    the same machine: the only pairs whose time and memory may be compared."""
    pairs = []
    for run in group.timed_runs:
        match = next((b for b in base.timed_runs
                      if b.seed == run.seed and machine_label(b.env) == machine_label(run.env)), None)
        if match is not None:
            pairs.append((run, match))
    return pairs


def paired_ratios(group: Group, base: Group) -> dict:
    """Speedup (the baseline's mean training time over this group's) and memory ratio (this group's mean peak
    over the baseline's), over the seeds paired on the same machine, and the machines they were measured on."""
    pairs = paired_runs(group, base)
    if not pairs:
        return {"speedup_vs_baseline": math.nan, "memory_ratio_vs_baseline": math.nan, "ratios_measured_on": ""}
    total = lambda key, side: sum(as_float(p[side].summary.get(key)) for p in pairs)  # noqa: E731
    machines = pd.Series([machine_label(run.env) for run, _ in pairs]).value_counts(sort=False)
    return {"speedup_vs_baseline": total("train_time_s", 1) / total("train_time_s", 0),
            "memory_ratio_vs_baseline": total("peak_memory_bytes", 0) / total("peak_memory_bytes", 1),
            "ratios_measured_on": "; ".join(f"{m} (seeds: {n})" for m, n in machines.items())}


def comparison_table(groups: list[Group]) -> pd.DataFrame:
    """One row per group with raw numbers (fractions, seconds, MiB); the comparison with its baseline
    is NaN where there is none. Accuracy is compared over all seeds of the environment; time and memory
    only between runs of the same seed on the same machine (:func:`paired_ratios`)."""
    rows = []
    for g in groups:
        stats, base = group_stats(g), find_baseline(g, groups)
        row = {"model": g.model, "mode": g.label, **g.columns, **stats}
        if base is not None:
            b = group_stats(base)
            row.update(paired_ratios(g, base))
            if base is not g:
                row["accuracy_diff_pp"] = 100 * (stats["test_accuracy_mean"] - b["test_accuracy_mean"])
                p, low, high = welch(g.values("test_accuracy"), base.values("test_accuracy"))
                row["accuracy_diff_ci95_low_pp"], row["accuracy_diff_ci95_high_pp"] = 100 * low, 100 * high
                row["welch_p"] = p
                seeds, mine, theirs = seed_pairs(g, base)
                diff, p, low, high = paired_t(mine, theirs)
                row["paired_seeds"], row["paired_n"] = ",".join(map(str, seeds)), len(seeds)
                row["paired_diff_pp"], row["paired_p"] = 100 * diff, p
                row["paired_diff_ci95_low_pp"], row["paired_diff_ci95_high_pp"] = 100 * low, 100 * high
        rows.append(row)
    table = pd.DataFrame(rows)
    for col in ("speedup_vs_baseline", "memory_ratio_vs_baseline", "accuracy_diff_pp", "accuracy_diff_ci95_low_pp",
                "accuracy_diff_ci95_high_pp", "welch_p", "paired_n", "paired_diff_pp", "paired_diff_ci95_low_pp",
                "paired_diff_ci95_high_pp", "paired_p"):
        if col not in table:
            table[col] = math.nan
    for col in ("ratios_measured_on", "paired_seeds"):
        if col not in table:
            table[col] = ""
        table[col] = table[col].fillna("")
    table["paired_n"] = table["paired_n"].astype("Int64")  # a count, blank for a baseline or a group without one
    table["paired_p_holm"] = table.groupby("model", sort=False)["paired_p"].transform(holm)  # a model's family
    paired = ["paired_seeds", "paired_n", "paired_diff_pp", "paired_diff_ci95_low_pp", "paired_diff_ci95_high_pp",
              "paired_p", "paired_p_holm"]
    last = ["skipped_steps_mean", "final_loss_scale_mean"]
    order = [c for c in table.columns if c not in paired + last]
    return table[order + paired + last]


def _num(value, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _pm(mean, std, spec: str) -> str:
    """``mean ± std``, or the mean alone when there is no std (one seed)."""
    if _num(mean, spec) == "":
        return ""
    return format(mean, spec) + ("" if _num(std, spec) == "" else f" ± {std:{spec}}")


def _interval(low, high, spec: str = "+.2f") -> str:
    """``[low, high]``, or nothing when there is no interval."""
    return "" if _num(low, spec) == "" or _num(high, spec) == "" else f"[{low:{spec}}, {high:{spec}}]"


def _loss_scales(group: Group) -> str:
    values = sorted(set(group.values("final_loss_scale")))
    return ", ".join(f"{v:g}" for v in values)


def comparison_markdown(table: pd.DataFrame, groups: list[Group]) -> str:
    """The comparison table formatted for reading (accuracy in %, 2 decimals), with its notes."""
    extra = [c for c in table.columns if c in groups[0].columns]
    shown = pd.DataFrame({
        "model": table["model"], "mode": table["mode"], **{c: table[c] for c in extra}, "n": table["n"],
        "test accuracy (%)": [_pm(m * 100, s * 100, ".2f")
                              for m, s in zip(table["test_accuracy_mean"], table["test_accuracy_std"])],
        "train time (s)": [_pm(m, s, ".2f") for m, s in zip(table["train_time_s_mean"], table["train_time_s_std"])],
        "images/s": [_num(v, ".1f") for v in table["images_per_s_mean"]],
        "peak memory (MiB)": [_pm(m, s, ".1f")
                              for m, s in zip(table["peak_memory_mib_mean"], table["peak_memory_mib_std"])],
        "speedup vs baseline": [_num(v, ".2f") for v in table["speedup_vs_baseline"]],
        "memory vs baseline": [_num(v, ".2f") for v in table["memory_ratio_vs_baseline"]],
        "ratios measured on": table["ratios_measured_on"],
        "accuracy vs baseline (pp)": [_num(v, "+.2f") for v in table["accuracy_diff_pp"]],
        "Welch 95% CI (pp)": [_interval(lo, hi) for lo, hi in zip(table["accuracy_diff_ci95_low_pp"],
                                                                   table["accuracy_diff_ci95_high_pp"])],
        "Welch p": [_num(v, ".3g") for v in table["welch_p"]],
        "paired n": ["" if pd.isna(v) else str(v) for v in table["paired_n"]],
        "paired diff (pp)": [_num(v, "+.2f") for v in table["paired_diff_pp"]],
        "paired 95% CI (pp)": [_interval(lo, hi) for lo, hi in zip(table["paired_diff_ci95_low_pp"],
                                                                    table["paired_diff_ci95_high_pp"])],
        "paired p": [_num(v, ".3g") for v in table["paired_p"]],
        "paired p, Holm": [_num(v, ".3g") for v in table["paired_p_holm"]],
        "skipped steps": [_num(v, "g") for v in table["skipped_steps_mean"]],
        "final loss scale": [_loss_scales(g) for g in groups],
    })
    return markdown_table(shown) + "\n\n" + "\n".join(f"- {note}" for note in comparison_notes(groups)) + "\n"


def difference_from_baseline(row) -> tuple[float, float, float, str]:
    """A comparison-table row's accuracy difference from its baseline (pp), its 95% interval and the test they come
    from, as the report states them: ``"paired"`` where two or more seeds pair, else ``"welch"`` where Welch's test
    gives an interval, else ``"one seed"``: the difference alone (NaN too without a baseline)."""
    if not pd.isna(row.paired_n) and row.paired_n >= 2:
        return row.paired_diff_pp, row.paired_diff_ci95_low_pp, row.paired_diff_ci95_high_pp, "paired"
    if not pd.isna(row.accuracy_diff_ci95_low_pp):
        return row.accuracy_diff_pp, row.accuracy_diff_ci95_low_pp, row.accuracy_diff_ci95_high_pp, "welch"
    return row.accuracy_diff_pp, math.nan, math.nan, "one seed"


def findings_markdown(table: pd.DataFrame, groups: list[Group]) -> str:
    """One generated paragraph per model, before every table: its baseline's accuracy, then a line per other group:
    its difference from it with a 95% interval (paired by seed where at least two seeds pair, else Welch's),
    its skipped steps and its peak memory against the baseline's."""
    paragraphs = []
    for model in dict.fromkeys(table["model"]):
        rows = [(r, g) for r, g in zip(table.itertuples(), groups) if r.model == model]
        base = next(((r, g) for r, g in rows if g.mode == "baseline"), None)
        said = [f"**{model}**"]
        if base is not None:
            r = base[0]
            said.append(f"FP32 reached {100 * r.test_accuracy_mean:.2f}% test accuracy (n = {r.n})")
        for r, g in rows:
            if base is not None and g is base[1]:
                continue
            text = f"{g.short}: {100 * r.test_accuracy_mean:.2f}% (n = {r.n})"
            diff, low, high, source = difference_from_baseline(r)
            if source == "paired":
                text += f", {diff:+.2f} pp against FP32, 95% CI {_interval(low, high)} paired over {r.paired_n} seeds"
                if _num(r.paired_p, "g"):
                    text += f" (p {r.paired_p:.2g}; Holm-adjusted {r.paired_p_holm:.2g})"
            elif source == "welch":
                text += f", {diff:+.2f} pp against FP32, 95% CI {_interval(low, high)} (Welch)"
            elif _num(diff, "g"):
                text += f", {diff:+.2f} pp against FP32 (one seed: no interval)"
            if _num(r.skipped_steps_mean, "g"):
                text += f"; {r.skipped_steps_mean:.3g} skipped steps on average"
            if _num(r.memory_ratio_vs_baseline, "g"):
                text += f"; peak memory {r.memory_ratio_vs_baseline:.2f}x FP32's"
            said.append(text)
        head = said[0] + (f": {said[1]}." if base is not None else ":")
        paragraphs.append("\n".join([head, *(f"- {text}." for text in said[1 + (base is not None):])]))
    return ("What the runs found, per model (generated from the comparison table below; an interval that "
            "contains 0 means the runs cannot tell the mode from FP32):\n\n" + "\n\n".join(paragraphs) + "\n")


def comparison_notes(groups: list[Group]) -> list[str]:
    """What the columns mean, and every place where one seed leaves a number without its uncertainty."""
    notes = [("Mean ± sample standard deviation over seeds (n). Speedup is the baseline's mean training time over "
              "this mode's and memory this mode's mean peak over the baseline's, both only over the seeds that ran "
              "in both modes on the same machine (named under 'ratios measured on'); accuracies are pooled over "
              "all the environment's runs, whatever CPU model ran them (CPU and CUDA runs never). The accuracy "
              "difference is in "
              "percentage points: 'accuracy vs baseline' is the difference of the means over all seeds, with the "
              "95% confidence interval ('Welch 95% CI') and the two-sided p-value ('Welch p') of Welch's unpaired "
              "t-test of the test accuracies over seeds (Welch-Satterthwaite degrees of freedom). The "
              "baseline is the one with the same model, environment and training settings."),
             ("Paired by seed: a run of one seed starts from the same FP32 weights and sees the same batches in "
              "every mode, so the paired columns compare each seed with itself. 'paired diff' is the mean, over "
              "the 'paired n' seeds that both this mode and its baseline ran, of this mode's test accuracy minus "
              "the baseline's of the same seed; 'paired 95% CI' is its 95% confidence interval from the paired "
              "t-test (mean ± t(0.975, n-1) × sd / √n of the n differences, n-1 degrees of freedom) and 'paired p' "
              "that test's two-sided p-value (scipy.stats.ttest_rel). They are blank with fewer than 2 shared "
              "seeds. Welch's test ignores the pairing and counts seed-to-seed variation that both modes share. "
              "'paired p, Holm' is the paired p-value adjusted by Holm's method for all the model's paired "
              "comparisons in this report: with m comparisons, some p-value below 0.05 turns up by chance far "
              "more often than 5% of the time, while adjusted p-values below 0.05 keep that chance at 5%. The "
              "95% intervals are not adjusted.")]
    if any(g.mode == "amp" and g.setting.get("half_compute") == "emulated" for g in groups):
        notes.append("amp with half_compute emulated (the CPU default) is torch.autocast to its dtype with "
                     "torch.amp.GradScaler for float16, its convolutions, linears and matmuls computed as emulated "
                     "tensor-core arithmetic (half operands, FP32 accumulation): the same recipe as on a GPU, at "
                     "FP32's speed. amp (bfloat16) runs have no loss scaler.")
    for g in groups:
        base = find_baseline(g, groups)
        if base is not None and base is not g and 0 < len(paired_runs(g, base)) < g.n:
            notes.append(f"{g.title}: time and memory ratios from {len(paired_runs(g, base))} of its {g.n} seeds, the "
                         "ones with a timed baseline run of the same seed on the same machine.")
        elif base is not None and base is not g and not paired_runs(g, base):
            notes.append(f"{g.title}: no timed baseline run of the same seed on the same machine, so no time or memory "
                         "ratio.")
        if base is not None and base is not g:
            seeds = seed_pairs(g, base)[0]
            shown = ", ".join(map(str, seeds))
            if len(seeds) < 2 and g.n >= 2 and base.n >= 2:
                notes.append(f"{g.title}: {len(seeds)} seed(s) shared with its baseline{f' ({shown})' if seeds else ''}"
                             ": no paired difference.")
            elif len(seeds) >= 2 and len(seeds) < max(g.n, base.n):
                notes.append(f"{g.title}: paired difference over seeds {shown} only, the seeds that both it and "
                             f"its baseline ran (it has {g.n} run(s), its baseline {base.n}).")
        untimed = g.untimed_runs
        if untimed:
            notes.append(f"{g.title}: the times of seed(s) {', '.join(str(r.seed) for r in untimed)} are not counted "
                         f"(train time, images/s, ratios and the time-to-accuracy figure), as {UNTIMED} says: "
                         + "; ".join(dict.fromkeys(r.untimed for r in untimed)) + ".")
        if g.n == 1:
            against = "" if base is None or base is g else ", and no p-value against its baseline"
            notes.append(f"n = 1: no uncertainty can be given for {g.title}: one seed gives no standard "
                         f"deviation{against}.")
        elif base is not None and base is not g and base.n == 1:
            notes.append(f"n = 1: no uncertainty can be given for the difference between {g.title} and its "
                         f"baseline, which has one seed: there is no p-value.")
        if base is None:
            notes.append(f"No baseline with the same model, environment and training settings for {g.title}: "
                         "it has no speedup, memory ratio or accuracy difference.")
    if any(r.on_cpu for g in groups for r in g.runs):
        notes.append("On a CPU, peak memory is the process's peak resident memory (RSS, including the Python "
                     "interpreter and libraries): it is not comparable with CUDA's max_memory_allocated.")
    return notes


def _final_val_accuracy(run: Run) -> float:
    value = run.summary.get("final_val_accuracy")
    return float(run.epochs["val_acc"].iloc[-1]) if value is None else float(value)


def grid_table(groups: list[Group]) -> pd.DataFrame | None:
    """Long format, one row per (mode, other varying settings, lr, momentum, weight decay, model):
    n, mean final validation accuracy, and ``best``: the best combination of lr, momentum and weight
    decay for its model and mode, chosen by validation accuracy. None unless the runs vary lr,
    momentum or weight decay."""
    if all(len({g.setting.get(k) for g in groups}) <= 1 for k in GRID):
        return None
    rows = []
    for g in groups:
        others = {k: v for k, v in g.columns.items() if k not in GRID}
        rows.append({"mode": g.label, **others, **{k: g.setting.get(k) for k in GRID}, "model": g.model,
                     "n": g.n, "val_accuracy_mean": float(np.mean([_final_val_accuracy(r) for r in g.runs]))})
    table = pd.DataFrame(rows)
    selection = [c for c in table.columns if c not in (*GRID, "model", "n", "val_accuracy_mean")] + ["model"]
    best = table.groupby(selection, dropna=False, sort=False)["val_accuracy_mean"].transform("max")
    table["best"] = table["val_accuracy_mean"] == best
    return table


def grid_markdown(table: pd.DataFrame) -> str:
    """The grid as rows = combinations, columns = models (as the EfficientNet thesis's 3 x 3 x 3 table)."""
    combo = [c for c in table.columns if c not in ("model", "n", "val_accuracy_mean", "best")]
    models = list(dict.fromkeys(table["model"]))
    rank = {label: i for i, label in enumerate(dict.fromkeys(table["mode"]))}
    cells = {}
    for key, model, mean, best in zip(table[combo].itertuples(index=False), table["model"],
                                      table["val_accuracy_mean"], table["best"]):
        key = tuple(None if isinstance(v, float) and math.isnan(v) else v for v in key)  # NaN != NaN as a key
        cells[key, model] = f"**{100 * mean:.2f}**" if best else f"{100 * mean:.2f}"
    keys = sorted(dict.fromkeys(key for key, _ in cells), key=lambda k: (rank[k[0]], *(sort_key(v) for v in k[1:])))
    rows = [{**dict(zip(combo, key)), **{m: cells.get((key, m), "") for m in models}} for key in keys]
    return (markdown_table(pd.DataFrame(rows)) + "\n\n"
            "Cells: mean final validation accuracy (%) over seeds. Bold: the best lr, momentum and weight decay "
            "for each model and mode, selected by validation accuracy, never by test accuracy. grid.csv holds "
            "the same cells in long format, one row per cell, with n and a boolean `best`.\n")


def per_class_table(groups: list[Group]) -> pd.DataFrame:
    """Mean per-class test accuracy (fractions) per group over its seeds, with the 95% t interval of each mean
    (:func:`t_interval`): rows = classes in the runs' order, then "all"; per group the columns ``<title>`` (the mean),
    ``<title> ci95_low`` and ``<title> ci95_high`` (NaN for one seed)."""
    classes = list(groups[0].runs[0].summary["per_class_accuracy"])
    data = {}
    for g in groups:
        cells = [t_interval([as_float(r.summary["per_class_accuracy"].get(c)) for r in g.runs]) for c in classes]
        cells.append(t_interval(g.values("test_accuracy")))
        for i, suffix in enumerate(("", " ci95_low", " ci95_high")):
            data[g.title + suffix] = [cell[i] for cell in cells]
    return pd.DataFrame(data, index=pd.Index(classes + ["all"], name="class")).reset_index()


def per_class_markdown(table: pd.DataFrame, groups: list[Group]) -> str:
    """Per class and group, the mean test accuracy in % with its 95% interval in brackets, and the notes."""
    shown = pd.DataFrame({"class": table["class"]})
    for g in groups:
        cells = zip(table[g.title], table[f"{g.title} ci95_low"], table[f"{g.title} ci95_high"])
        shown[g.title] = [f"{_num(100 * m, '.2f')} {_interval(100 * lo, 100 * hi, '.2f')}".strip()
                          for m, lo, hi in cells]
    return (markdown_table(shown) + "\n\n"
            "Cells: mean test accuracy (%) per true class over seeds; \"all\" is the overall test accuracy. In "
            "brackets, the 95% confidence interval of that mean, from the t distribution over the group's n seeds "
            "(mean ± t(0.975, n-1) × sd / √n, n-1 degrees of freedom; none for one seed). It is not clipped to 0-100: "
            "an interval past either end says that the seeds are too few to bound that mean. It is "
            "the interval of each mode's own accuracy, so that the classes a mode finds hard, and how sure each "
            "number is, can be read off one table. It is not a test against the baseline: intervals that overlap "
            "here can still differ when paired by seed, so compare a mode with its baseline in the comparison "
            "table's paired columns. Each interval holds for its own cell; across 10 classes and every mode, some "
            "will miss by chance.\n")


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table of ``frame`` with aligned columns (pandas' to_markdown needs tabulate,
    which the study does not install). Missing values are empty cells."""
    def cell(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return (show_value(value) if isinstance(value, (float, tuple)) else str(value)).replace("|", "\\|")

    header = [cell(c) for c in frame.columns]
    rows = [[cell(v) for v in row] for row in frame.itertuples(index=False)]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def inference_table(root: Path) -> pd.DataFrame | None:
    """``root/bench_infer.csv`` (the inference benchmark's rows), or None if there is none. Raises
    :class:`BadRun` if it cannot be read."""
    frame = read_csv(root, INFERENCE_CSV, required=False)
    if frame is None:
        return None
    missing = [c for c in ("model", "mode", "dtype", "device_name", "memory_measure") if c not in frame.columns]
    if missing or frame.empty:
        raise BadRun(f"{INFERENCE_CSV} lacks the column(s) {', '.join(missing)}" if missing
                     else f"{INFERENCE_CSV} has no rows")
    return frame


def inference_markdown(frame: pd.DataFrame) -> str:
    """One row per benchmarked model x mode, in the CSV's order: latency mean ± std, speed-up and peak."""
    shown = pd.DataFrame({
        "model": frame["model"], "mode": frame["mode"], "precision": frame["dtype"],
        "input": [f"{b} x {s}x{s}" for b, s in zip(frame.batch_size, frame.image_size)],
        "latency (ms)": [_pm(m, s, ".2f") for m, s in zip(frame.mean_ms, frame.std_ms)],
        "speedup vs FP32": frame.get("speedup_vs_fp32", pd.Series(math.nan, index=frame.index)).map(
            lambda v: _num(v, ".2f")),
        "peak (MiB)": (frame.peak_memory_bytes / MIB).map(lambda v: _num(v, ",.0f")),
        "memory measure": frame["memory_measure"], "device": frame["device_name"], "repeats": frame["repeats"]})
    return (f"From `{INFERENCE_CSV}` (`python -m mixprec.bench_infer`): latency per forward pass over the "
            "repeats, after the warm-up passes.\n\n" + markdown_table(shown))


def step_bench_table(root: Path) -> pd.DataFrame | None:
    """The training-step benchmark (``experiments/bench_gpu.py``, the GPU study's speed-and-memory stage): its
    ``root/bench/<model>.csv`` rows that ran, one per model and variant, with each variant's images/s and peak
    memory against true FP32's (``fp32``) and images/s against amp's; None if there are none."""
    frames = []
    for path in sorted((root / STEP_BENCH).glob("*.csv")):
        if path.name == STEP_BENCH_TABLE + ".csv":
            continue
        try:
            frame = pd.read_csv(path)
        except (OSError, ValueError) as e:  # pandas' EmptyDataError and ParserError are ValueErrors
            raise BadRun(f"{STEP_BENCH}/{path.name} cannot be read ({e})") from None
        missing = [c for c in ("model", "variant", "batch_size", "median_step_s", "images_per_s", "peak_memory_bytes",
                               "device", "torch", "error") if c not in frame.columns]
        if missing:
            raise BadRun(f"{STEP_BENCH}/{path.name} lacks the column(s) {', '.join(missing)}")
        frames.append(frame)
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    rows = rows[rows["error"].isna()] if frames else rows  # a variant that failed has no numbers
    if rows.empty:
        return None
    by = rows.set_index(["model", "variant"])

    def ratio(model, variant, column, reference):
        return by.loc[(model, variant), column] / by.loc[(model, reference), column] \
            if (model, reference) in by.index else math.nan

    return pd.DataFrame([{
        "model": model, "variant": variant, "batch": int(r["batch_size"]), "step (ms)": 1e3 * r["median_step_s"],
        "images/s": r["images_per_s"], "vs FP32": ratio(model, variant, "images_per_s", "fp32"),
        "vs amp": ratio(model, variant, "images_per_s", "amp"), "peak (MiB)": r["peak_memory_bytes"] / MIB,
        "memory vs FP32": ratio(model, variant, "peak_memory_bytes", "fp32"), "device": r["device"],
        "torch": r["torch"]} for (model, variant), r in by.iterrows()])


# The speed targets the GPU study is held to: (model or None for every model, variant, against, least ratio)
STEP_TARGETS = (("resnet50", "amp", "fp32", 2.0), (None, "manual", "amp", 0.9))


def step_bench_markdown(frame: pd.DataFrame) -> str:
    """The training-step table, the seed thesis's T4 ratios beside it, and whether each speed target was met."""
    shown = frame.drop(columns=["device", "torch"]).round(
        {"step (ms)": 2, "images/s": 1, "vs FP32": 2, "vs amp": 2, "peak (MiB)": 0, "memory vs FP32": 2})
    lines = [f"From `{STEP_BENCH}/<model>.csv` (`experiments/bench_gpu.py`; {', '.join(sorted(set(frame.device)))}, "
             f"torch {', '.join(sorted(set(frame.torch)))}): one fixed batch on the device, the median step of the "
             "timed rounds after warm-up, the variants interleaved in one process; peak = the most memory allocated "
             "during one step, counting the variant's own tensors (on a CPU, the sum of its tensors by role). fp32 is "
             "baseline with --no-tf32 (true FP32), tf32 baseline as a GPU of compute capability 8.0 or newer runs it "
             "by default.", "", markdown_table(shown), "",
             "The seed thesis (Oreč 2021, Tesla T4, whole 50-60 epoch runs): AMP against FP32 2.0x (ResNet-18), 2.0x "
             "(ResNet-34) and 2.2x (ResNet-50) in time; peak memory 445/707 MB = 0.63, 788/1221 = 0.65, "
             "1883/3387 = 0.56.", ""]
    rows = frame.set_index(["model", "variant"])
    for model, variant, against, least in STEP_TARGETS:
        for m in [model] if model else sorted(set(frame.model)):
            if (m, variant) in rows.index and (m, against) in rows.index:
                value = rows.loc[(m, variant), "images/s"] / rows.loc[(m, against), "images/s"]
                lines.append(f"- {m}: {variant} / {against} images/s {value:.2f}x (target >= {least}): "
                             f"{'met' if value >= least else 'MISSED'}")
    return "\n".join(lines)


# steps.csv column -> the telemetry table's name for its mean over the measured steps (every --telemetry-every)
TELEMETRY = {
    "grad_zero_frac": "zero half gradients",
    "grad_underflow_frac": "gradients below FP16 normal unscaled",
    "fp8_grad_flushed_frac": "FP8 gradients flushed to 0",
    "fp8_grad_saturated_frac": "FP8 gradients saturated",
    "fp8_activation_saturated_frac": "FP8 activations saturated",
    "update_lost_frac": "updates lost to rounding",
    "update_lost_nearest_frac": "updates nearest rounding would lose",
    "decay_lost_frac": "weight decays lost to rounding",
}
# the same means over the steps of each run's last epoch only, where the lr of a decaying schedule is smallest
LAST_EPOCH = {"update_lost_frac": "updates lost to rounding, last epoch"}
SHOWN_SKIPS = 5  # skipped steps listed per seed


def _skips(run: Run) -> str:
    if run.steps is None:
        return ""
    steps = run.steps.loc[run.steps["skipped"], "step"].astype(int).tolist()
    shown = ", ".join(map(str, steps[:SHOWN_SKIPS])) + (", ..." if len(steps) > SHOWN_SKIPS else "")
    return f"seed {run.seed}: {len(steps)}" + (f" (steps {shown})" if steps else "")


def _mean_over_runs(columns: list[pd.Series]) -> float:
    """The mean of the runs' measured values together (NaN: not measured)."""
    values = pd.concat([pd.to_numeric(c, errors="coerce") for c in columns]).dropna() if columns else []
    return float(values.mean()) if len(values) else math.nan


def telemetry_table(groups: list[Group]) -> pd.DataFrame | None:
    """One row per group: skipped steps, and when, per seed; and each :data:`TELEMETRY` column's mean over the
    measured steps of all its seeds (fractions of elements). None when no run measured anything."""
    rows = []
    for g in groups:
        frames = [r.steps for r in g.runs if r.steps is not None]
        row = {"model": g.model, "mode": g.label, **g.columns, "n": g.n,
               "skipped_steps": "; ".join(filter(None, map(_skips, g.runs)))}
        for col in TELEMETRY:
            row[col] = _mean_over_runs([f[col] for f in frames if col in f])
        for col in LAST_EPOCH:
            row[f"{col}_last_epoch"] = _mean_over_runs([f.loc[f["epoch"] == f["epoch"].max(), col] for f in frames
                                                        if col in f and "epoch" in f])
        rows.append(row)
    table = pd.DataFrame(rows)
    return None if table[list(TELEMETRY)].isna().all().all() else table


def telemetry_markdown(table: pd.DataFrame, groups: list[Group]) -> str:
    extra = [c for c in table.columns if c in groups[0].columns]
    shown = pd.DataFrame({"model": table["model"], "mode": table["mode"], **{c: table[c] for c in extra},
                          "n": table["n"], "skipped steps": table["skipped_steps"],
                          **{f"{name} (%)": [_num(100 * v, ".3g") for v in table[col]]
                             for col, name in TELEMETRY.items() if table[col].notna().any()},
                          **{f"{name} (%)": [_num(100 * v, ".3g") for v in table[f"{col}_last_epoch"]]
                             for col, name in LAST_EPOCH.items() if table[f"{col}_last_epoch"].notna().any()}})
    return ("Skipped optimizer steps per seed, and the telemetry's means over the measured steps (`steps.csv`, "
            "every `--telemetry-every` steps), as percentages of the elements: exact zeros in the half gradients "
            "backward produced; unscaled gradients below FP16's smallest normal, 2^-14 (what FP16 would lose "
            "without loss scaling); FP8 gradients flushed to zero, FP8 gradients and activations saturated; without master "
            "weights, nonzero SGD updates and weight decays that rounding to the weights' precision swallowed, and with "
            "stochastic rounding or Kahan compensation what rounding the same updates to nearest would have lost (the "
            "updates also over the last epoch alone, where a decaying lr is smallest). Blank: not measured in "
            "that mode.\n\n" + markdown_table(shown))


LAYER_STATS = {"zero_frac": "zero as computed", "fp16_underflow_frac": "nonzero, 0 in FP16 at scale 1",
               "fp16_subnormal_frac": "subnormal in FP16 at scale 1"}  # layer_grads.csv's, as percentages


def layer_stats_table(groups: list[Group]) -> pd.DataFrame | None:
    """Per group with ``--layer-stats-every`` runs, per tensor (activation, weight gradients): the means over
    layers, measured steps and seeds of :data:`LAYER_STATS` (each layer weighs the same), the layer and step
    with the most of the underflow, and the least headroom to 65504 seen. None without such runs."""
    rows = []
    for g in groups:
        frames = [r.layers for r in g.runs if r.layers is not None]
        if not frames:
            continue
        table = pd.concat(frames)
        for tensor in ("activation", "weight"):
            t = table[table.tensor == tensor]
            by = {stat: t[t.statistic == stat] for stat in (*LAYER_STATS, "headroom_log2")}
            worst = by["fp16_underflow_frac"].groupby("layer")["value"].mean().sort_values(ascending=False)
            rows.append({"model": g.model, "mode": g.label, **g.columns, "n": len(frames), "tensor": tensor,
                         "steps": int(t.step.nunique()), "layers": int(t.layer.nunique()),
                         **{stat: float(by[stat].value.mean()) for stat in LAYER_STATS},
                         "most_underflow_layer": worst.index[0] if len(worst) else "",
                         "most_underflow_frac": float(worst.iloc[0]) if len(worst) else math.nan,
                         "least_headroom_log2": float(by["headroom_log2"].value.min())})
    return pd.DataFrame(rows) if rows else None


def layer_stats_markdown(table: pd.DataFrame, groups: list[Group]) -> str:
    extra = [c for c in table.columns if c in groups[0].columns]
    shown = pd.DataFrame({"model": table["model"], "mode": table["mode"], **{c: table[c] for c in extra},
                          "n": table["n"], "gradients": table["tensor"], "steps x layers": [
                              f"{s} x {n}" for s, n in zip(table["steps"], table["layers"])],
                          **{f"{name} (%)": [_num(100 * v, ".3g") for v in table[col]] for col, name in LAYER_STATS.items()},
                          "layer losing most at scale 1": [f"`{layer}` ({_num(100 * v, '.3g')}%)" for layer, v in
                                                           zip(table["most_underflow_layer"], table["most_underflow_frac"])],
                          "least headroom (binades)": [_num(v, ".1f") for v in table["least_headroom_log2"]]})
    return ("Per-layer gradient statistics (`--layer-stats-every`, `layer_grads.csv`): the gradients w.r.t. each "
            "Conv2d, BatchNorm and Linear layer's output (activation) and its weight, as the run's backward pass "
            "computed them at its loss scale. Means over layers, measured steps and seeds, each layer weighing the "
            "same, as percentages of the elements: exactly zero as computed (what FP16 flushed, with the zeros any "
            "precision has); nonzero but below 2^-24 once the scale is divided out (what FP16 would flush without "
            "loss scaling); subnormal there (2^-24 to 2^-14). The layer whose gradients would lose most at scale 1 "
            "(its mean), and the least headroom between the largest scaled gradient and 65504 at any step (below "
            "0: an overflow).\n\n" + markdown_table(shown))


def write_tables(out: Path, groups: list[Group]) -> dict[str, str]:
    """Write comparison, grid (when there is one), telemetry (when any run measured) and per-class tables as
    .csv and .md; return the markdown."""
    comparison = comparison_table(groups)
    write_csv(out / "comparison.csv", comparison)
    sections = {"findings": findings_markdown(comparison, groups),
                "comparison": comparison_markdown(comparison, groups)}
    # the optional tables: each written when the runs have what it shows, else removed (an earlier report's
    # table would contradict this one)
    for name, make, markdown in (("grid", grid_table, lambda t: grid_markdown(t)),
                                 ("telemetry", telemetry_table, lambda t: telemetry_markdown(t, groups)),
                                 ("layer_grads", layer_stats_table, lambda t: layer_stats_markdown(t, groups))):
        table = make(groups)
        if table is not None:
            write_csv(out / f"{name}.csv", table)
            sections[name] = markdown(table)
        else:
            for stale in (f"{name}.md", f"{name}.csv"):
                (out / stale).unlink(missing_ok=True)
    per_class = per_class_table(groups)
    write_csv(out / "per_class_accuracy.csv", per_class)
    sections["per_class_accuracy"] = per_class_markdown(per_class, groups)
    for name, text in sections.items():
        write_text(out / f"{name}.md", text)
    return sections
