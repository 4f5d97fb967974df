"""``python -m mixprec.report RESULTS_DIR [--out DIR]``: every run under RESULTS_DIR as tables and figures.

Finds the run directories under ``RESULTS_DIR`` (any directory holding ``config.json`` or
``summary.json``), counts the completed ones, and groups runs that differ only in their seed. A group is
one model in one mode with one set of options on one environment (device and torch version): runs
from different machines are never averaged together. Each group is compared with the baseline of the
same model, environment and training settings: speedup, memory ratio, accuracy difference and Welch's
t-test over seeds. Failed, interrupted and unreadable runs are not counted; they are named on stderr
and in the report.

Writes to ``--out`` (default ``RESULTS_DIR/report``), every file atomically:

- ``comparison.md``/``.csv``: one row per group (the CSV keeps raw numbers: means, stds and n apart);
- ``grid.md``/``.csv``: mean final validation accuracy per lr/momentum/weight-decay combination and
  model, when the runs vary those (the CSV is long: one row per cell, with a boolean ``best``);
- ``per_class_accuracy.md``/``.csv``: per-class test accuracy per group (the CSV in fractions);
- ``inference.md``: the inference benchmark's rows, when ``RESULTS_DIR/bench_infer.csv`` exists
  (``python -m mixprec.bench_infer`` writes it there with ``--out``; its default is ``results/``);
- ``confusion_matrices.png``, ``curves.png``, ``time_to_accuracy.png``, ``loss_scale.png`` (when a group has
  a loss scale) and ``memory.png``;
- ``report.md``: one page with the environments, the counted and uncounted runs, the tables and the figures.

Example::

    python -m mixprec.report results            # writes results/report/
    python -m mixprec.report results --out docs/report
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from .cli import OneLineParser as _OneLineParser
from .cli import UsageError
from .config import MODES, RunConfig
from .results import read_json, write_csv, write_figure, write_text

PROG = "python -m mixprec.report"
IGNORED = ("seed", "out", "data", "device")  # differ between the seeds or copies of one setting
TRAINING = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "subset", "test_subset",
            "accumulate", "clip_grad_norm", "deterministic", "tf32", "compile", "pretrained",
            "channels_last", "warmup_epochs", "label_smoothing", "nesterov", "test_time_flip")  # a baseline must match these
LABELLED = ("loss_scale", "on_min_scale", "master_weights", "fp16_batchnorm", "manual_dtype", "inject_overflow")
GRID = ("lr", "momentum", "weight_decay")
MEMORY_ROLES = ("weights", "master_weights", "grads", "optimizer_state", "activations")
MIB = 2**20
DPI = 150
INFERENCE_CSV = "bench_infer.csv"  # python -m mixprec.bench_infer --out RESULTS_DIR/bench_infer.csv
REQUIRED = {
    "config.json": ("mode", "model", "seed"),
    "env.json": ("torch", "device_name"),
    "summary.json": ("test_accuracy", "train_time_s", "peak_memory_bytes", "per_class_accuracy", "confusion_matrix"),
    "epochs.csv": ("epoch", "train_loss", "train_acc", "val_loss", "val_acc"),
    "steps.csv": ("step", "loss_scale", "skipped"),
    INFERENCE_CSV: ("image_size", "batch_size", "repeats", "mean_ms", "std_ms", "peak_memory_bytes"),
}
RERUN = "run `python -m mixprec.run --mode ...` or `python -m mixprec.study ...` first"


def _hashable(value):
    """JSON values as dictionary keys: lists become tuples."""
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


# an option missing from an older config.json ran at its default (e.g. compile, added later)
DEFAULTS = {f.name: _hashable(f.default) for f in fields(RunConfig) if f.default is not MISSING}


# ---------------------------------------------------------------------------------------------------------------
# loading


@dataclass
class Run:
    """One completed run directory, read back."""

    path: Path
    config: dict
    env: dict
    summary: dict
    epochs: pd.DataFrame
    steps: pd.DataFrame | None = None

    @property
    def seed(self):
        return self.config.get("seed")


@dataclass
class Excluded:
    """A run directory that is not counted: ``status`` is the run's own (failed, interrupted...) or
    ``unreadable`` for a corrupt or partial directory; ``reason`` says why, on one line."""

    path: Path
    status: str
    reason: str


class BadRun(Exception):
    """A run directory that cannot be read; the message is the reason."""


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _read_json(path: Path, name: str) -> dict:
    try:
        obj = read_json(path / name)
    except FileNotFoundError:
        raise BadRun(f"no {name}") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRun(f"{name} is not valid JSON ({_one_line(e)})") from None
    if not isinstance(obj, dict):
        raise BadRun(f"{name} is not a JSON object")
    return obj


def _require(obj: dict, name: str) -> dict:
    missing = [k for k in REQUIRED[name] if obj.get(k) is None]
    if missing:
        raise BadRun(f"{name} lacks {', '.join(missing)}")
    return obj


def _read_csv(path: Path, name: str, required: bool) -> pd.DataFrame | None:
    if not (path / name).exists() and not required:
        return None
    try:
        frame = pd.read_csv(path / name)
    except FileNotFoundError:
        raise BadRun(f"no {name}") from None
    except (OSError, ValueError) as e:  # pandas' EmptyDataError and ParserError are ValueErrors
        raise BadRun(f"{name} cannot be read ({_one_line(e)})") from None
    missing = [c for c in REQUIRED[name] if c not in frame.columns]
    if missing:
        raise BadRun(f"{name} lacks the column(s) {', '.join(missing)}")
    text = [c for c in REQUIRED[name] if c != "skipped" and not pd.api.types.is_numeric_dtype(frame[c])]
    if text:
        raise BadRun(f"{name}: column(s) {', '.join(text)} hold text, not numbers")
    if required and frame.empty:
        raise BadRun(f"{name} has no rows")
    return frame


def _check_summary(s: dict) -> None:
    """The numbers the report uses must be numbers: a hand-edited or truncated summary is unreadable."""
    for key in ("test_accuracy", "train_time_s", "peak_memory_bytes"):
        value = s[key]
        if not _is_number(value) or not math.isfinite(value):
            raise BadRun(f"summary.json: {key} is {value!r}, not a number")
    classes = s["per_class_accuracy"]
    cm = s["confusion_matrix"]
    if not isinstance(classes, dict) or not classes or not all(map(_is_number, classes.values())):
        raise BadRun("summary.json: per_class_accuracy is not a mapping of classes to accuracies")
    if (not isinstance(cm, list) or len(cm) != len(classes)
            or any(not isinstance(row, list) or len(row) != len(classes) or not all(map(_is_number, row))
                   for row in cm)):
        raise BadRun(f"summary.json: confusion_matrix is not {len(classes)} x {len(classes)} counts")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_run(path: Path) -> Run | Excluded:
    """Read one run directory: a :class:`Run` when it completed, else an :class:`Excluded` saying why.

    A failed or interrupted run needs only its summary; a completed one needs its config.json,
    env.json and epochs.csv too, and steps.csv is read when present."""
    path = Path(path)
    try:
        if not (path / "summary.json").exists():
            raise BadRun("no summary.json (still running, or killed before it could write one)")
        summary = _read_json(path, "summary.json")
        status = summary.get("status")
        if status is None:
            raise BadRun("summary.json has no status")
        if status != "completed":
            return Excluded(path, str(status), _one_line(summary.get("error") or "no error recorded"))
        if summary.get("test_accuracy") is None:
            raise BadRun("summary.json says completed but has no test_accuracy")
        _check_summary(_require(summary, "summary.json"))
        config = _require(_read_json(path, "config.json"), "config.json")
        env = _require(_read_json(path, "env.json"), "env.json")
        epochs = _read_csv(path, "epochs.csv", required=True)
        steps = _read_csv(path, "steps.csv", required=False)
    except BadRun as e:
        return Excluded(path, "unreadable", str(e))
    return Run(path, config, env, summary, epochs, steps)


def find_run_dirs(root: Path, skip: Path | None = None) -> list[Path]:
    """Every directory under ``root`` (itself included) holding a config.json or a summary.json,
    except ``skip`` and what is under it (the report's own output)."""
    skip = skip.resolve() if skip is not None else None
    found = []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if (Path(here) / d).resolve() != skip)
        if "config.json" in files or "summary.json" in files:
            found.append(Path(here))
    return sorted(found)


