"""Run directories: unique creation, atomic writes, the environment record, and reading back.

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
        pass  # not a checkout (an installed wheel) or no git: the versions above still hold
    return env
