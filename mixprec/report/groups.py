"""Grouping runs that differ only in their seed, labelling the groups, and finding each group's baseline.
Imports :mod:`.runs`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pandas as pd

from ..config import MODES, defaults, options_with
from .runs import Run

IGNORED = options_with("copy")  # differ between the seeds or copies of one setting
TRAINING = options_with("training")  # a baseline must match these
TIMED = ("train_time_s", "images_per_s", "warmup_time_s")  # summary values that a shared machine corrupts
LABELLED = options_with("label")  # named in a mode's label when not at their default


def _hashable(value):
    """JSON values as dictionary keys: lists become tuples."""
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


# an option missing from an older config.json ran at its default (e.g. compile, added later)
DEFAULTS = {name: _hashable(value) for name, value in defaults().items()}


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


NONE_SHOWN = {"subset": "all", "test_subset": "all"}  # what an option left at None means, where "None" would not say


def show_value(value) -> str:
    """A setting's value as labels and tables show it: a float in ``%g`` form (5e-4 as 0.0005, 1.0 as 1), a tuple
    as its items joined by commas (``inject_overflow=3,5``), anything else as ``str`` does."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def mode_label(mode: str, setting: dict) -> str:
    """``baseline``, ``amp (bfloat16)``, ``manual``, ``manual (loss_scale=none)``: the mode with its
    autocast dtype and any non-default ablation option."""
    extras = [setting["amp_dtype"]] if mode == "amp" and setting.get("amp_dtype") else []
    if mode != "baseline":
        extras += [f"{k}={show_value(setting[k])}" for k in LABELLED if k in setting and setting[k] != DEFAULTS.get(k)]
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
    def loss_scaler(self) -> str | None:
        """Which loss scaler the group's runs trained with (see :func:`mixprec.report.runs.loss_scaler`)."""
        return self.runs[0].summary.get("loss_scaler")

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def short(self) -> str:
        """The title without the model: mode label, varying settings, environment."""
        parts = [f"{k}={NONE_SHOWN.get(k, 'none') if v is None else show_value(v)}" for k, v in self.columns.items()
                 if k != "environment" and applies(k, self.setting)]
        if "environment" in self.columns:
            parts.append(self.environment)
        return ", ".join([self.label, *parts])

    @property
    def title(self) -> str:
        return f"{self.model} / {self.short}"

    @property
    def timed_runs(self) -> list[Run]:
        """The runs whose times count: all but those ``timings-excluded.json`` names."""
        return [r for r in self.runs if r.untimed is None]

    @property
    def untimed_runs(self) -> list[Run]:
        """The runs ``timings-excluded.json`` names: counted for accuracy and peak memory, not for times."""
        return [r for r in self.runs if r.untimed is not None]

    def subset(self, seeds) -> Group:
        """The same group with only the runs of ``seeds`` (to pair it with another group seed by seed)."""
        return replace(self, runs=[r for r in self.runs if r.seed in set(seeds)])

    def values(self, key: str) -> pd.Series:
        """A summary value per run (seed), missing ones dropped; a time or speed only of the timed runs."""
        runs = self.timed_runs if key in TIMED else self.runs
        return pd.Series([r.summary.get(key) for r in runs], dtype=float).dropna()


def applies(key: str, setting: dict) -> bool:
    """Whether an option means anything in a setting: the FP8 options only in an FP8 run."""
    return key not in options_with("fp8") or setting.get("fp8", "off") != "off"


def sort_key(value):
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
    for run in sorted(runs, key=lambda r: (sort_key(r.seed), str(r.path))):
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
        g.columns = {k: g.setting.get(k) if applies(k, g.setting) else None for k in varying}  # None: a blank cell
        if several_envs:
            g.columns["environment"] = g.environment
    return sorted(groups, key=lambda g: (g.model, MODES.index(g.mode) if g.mode in MODES else len(MODES), g.label,
                                         tuple(sort_key(g.setting.get(k)) for k in varying), g.environment))


def find_baseline(group: Group, groups: list[Group]) -> Group | None:
    """The baseline group with the same model, environment and training settings (itself for a baseline)."""
    if group.mode == "baseline":
        return group
    for g in groups:
        if (g.mode == "baseline" and g.model == group.model and g.environment == group.environment
                and all(g.setting.get(k) == group.setting.get(k) for k in TRAINING)):
            return g
    return None