def load_results(root: Path, skip: Path | None = None) -> tuple[list[Run], list[Excluded]]:
    """All run directories under ``root``: the completed runs and the excluded ones.

    Raises :class:`UsageError` when ``root`` is missing, not a directory, or holds no run directory."""
    root = Path(root)
    if not root.exists():
        raise UsageError(f"{root} does not exist: {RERUN}, then pass the directory they wrote to (their --out)")
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory: pass the directory that `python -m mixprec.run` or "
                         "`python -m mixprec.study` wrote to (their --out, default results)")
    dirs = find_run_dirs(root, skip)
    if not dirs:
        raise UsageError(f"{root} holds no run directories: {RERUN}")
    runs, excluded = [], []
    for d in dirs:
        loaded = load_run(d)
        (runs if isinstance(loaded, Run) else excluded).append(loaded)
    return runs, excluded


# ---------------------------------------------------------------------------------------------------------------
# grouping


def settings(run: Run) -> dict:
    """What makes runs comparable: the config minus seed/out/data/device, with missing options at
    their defaults, and the resolved ``amp_dtype`` and ``half_compute`` from the summary in place of
    "auto" (an "auto" run and an explicit run of the same dtype are the same setting)."""
    s = {k: _hashable(v) for k, v in {**DEFAULTS, **run.config}.items() if k not in IGNORED}
    s["amp_dtype"] = run.summary.get("amp_dtype")
    s["half_compute"] = run.summary.get("half_compute", s.get("half_compute"))
    return s


def environment_label(env: dict) -> str:
    """``"CPU / torch 2.14.1"``, ``"NVIDIA A100-SXM4-40GB / torch 2.14.1"``: what a group's accuracies are pooled
    over. Every CPU computes the same arithmetic, so CPU runs from different CPU models are pooled; a GPU is its
    own environment (TF32, kernels), CUDA and CPU runs are never pooled, and neither are two torch versions."""
    device = "CPU" if env.get("device_type") == "cpu" else env.get("device_name")
    return f"{device} / torch {env.get('torch')}"


