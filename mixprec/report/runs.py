"""Finding, loading and validating run directories: a completed run as a :class:`Run`, any other as an
:class:`Excluded` that says why it is not counted. The first module of the package: it imports none of the others."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..config import loss_scaler_kind, upgrade
from ..cli import UsageError
from ..results import SUMMARY_REQUIRED, read_json

INFERENCE_CSV = "bench_infer.csv"  # python -m mixprec.bench_infer --out RESULTS_DIR/bench_infer.csv
STEP_BENCH = "bench"  # experiments/bench_gpu.py --out RESULTS_DIR/bench/<model>.csv (the GPU study writes them)
STEP_BENCH_TABLE = "speed_memory"  # the table of them: report/speed_memory.md, and bench/ in a GPU study
REQUIRED = {
    "config.json": ("mode", "model", "seed"),
    "env.json": ("torch", "device_name"),
    "summary.json": SUMMARY_REQUIRED,
    "epochs.csv": ("epoch", "train_loss", "train_acc", "val_loss", "val_acc"),
    "steps.csv": ("step", "loss_scale", "skipped"),
    "layer_grads.csv": ("step", "value"),
    "test_predictions.csv": ("label", "prediction"),  # and the text columns layer, tensor, statistic (mixprec.layerstats)
    INFERENCE_CSV: ("image_size", "batch_size", "repeats", "mean_ms", "std_ms", "peak_memory_bytes"),
}
RERUN = "run `python -m mixprec.run --mode ...` or `python -m mixprec.study ...` first"
# Beside the runs: {"run directory, relative to the results root": "why its times are not to be used"}. For runs
# whose machine was shared with other work: their accuracy and memory count, their times and speeds do not.
UNTIMED = "timings-excluded.json"


@dataclass
class Run:
    """One completed run directory, read back. ``steps`` is ``steps.csv`` when the run wrote one, its ``skipped``
    column parsed to booleans (:func:`skipped_flags`) once, here, for every table and figure."""

    path: Path
    config: dict
    env: dict
    summary: dict
    epochs: pd.DataFrame
    steps: pd.DataFrame | None = None
    layers: pd.DataFrame | None = None  # layer_grads.csv of a --layer-stats-every run
    predictions: pd.DataFrame | None = None  # test_predictions.csv (runs made before it have none)
    untimed: str | None = None  # why this run's times are not counted (from UNTIMED), or None

    @property
    def seed(self):
        return self.config.get("seed")

    @property
    def on_cpu(self) -> bool:
        """Whether the run trained on a CPU, where its peak memory is the process's resident memory."""
        return str(self.summary.get("device") or self.env.get("device_type")).startswith("cpu")


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


def read_csv(path: Path, name: str, required: bool) -> pd.DataFrame | None:
    """``path/name`` as a frame with the columns :data:`REQUIRED` names for it, numbers where they must be; None when
    the file is absent and not ``required``. Raises :class:`BadRun` saying what is wrong with it."""
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


def skipped_flags(column: pd.Series) -> pd.Series:
    """``steps.csv``'s ``skipped`` column as booleans. pandas reads a run's True/False as bool, but an empty cell
    makes the column objects and a hand-written file may say 1/0: True, "true", 1 and 1.0 mean skipped, anything
    else (False, 0, an empty cell) does not."""
    return column.astype(str).str.lower().isin(("true", "1", "1.0"))


def as_float(value) -> float:
    """A summary value as a float, NaN where it is missing (None)."""
    return math.nan if value is None else float(value)


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
        config = upgrade(_require(_read_json(path, "config.json"), "config.json"))
        env = _require(_read_json(path, "env.json"), "env.json")
        epochs = read_csv(path, "epochs.csv", required=True)
        steps = read_csv(path, "steps.csv", required=False)
        layers = read_csv(path, "layer_grads.csv", required=False)
        predictions = read_csv(path, "test_predictions.csv", required=False)
        if layers is not None and not {"layer", "tensor", "statistic"} <= set(layers.columns):
            raise BadRun("layer_grads.csv lacks the column(s) layer, tensor or statistic")
    except BadRun as e:
        return Excluded(path, "unreadable", str(e))
    if steps is not None:
        steps["skipped"] = skipped_flags(steps["skipped"])
    return Run(path, config, env, {**summary, "loss_scaler": loss_scaler(config, summary)}, epochs, steps, layers,
               predictions)


def loss_scaler(config: dict, summary: dict) -> str | None:
    """Which loss scaler a run trained with (GradScaler, or manual mode's dynamic, static or none; None without
    one): summary.json's ``loss_scaler``, or for a run made before it was recorded, what its options imply."""
    if "loss_scaler" in summary:
        return summary["loss_scaler"]
    return loss_scaler_kind(config.get("mode"), summary.get("amp_dtype"), config.get("loss_scale", "dynamic"))


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
    untimed = read_untimed(root, dirs)
    runs, excluded = [], []
    for d in dirs:
        loaded = load_run(d)
        if isinstance(loaded, Run):
            loaded.untimed = untimed.get(d.resolve())
            runs.append(loaded)
        else:
            excluded.append(loaded)
    return runs, excluded


def read_untimed(root: Path, dirs: list[Path]) -> dict[Path, str]:
    """``root/timings-excluded.json`` as {resolved run directory: reason}; empty when there is no such file.

    Raises :class:`UsageError` when it is not a JSON object of run directories to one-line reasons, or names a
    directory that is not one of ``dirs``."""
    path = root / UNTIMED
    if not path.exists():
        return {}
    fix = (f"make it a JSON object mapping each run directory (relative to {root}) to the reason its times "
           "are not to be used")
    try:
        obj = read_json(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} cannot be read ({_one_line(e)}): {fix}") from None
    if not isinstance(obj, dict) or not all(isinstance(v, str) and v.strip() for v in obj.values()):
        raise UsageError(f"{path} is not a mapping of run directories to reasons: {fix}")
    known = {d.resolve() for d in dirs}
    out = {}
    for name, reason in obj.items():
        run_dir = (root / name).resolve()
        if run_dir not in known:
            raise UsageError(f"{path} names {name!r}, which is not a run directory under {root}: correct or "
                             "remove that entry")
        out[run_dir] = _one_line(reason)
    return out
