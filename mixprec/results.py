"""Run directories: unique creation, atomic writes, the environment record, the summary, and reading back.

A run writes ``<out>/runs/<model>-<mode>-s<seed>-<UTC timestamp>/``. Every file in it is written
to a temporary name and renamed into place, so a reader (or a crash) never sees half a file.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

from .cli import UsageError
from .device import device_name


def create_run_dir(out: str | os.PathLike, model: str, mode: str, seed: int) -> Path:
    """Make a new, empty run directory; two runs started in the same second get different ones."""
    runs = Path(out) / "runs"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = f"{model}-{mode}-s{seed}-{stamp}"
    try:
        runs.mkdir(parents=True, exist_ok=True)
        for n in range(1, 1000):
            path = runs / (base if n == 1 else f"{base}-{n}")
            try:
                path.mkdir()  # atomic: exactly one process wins each name
                return path
            except FileExistsError:
                continue
    except OSError as e:
        raise UsageError(f"cannot create a run directory under {runs} ({e.strerror}); "
                         "pass --out with a writable directory") from None
    raise UsageError(f"too many runs named {base} in {runs}")


def _write_atomic(path: Path, write, binary: bool = False) -> None:
    """Write through ``write(file)`` into a temporary file beside ``path``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide results from the other users of a shared machine
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline="") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite_or_none(obj):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def write_json(path: Path, obj) -> None:
    _write_atomic(Path(path), lambda f: json.dump(_finite_or_none(obj), f, indent=2, allow_nan=False))


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    _write_atomic(Path(path), lambda f: frame.to_csv(f, index=False))


def write_text(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8 atomically (whatever the locale: reports hold ±, × and Δ)."""
    _write_atomic(Path(path), lambda f: f.write(text.encode("utf-8")), binary=True)


def write_figure(path: Path, fig) -> None:
    """Write a matplotlib figure as a PNG at its own dpi, atomically: it is rendered in memory first,
    so a failed render leaves no file and a reader never sees a half-written image."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi="figure")
    _write_atomic(Path(path), lambda f: f.write(buf.getvalue()), binary=True)


def write_torch(path: Path, obj) -> None:
    """``torch.save`` atomically: a checkpoint is either the old one or the new one, never half of each."""
    _write_atomic(Path(path), lambda f: torch.save(obj, f), binary=True)


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def environment(device: torch.device) -> dict:
    """What the numbers depend on: versions, device, and the code's git commit where known."""
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device_type": device.type,
        "device_name": device_name(device),
        "cpu": device_name(torch.device("cpu")),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX2 / AVX512: decides CPU speeds
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": None,
        "git_dirty": None,
    }
    repo = Path(__file__).resolve().parent.parent
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                                           text=True, timeout=5, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, timeout=5, check=True).stdout
        env["git_dirty"] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        # not a checkout (an installed wheel, or a copy of the tree without .git, as the GPU study's machine gets):
        # the commit the caller says it copied, if any; the versions above still hold
        env["git_commit"] = os.environ.get("MIXPREC_GIT_COMMIT") or None
    return env


def _copied(source: str):
    """A :class:`RunSummary` field copied as it is from the run's ``config`` or ``result`` field of its name."""
    return field(metadata={"from": source})


@dataclass
class RunSummary:
    """``summary.json``: what one run was and what it measured, the one record of it that ``mixprec.run``
    writes at its end and the report and the tests read back (:func:`read_summary`).

    Each field marked ``config`` is the :class:`~mixprec.config.RunConfig` option of its name, each marked
    ``result`` the :class:`~mixprec.train.RunResult` field of its name; :func:`mixprec.run.summary` works out
    the others. A run that failed or was interrupted has None for its test results."""

    status: str = _copied("result")  # completed, failed or interrupted
    error: str | None = _copied("result")
    mode: str = _copied("config")
    model: str = _copied("config")
    pretrained: bool = _copied("config")
    seed: int = _copied("config")
    epochs: int = _copied("config")
    epochs_completed: int
    deterministic: bool = _copied("config")
    tf32: bool = _copied("result")
    world_size: int = _copied("result")
    device: str = _copied("result")
    amp_dtype: str | None = _copied("result")
    half_compute: str | None = _copied("result")
    params: int = _copied("result")
    macs: int | None = _copied("result")
    train_images: int  # of the training split (not images trained on, which counts every epoch)
    val_images: int
    test_images: int
    subset: int | None = _copied("config")
    test_subset: int | None = _copied("config")
    train_time_s: float = _copied("result")
    images_per_s: float | None  # after the warm-up steps; None when the run had none after them
    warmup_steps: int = _copied("result")  # the first epoch's steps left out of images_per_s (at most 20)
    warmup_time_s: float = _copied("result")
    compile: bool = _copied("config")
    channels_last: bool = _copied("config")
    peak_memory_bytes: int = _copied("result")
    memory: dict | None = _copied("result")
    skipped_steps: int | None  # None in baseline mode, which has no loss scaler
    final_loss_scale: float | None = _copied("result")
    ablation: dict  # the manual-mode ablation options (mixprec.config.ABLATION_OPTIONS)
    fp8: dict | None = _copied("result")  # formats and scaling recipe of an --fp8 run, else None
    loss_scaler: str | None = _copied("result")  # GradScaler, dynamic, static or none; None: no scaler ran
    notes: list = _copied("result")
    test_accuracy: float | None = None
    test_loss: float | None = None
    per_class_accuracy: dict | None = None
    confusion_matrix: list | None = None
    final_val_accuracy: float | None = None  # absent from the file until an epoch has ended

    @classmethod
    def copied(cls, source: str, obj) -> dict:
        """The fields copied from ``source`` (``config`` or ``result``), read off ``obj``."""
        return {f.name: getattr(obj, f.name) for f in fields(cls) if f.metadata.get("from") == source}

    def to_json(self) -> dict:
        record = asdict(self)
        if record["final_val_accuracy"] is None:
            del record["final_val_accuracy"]
        return record


# What the report needs of every completed run's summary, in the order it names what is missing.
SUMMARY_REQUIRED = ("test_accuracy", "train_time_s", "peak_memory_bytes", "per_class_accuracy", "confusion_matrix")


def read_summary(run_dir: Path) -> RunSummary:
    """The :class:`RunSummary` of the run in ``run_dir`` (a field the file lacks reads as None)."""
    saved = read_json(Path(run_dir) / "summary.json")
    return RunSummary(**{f.name: saved.get(f.name) for f in fields(RunSummary)})