def machine_label(env: dict) -> str:
    """``"AMD EPYC (AVX2, 2 cores)"``: the machine a run's time and memory were measured on. Time and memory
    ratios compare only runs on the same machine."""
    if env.get("device_type") != "cpu":
        return str(env.get("device_name"))
    details = [str(env["cpu_capability"])] if env.get("cpu_capability") else []
    details += [f"{env['cpu_count']} cores"] if env.get("cpu_count") else []
    return f"{env.get('device_name')} ({', '.join(details)})" if details else str(env.get("device_name"))


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def mode_label(mode: str, setting: dict) -> str:
    """``baseline``, ``amp (bfloat16)``, ``manual``, ``manual (loss_scale=none)``: the mode with its
    autocast dtype and any non-default ablation option."""
    extras = [setting["amp_dtype"]] if mode == "amp" and setting.get("amp_dtype") else []
    if mode != "baseline":
        extras += [f"{k}={_show(setting[k])}" for k in LABELLED if k in setting and setting[k] != DEFAULTS.get(k)]
    return f"{mode} ({', '.join(extras)})" if extras else mode


@dataclass
class Group:
    """Runs that differ only in their seed. ``columns`` are the settings that tell it apart from
    other groups of its mode (shown as table columns); ``title`` names it uniquely."""

    model: str
    mode: str
    label: str
    setting: dict
    environment: str
    runs: list[Run]
    columns: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def short(self) -> str:
        """The title without the model: mode label, varying settings, environment."""
        parts = [f"{k}={_show(v)}" for k, v in self.columns.items() if k != "environment"]
        if "environment" in self.columns:
            parts.append(self.environment)
        return ", ".join([self.label, *parts])

    @property
    def title(self) -> str:
        return f"{self.model} / {self.short}"

    def values(self, key: str) -> pd.Series:
        """A summary value per run (seed), missing ones dropped."""
        return pd.Series([r.summary.get(key) for r in self.runs], dtype=float).dropna()


def _rank(value):
    """A sort key for setting values of mixed types: numbers in numeric order, then the rest as text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def varying_keys(groups: list[Group]) -> list[str]:
    """Settings that tell groups apart beyond model and mode label: a training setting that takes
    more than one value anywhere, or another option that varies within one mode (an option that only
    differs between modes, like the resolved half_compute, is part of what the mode is)."""
    skip = {"model", "mode", "amp_dtype", *LABELLED}
    keys = [k for k in dict.fromkeys(k for g in groups for k in g.setting) if k not in skip]
    out = []
    for key in keys:
        if key in TRAINING:
            varies = len({g.setting.get(key) for g in groups}) > 1
        else:
            varies = any(len({g.setting.get(key) for g in groups if g.mode == m}) > 1 for m in {g.mode for g in groups})
        if varies:
            out.append(key)
    return out


def group_runs(runs: list[Run]) -> list[Group]:
    """Group runs that differ only in seed, sorted by model, then baseline, amp, manual."""
    by_key: dict = {}
    for run in sorted(runs, key=lambda r: (_rank(r.seed), str(r.path))):
        s = settings(run)
        env = environment_label(run.env)
        key = (env, tuple(sorted(s.items())))
        if key not in by_key:
            mode = str(s.get("mode"))
            by_key[key] = Group(str(s.get("model")), mode, mode_label(mode, s), s, env, [])
        by_key[key].runs.append(run)
    groups = list(by_key.values())
    varying = varying_keys(groups)
    several_envs = len({g.environment for g in groups}) > 1
    for g in groups:
        g.columns = {k: g.setting.get(k) for k in varying}
        if several_envs:
            g.columns["environment"] = g.environment
    return sorted(groups, key=lambda g: (g.model, MODES.index(g.mode) if g.mode in MODES else len(MODES), g.label,
                                         tuple(_rank(g.setting.get(k)) for k in varying), g.environment))


def find_baseline(group: Group, groups: list[Group]) -> Group | None:
    """The baseline group with the same model, environment and training settings (itself for a baseline)."""
    if group.mode == "baseline":
        return group
    for g in groups:
        if (g.mode == "baseline" and g.model == group.model and g.environment == group.environment
                and all(g.setting.get(k) == group.setting.get(k) for k in TRAINING)):
            return g
    return None


# ---------------------------------------------------------------------------------------------------------------
# statistics and tables


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
    """``(run, baseline run)`` for each of ``group``'s runs that has a baseline run of the same seed on the same
    machine: the only pairs whose time and memory may be compared."""
    pairs = []
    for run in group.runs:
        match = next((b for b in base.runs if b.seed == run.seed and machine_label(b.env) == machine_label(run.env)),
                     None)
        if match is not None:
            pairs.append((run, match))
    return pairs


def paired_ratios(group: Group, base: Group) -> dict:
    """Speedup (the baseline's mean training time over this group's) and memory ratio (this group's mean peak
    over the baseline's), over the seeds paired on the same machine, and the machines they were measured on."""
    pairs = paired_runs(group, base)
    if not pairs:
        return {"speedup_vs_baseline": math.nan, "memory_ratio_vs_baseline": math.nan, "ratios_measured_on": ""}
    total = lambda key, side: sum(_float(p[side].summary.get(key)) for p in pairs)  # noqa: E731
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
        rows.append(row)
    table = pd.DataFrame(rows)
    for col in ("speedup_vs_baseline", "memory_ratio_vs_baseline", "accuracy_diff_pp", "accuracy_diff_ci95_low_pp",
                "accuracy_diff_ci95_high_pp", "welch_p"):
        if col not in table:
            table[col] = math.nan
    if "ratios_measured_on" not in table:
        table["ratios_measured_on"] = ""
    table["ratios_measured_on"] = table["ratios_measured_on"].fillna("")
    order = [c for c in table.columns if c not in ("skipped_steps_mean", "final_loss_scale_mean")]
    return table[order + ["skipped_steps_mean", "final_loss_scale_mean"]]


def _num(value, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _pm(mean, std, spec: str) -> str:
    """``mean ± std``, or the mean alone when there is no std (one seed)."""
    if _num(mean, spec) == "":
        return ""
    return format(mean, spec) + ("" if _num(std, spec) == "" else f" ± {std:{spec}}")


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
        "95% CI (pp)": ["" if _num(lo, ".2f") == "" else f"[{lo:+.2f}, {hi:+.2f}]"
                        for lo, hi in zip(table["accuracy_diff_ci95_low_pp"], table["accuracy_diff_ci95_high_pp"])],
        "Welch p": [_num(v, ".3g") for v in table["welch_p"]],
        "skipped steps": [_num(v, "g") for v in table["skipped_steps_mean"]],
        "final loss scale": [_loss_scales(g) for g in groups],
    })
    return markdown_table(shown) + "\n\n" + "\n".join(f"- {note}" for note in comparison_notes(groups)) + "\n"


def comparison_notes(groups: list[Group]) -> list[str]:
    """What the columns mean, and every place where one seed leaves a number without its uncertainty."""
    notes = [("Mean ± sample standard deviation over seeds (n). Speedup is the baseline's mean training time over "
              "this mode's and memory this mode's mean peak over the baseline's, both only over the seeds that ran "
              "in both modes on the same machine (named under 'ratios measured on'); accuracies are pooled over "
              "all the environment's runs, whatever CPU model ran them (CPU and CUDA runs never). The accuracy "
              "difference is in "
              "percentage points, with the 95% confidence interval of the difference and the two-sided p-value of "
              "Welch's t-test of the test accuracies over seeds (Welch-Satterthwaite degrees of freedom). The "
              "baseline is the one with the same model, environment and training settings.")]
    if any(g.mode == "amp" and g.setting.get("half_compute") == "emulated" for g in groups):
        notes.append("amp with half_compute emulated (the CPU default) is torch.autocast to its dtype with "
                     "torch.amp.GradScaler for float16, its convolutions, linears and matmuls computed as emulated "
                     "tensor-core arithmetic (half operands, FP32 accumulation): the same recipe as on a GPU, at "
                     "FP32's speed. amp (bfloat16) runs have no loss scaler.")
    for g in groups:
        base = find_baseline(g, groups)
        if base is not None and base is not g and 0 < len(paired_runs(g, base)) < g.n:
            notes.append(f"{g.title}: time and memory ratios from {len(paired_runs(g, base))} of its {g.n} seeds, the "
                         "ones with a baseline run of the same seed on the same machine.")
        elif base is not None and base is not g and not paired_runs(g, base):
            notes.append(f"{g.title}: no baseline run of the same seed on the same machine, so no time or memory "
                         "ratio.")
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
    if any(_on_cpu(r) for g in groups for r in g.runs):
        notes.append("On a CPU, peak memory is the process's peak resident memory (RSS, including the Python "
                     "interpreter and libraries): it is not comparable with CUDA's max_memory_allocated.")
    return notes


def _on_cpu(run: Run) -> bool:
    return str(run.summary.get("device") or run.env.get("device_type")).startswith("cpu")


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
    keys = sorted(dict.fromkeys(key for key, _ in cells), key=lambda k: (rank[k[0]], *(_rank(v) for v in k[1:])))
    rows = [{**dict(zip(combo, key)), **{m: cells.get((key, m), "") for m in models}} for key in keys]
    return (markdown_table(pd.DataFrame(rows)) + "\n\n"
            "Cells: mean final validation accuracy (%) over seeds. Bold: the best lr, momentum and weight decay "
            "for each model and mode, selected by validation accuracy, never by test accuracy. grid.csv holds "
            "the same cells in long format, one row per cell, with n and a boolean `best`.\n")


def per_class_table(groups: list[Group]) -> pd.DataFrame:
    """Mean per-class test accuracy (fractions) per group: rows = classes in the runs' order, then "all"."""
    classes = list(groups[0].runs[0].summary["per_class_accuracy"])
    data = {}
    for g in groups:
        per_class = [float(np.nanmean([_float(r.summary["per_class_accuracy"].get(c)) for r in g.runs]))
                     for c in classes]
        data[g.title] = per_class + [g.values("test_accuracy").mean()]
    return pd.DataFrame(data, index=pd.Index(classes + ["all"], name="class")).reset_index()


def _float(value) -> float:
    return math.nan if value is None else float(value)


def per_class_markdown(table: pd.DataFrame) -> str:
    shown = table.copy()
    for col in shown.columns[1:]:
        shown[col] = [_num(100 * v, ".2f") for v in shown[col]]
    return (markdown_table(shown) + "\n\n"
            "Cells: mean test accuracy (%) per true class over seeds; \"all\" is the overall test accuracy.\n")


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table of ``frame`` with aligned columns (pandas' to_markdown needs tabulate,
    which the study does not install). Missing values are empty cells."""
    def cell(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return (_show(value) if isinstance(value, (float, tuple)) else str(value)).replace("|", "\\|")

    header = [cell(c) for c in frame.columns]
    rows = [[cell(v) for v in row] for row in frame.itertuples(index=False)]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def inference_table(root: Path) -> pd.DataFrame | None:
    """``root/bench_infer.csv`` (the inference benchmark's rows), or None if there is none. Raises
    :class:`BadRun` if it cannot be read."""
    frame = _read_csv(root, INFERENCE_CSV, required=False)
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


# ---------------------------------------------------------------------------------------------------------------
# figures (matplotlib's object-oriented API: no pyplot state, so nothing leaks between figures)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _by_model(groups: list[Group]) -> dict[str, list[Group]]:
    out: dict[str, list[Group]] = {}
    for g in groups:
        out.setdefault(g.model, []).append(g)
    return out


def normalized_confusion(group: Group) -> np.ndarray:
    """The confusion matrix summed over seeds, each row (true class) divided by its count."""
    cm = sum(np.asarray(r.summary["confusion_matrix"], dtype=float) for r in group.runs)
    totals = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)


def confusion_figure(groups: list[Group]):
    """One normalized confusion matrix per group: rows of panels = models, columns = its groups."""
    from sklearn.metrics import ConfusionMatrixDisplay

    classes = list(groups[0].runs[0].summary["per_class_accuracy"])
    per_model = _by_model(groups)
    ncols = max(map(len, per_model.values()))
    fig = _figure(4.8 * ncols + 1.0, 4.6 * len(per_model))
    axes = fig.subplots(len(per_model), ncols, squeeze=False)
    image = None
    for row, model_groups in zip(axes, per_model.values()):
        for ax, g in zip(row, model_groups):
            cm = normalized_confusion(g)
            shown = ConfusionMatrixDisplay(cm, display_labels=classes).plot(
                ax=ax, values_format=".2f", colorbar=False, cmap="Blues", xticks_rotation=45,
                im_kw={"vmin": 0.0, "vmax": 1.0}, text_kw={"fontsize": 6})
            for (i, j), text in np.ndenumerate(shown.text_):  # contrast against the shared 0..1 scale
                text.set_color("white" if cm[i, j] > 0.5 else "black")
            ax.set_title(f"{g.title} (n={g.n})", fontsize=9)
            ax.set_xlabel("predicted class")
            ax.set_ylabel("true class")
            ax.tick_params(labelsize=7)
            for label in ax.get_xticklabels():  # rotated names end under their column
                label.set(ha="right", rotation_mode="anchor")
            image = shown.im_
        for ax in row[len(model_groups):]:
            ax.set_axis_off()
    fig.colorbar(image, ax=axes, shrink=0.6, label="fraction of the true class")
    fig.suptitle("Test-set confusion matrices, summed over seeds, normalized per true class")
    return fig


def _palette(groups: list[Group]) -> dict[str, str]:
    """One colour per mode label (the same in every model's panels); tab20 when tab10 would repeat."""
    from matplotlib import colormaps

    shorts = list(dict.fromkeys(g.short for g in groups))
    cmap = colormaps["tab10" if len(shorts) <= 10 else "tab20"]
    return {short: cmap(i % cmap.N) for i, short in enumerate(shorts)}


def curves_figure(groups: list[Group]):
    """Loss and accuracy per epoch: train solid, validation dashed, mean over seeds, min..max shaded."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    per_model, palette = _by_model(groups), _palette(groups)
    fig = _figure(11.0, 3.6 * len(per_model))
    axes = fig.subplots(len(per_model), 2, squeeze=False)
    for (ax_loss, ax_acc), (model, model_groups) in zip(axes, per_model.items()):
        epochs = pd.concat([r.epochs for g in model_groups for r in g.runs])["epoch"]
        span = (epochs.min() - 0.5, epochs.max() + 0.5)  # a one-epoch run is still a readable point at 1
        for g in model_groups:
            epochs = pd.concat([r.epochs for r in g.runs])
            for ax, metric, scale in ((ax_loss, "loss", 1.0), (ax_acc, "acc", 100.0)):
                for split, style in (("train", "-"), ("val", "--")):
                    stats = epochs.groupby("epoch")[f"{split}_{metric}"].agg(["mean", "min", "max"]) * scale
                    ax.plot(stats.index, stats["mean"], style, color=palette[g.short], lw=1.5,
                            marker="o" if len(stats) <= 15 else None, ms=3)
                    if g.n > 1:
                        ax.fill_between(stats.index, stats["min"], stats["max"], color=palette[g.short], alpha=0.15,
                                        lw=0)
        for ax, what, unit in ((ax_loss, "loss", "cross-entropy loss"), (ax_acc, "accuracy", "accuracy (%)")):
            ax.set_title(f"{model}: {what}")
            ax.set_xlabel("epoch")
            ax.set_ylabel(unit)
            ax.set_xlim(span)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            ax.grid(alpha=0.3)
        handles = [Line2D([], [], color=palette[g.short], label=g.short) for g in model_groups]
        handles += [Line2D([], [], color="0.3", ls="-", label="train"),
                    Line2D([], [], color="0.3", ls="--", label="validation")]
        ax_acc.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # off the data
    return fig


def time_to_accuracy_figure(groups: list[Group]):
    """Validation accuracy against training wall-clock time (evaluation excluded), a panel per model: each
    group's mean over seeds at the end of every epoch, with the seeds' min..max accuracy shaded. Time on a
    CPU says nothing about a GPU (docs/gpu.md); each line is one environment's."""
    from matplotlib.lines import Line2D

    per_model, palette = _by_model(groups), _palette(groups)
    ncols = min(2, len(per_model))
    fig = _figure(6.4 * ncols, 3.8 * math.ceil(len(per_model) / ncols))
    axes = fig.subplots(math.ceil(len(per_model) / ncols), ncols, squeeze=False).ravel()
    for ax, (model, model_groups) in zip(axes, per_model.items()):
        for g in model_groups:
            curves = []
            for r in g.runs:
                e = r.epochs.sort_values("epoch")
                curves.append(pd.DataFrame({"epoch": e["epoch"], "time": e["epoch_time_s"].cumsum(),
                                            "acc": 100.0 * e["val_acc"]}))
            stats = pd.concat(curves).groupby("epoch").agg(time=("time", "mean"), mean=("acc", "mean"),
                                                           low=("acc", "min"), high=("acc", "max"))
            ax.plot(stats["time"], stats["mean"], color=palette[g.short], lw=1.5,
                    marker="o" if len(stats) <= 15 else None, ms=3)
            if g.n > 1:
                ax.fill_between(stats["time"], stats["low"], stats["high"], color=palette[g.short], alpha=0.15, lw=0)
        ax.set_title(f"{model}: validation accuracy against training time")
        ax.set_xlabel("training time (s, evaluation excluded)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(handles=[Line2D([], [], color=palette[g.short], label=f"{g.short} (n={g.n})") for g in model_groups],
                  fontsize=8, loc="lower right")
    for ax in axes[len(per_model):]:
        ax.set_axis_off()
    return fig


def _skipped(steps: pd.DataFrame) -> pd.Series:
    return steps["skipped"].astype(str).str.lower().isin(("true", "1", "1.0"))


def has_loss_scale(group: Group) -> bool:
    """Whether any of the group's runs recorded a loss scale (bfloat16 amp and baseline have none)."""
    return group.mode != "baseline" and any(r.steps is not None and r.steps["loss_scale"].notna().any()
                                            for r in group.runs)


def loss_scale_figure(groups: list[Group]):
    """The loss scale per optimizer step (log2 axis), one panel per model, environment and seed with the
    scaled variants overlaid (GradScaler in amp, ours in manual), skipped steps as red crosses; None when no
    group has a loss scale."""
    from matplotlib.ticker import MaxNLocator

    scaled = [g for g in groups if has_loss_scale(g)]
    if not scaled:
        return None
    panels: dict[tuple, list[tuple[int, Group, Run]]] = {}
    for i, g in enumerate(scaled):
        for run in g.runs:
            if run.steps is not None:
                panels.setdefault((g.model, g.environment, run.seed), []).append((i, g, run))
    environments = {g.environment for g in scaled}
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(6.4 * ncols, 3.4 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, ((model, environment, seed), lines) in zip(axes, sorted(panels.items())):
        marked = False
        for i, g, run in lines:
            steps = run.steps.dropna(subset=["loss_scale"])
            ax.plot(steps["step"], steps["loss_scale"], color=f"C{i % 10}", lw=1.2, drawstyle="steps-post",
                    ls="--" if g.mode == "amp" else "-", zorder=3 if g.mode == "amp" else 2,  # dashed on top: seen
                    # where the two scalers agree
                    label=g.label + (f" ({_scaler_name(g)})" if _scaler_name(g) else ""))
            skipped = steps[_skipped(steps)]
            if len(skipped):
                ax.plot(skipped["step"], skipped["loss_scale"], "x", color="red", ms=6, mew=1.5,
                        label=None if marked else "skipped step")
                marked = True
        ax.set_yscale("log", base=2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_title(f"{model}, seed {seed}" + (f" ({environment})" if len(environments) > 1 else ""), fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss scale")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    return fig


def _scaler_name(group: Group) -> str:
    return {"amp": "torch.amp.GradScaler", "manual": "DynamicLossScaler"}.get(group.mode, "")


def memory_means(group: Group) -> dict[str, float]:
    """Mean MiB per memory role over the runs that measured it (0 where none did)."""
    measured = [r.summary.get("memory") for r in group.runs if isinstance(r.summary.get("memory"), dict)]
    return {role: float(np.mean([_float(m.get(role)) for m in measured])) / MIB if measured else 0.0
            for role in MEMORY_ROLES}


def memory_figure(groups: list[Group]):
    """Left: a stacked bar per group of the mean memory by role; right: the mean peak memory."""
    fig = _figure(11.5, 1.6 + 0.45 * len(groups))
    ax_roles, ax_peak = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    y = np.arange(len(groups))
    left = np.zeros(len(groups))
    means = [memory_means(g) for g in groups]
    for i, role in enumerate(MEMORY_ROLES):
        widths = np.array([m[role] for m in means])
        ax_roles.barh(y, widths, left=left, color=f"C{i}", label=role.replace("_", " "))
        left += widths
    ax_roles.set_yticks(y, [g.title for g in groups], fontsize=8)
    ax_roles.invert_yaxis()
    ax_roles.set_xlabel("MiB (mean over seeds, measured on the first training step)")
    ax_roles.set_title("memory by role")
    peaks = np.array([g.values("peak_memory_bytes").mean() / MIB for g in groups])
    on_cpu = np.array([any(_on_cpu(r) for r in g.runs) for g in groups])
    for mask, label, color in ((on_cpu, "peak RSS (CPU process)", "0.55"), (~on_cpu, "peak (device)", "0.25")):
        if mask.any():
            ax_peak.barh(y[mask], peaks[mask], color=color, label=label)
    ax_peak.set_xlabel("MiB (mean over seeds)")
    ax_peak.set_title("peak memory")
    handles = [h for ax in (ax_roles, ax_peak) for h in ax.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=len(handles))  # below, off the bars
    for ax in (ax_roles, ax_peak):
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    return fig


def has_fp8_telemetry(group: Group) -> bool:
    """Whether any of the group's runs measured FP8 telemetry (``--manual-dtype float8``)."""
    return any(r.steps is not None and "fp8_grad_scale" in r.steps and r.steps["fp8_grad_scale"].notna().any()
               for r in group.runs)


def fp8_figure(groups: list[Group]):
    """FP8 telemetry per optimizer step: rows saturated fraction, flushed-to-zero fraction and scale (geometric
    mean over the FP8 layers), columns weights, activations, gradients; one colour per group, one line per seed.
    None when no group trained in FP8."""
    from .fp8 import ROLES, STATS

    fp8 = [g for g in groups if has_fp8_telemetry(g)]
    if not fp8:
        return None
    fig = _figure(13.0, 8.0)
    axes = fig.subplots(len(STATS), len(ROLES), sharex=True, squeeze=False)
    for i, g in enumerate(fp8):
        for k, run in enumerate(r for r in g.runs if r.steps is not None):
            steps = run.steps.dropna(subset=["fp8_grad_scale"])
            for row, stat in enumerate(STATS):
                for col, role in enumerate(ROLES):
                    axes[row][col].plot(steps["step"], steps[f"fp8_{role}_{stat}"], color=f"C{i % 10}", lw=1,
                                        label=g.title if k == 0 else None)
    for col, role in enumerate(("weights (E4M3)", "activations (E4M3)", "gradients (E5M2)")):
        axes[0][col].set_title(role, fontsize=10)
        axes[-1][col].set_xlabel("optimizer step")
        for row in range(len(STATS)):
            ax = axes[row][col]
            if row < 2:
                ax.set_yscale("symlog", linthresh=1e-6)  # zero stays on the axis
            else:
                ax.set_yscale("log", base=2)
            ax.grid(alpha=0.3)
    for row, label in enumerate(("saturated fraction", "flushed-to-zero fraction", "scale (geometric mean)")):
        axes[row][0].set_ylabel(label)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", fontsize=8,
               ncols=min(4, len(fp8)))
    return fig


# ---------------------------------------------------------------------------------------------------------------
# report.md and the command line

CAPTIONS = {
    "confusion_matrices.png": "Test-set confusion matrices per group, summed over seeds and normalized per true "
                              "class (each row sums to 1).",
    "curves.png": "Training (solid) and validation (dashed) loss and accuracy per epoch, mean over seeds with the "
                  "min..max range of the seeds shaded.",
    "time_to_accuracy.png": "Validation accuracy against training wall-clock time (evaluation excluded) at the end "
                            "of each epoch, mean over seeds with the min..max range of the seeds shaded. Times are "
                            "those of the machine each group ran on; on a CPU they say nothing about a GPU.",
    "loss_scale.png": "The loss scale at every optimizer step (log2 axis), one panel per seed: PyTorch's GradScaler "
                      "(amp) and ours (manual) overlaid; red crosses mark the steps skipped on overflow.",
    "memory.png": "Mean memory by role, measured on the first training step (left), and the mean peak memory "
                  "(right; on a CPU the process's peak resident memory).",
    "fp8.png": "FP8 telemetry (--manual-dtype float8) at the measured steps (every --telemetry-every): the fraction "
               "of elements saturated (where a plain cast would have overflowed), the fraction flushed to zero "
               "(nonzero in, zero out), over all FP8 layers, and the geometric mean of their scales, for weights "
               "and activations (E4M3) and output gradients (E5M2, which include the loss scale).",
}


def environments_markdown(runs: list[Run]) -> str:
    """One row per distinct environment, with how many counted runs ran on it."""
    rows = []
    for r in runs:
        e = r.env
        commit = (e.get("git_commit") or "")[:12] + (" (dirty)" if e.get("git_dirty") else "")
        rows.append({"device": e.get("device_name"), "device type": e.get("device_type"), "torch": e.get("torch"),
                     "CUDA": e.get("cuda"), "CPU": e.get("cpu"), "CPU capability": e.get("cpu_capability"),
                     "git commit": commit})
    frame = pd.DataFrame(rows).fillna("").astype(str)
    counted = frame.groupby(list(frame.columns), sort=False, dropna=False).size().reset_index(name="runs")
    return markdown_table(counted)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve())) or "."
    except ValueError:
        return str(path)


def report_markdown(root: Path, runs: list[Run], groups: list[Group], excluded: list[Excluded],
                    sections: dict[str, str], figures: list[str]) -> str:
    """The one-page report.md: environments, runs counted and not, each table and each figure."""
    lines = ["# Mixed-precision study: report", "",
             (f"Generated by `{PROG} {root}` from the run directories under `{root}`. Do not edit by hand: "
              "rerun the command."), "", "## Environment", "", environments_markdown(runs), "",
             "## Runs", "",
             f"{len(runs)} completed run(s) counted, in {len(groups)} group(s) of runs that differ only in seed."]
    if excluded:
        lines += ["", f"{len(excluded)} run director{'y' if len(excluded) == 1 else 'ies'} not counted:", ""]
        lines += [f"- `{_relative(e.path, root)}`: {e.status}: {e.reason}" for e in excluded]
    titles = {"comparison": "Comparison with the baseline", "grid": "Hyperparameter grid",
              "per_class_accuracy": "Per-class test accuracy", "inference": "Inference latency and memory"}
    for name, text in sections.items():
        lines += ["", f"## {titles[name]}", "", text.rstrip()]
    lines += ["", "## Figures"]
    for name, caption in CAPTIONS.items():
        if name in figures:
            lines += ["", f"![{name[:-4].replace('_', ' ')}]({name})", "", caption]
        elif name == "loss_scale.png":
            lines += ["", ("No loss-scale figure: no run had a loss scale (baseline runs and bfloat16 amp runs "
                           "have none).")]
    return "\n".join(lines) + "\n"


def make_report(root: Path, out: Path | None = None) -> str:
    """Read ``root``, write the report into ``out`` (default ``root/report``), and return the tables as text.

    Excluded runs are named on stderr. Raises :class:`UsageError` when there is nothing to report or
    ``out`` cannot be written."""
    root = Path(root)
    out = Path(out) if out is not None else root / "report"
    runs, excluded = load_results(root, skip=out)
    for e in excluded:
        kind = "warning: skipping" if e.status == "unreadable" else "note: not counting"
        print(f"{PROG}: {kind} {e.path}: {e.status}: {e.reason}", file=sys.stderr)
    if not runs:
        raise UsageError(f"{root} holds no completed runs ({len(excluded)} not counted, see above): {RERUN}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        groups = group_runs(runs)
        sections = write_tables(out, groups)
        try:
            inference = inference_table(root)
        except BadRun as e:
            print(f"{PROG}: warning: no inference table: {e}", file=sys.stderr)
            inference = None
        if inference is not None:
            sections["inference"] = inference_markdown(inference)
            write_text(out / "inference.md", sections["inference"])
        else:  # an earlier report's table would contradict this one
            (out / "inference.md").unlink(missing_ok=True)
        figures = write_figures(out, groups)
        write_text(out / "report.md", report_markdown(root, runs, groups, excluded, sections, figures))
    except OSError as e:
        raise UsageError(f"cannot write the report to --out {out} ({e.strerror or e}); pass a writable "
                         "directory") from None
    return "\n\n".join(f"{name}.md\n\n{text.rstrip()}" for name, text in sections.items()) + \
        f"\n\nreport written to {out / 'report.md'}"


def write_tables(out: Path, groups: list[Group]) -> dict[str, str]:
    """Write comparison, grid (when there is one) and per-class tables as .csv and .md; return the markdown."""
    comparison = comparison_table(groups)
    write_csv(out / "comparison.csv", comparison)
    sections = {"comparison": comparison_markdown(comparison, groups)}
    grid = grid_table(groups)
    if grid is not None:
        write_csv(out / "grid.csv", grid)
        sections["grid"] = grid_markdown(grid)
    else:  # a grid from an earlier report would contradict this one
        for stale in ("grid.md", "grid.csv"):
            (out / stale).unlink(missing_ok=True)
    per_class = per_class_table(groups)
    write_csv(out / "per_class_accuracy.csv", per_class)
    sections["per_class_accuracy"] = per_class_markdown(per_class)
    for name, text in sections.items():
        write_text(out / f"{name}.md", text)
    return sections


def write_figures(out: Path, groups: list[Group]) -> list[str]:
    """Write the PNGs (dpi 150); return the names written (loss_scale.png only when a group has a scale)."""
    written = []
    for name, make in (("confusion_matrices.png", confusion_figure), ("curves.png", curves_figure),
                       ("time_to_accuracy.png", time_to_accuracy_figure), ("loss_scale.png", loss_scale_figure),
                       ("memory.png", memory_figure), ("fp8.png", fp8_figure)):
        fig = make(groups)
        if fig is None:
            (out / name).unlink(missing_ok=True)  # an earlier report's figure would contradict this one
            continue
        write_figure(out / name, fig)
        written.append(name)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog=PROG,
        description="Summarize the run directories under RESULTS_DIR: comparison, grid and per-class tables "
        "(markdown and CSV), figures, and report.md.",
    )
    p.add_argument("results_dir", metavar="RESULTS_DIR",
                   help="a directory holding run directories, searched recursively (the runs' --out, e.g. results)")
    p.add_argument("--out", metavar="DIR", default=None, help="where to write the report (default: RESULTS_DIR/report)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    try:
        text = make_report(Path(args.results_dir), Path(args.out) if args.out else None)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
