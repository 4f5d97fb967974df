"""The one place that knows CUDA from CPU: device choice, synchronization, peak memory, device names.

Everything else in mixprec is device-agnostic tensor code.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time

import torch

from .cli import UsageError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without CUDA is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise UsageError(f"--device cuda was asked for but {why}; use --device cpu (or auto)")
    return torch.device(name)


def local_device(device: torch.device, local_rank: int) -> torch.device:
    """This process's device under torchrun: ``cuda:LOCAL_RANK``, made current, or the CPU as it is."""
    if device.type != "cuda":
        return device
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def configure(device: torch.device, deterministic: bool = False, tf32: bool = True) -> bool:
    """Per-device settings: cuDNN autotuning for speed, or PyTorch's deterministic algorithms, and TF32.

    PyTorch runs convolutions in TF32 by default on Ampere and newer GPUs (``cudnn.allow_tf32``), so
    an "FP32" baseline there is really TF32; ``tf32=False`` turns it off for convolutions and matmuls.
    Returns whether TF32 is in use: a CUDA device of compute capability 8.0 or newer with it allowed."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True)
    if device.type != "cuda":
        return False
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.allow_tf32 = tf32
    if not tf32:
        torch.backends.cuda.matmul.allow_tf32 = False
    return torch.backends.cudnn.allow_tf32 and torch.cuda.get_device_capability(device) >= (8, 0)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that wall-clock time covers the work (a host sync on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Synchronized wall-clock timer: ``with Timer(device) as t: ...; t.seconds``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def __enter__(self):
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


def reset_peak_memory(device: torch.device, process: bool = False) -> None:
    """Start a new peak. On CPU the process's peak resident set covers the whole run, unless ``process``
    asks to reset it too (Linux: ``/proc/self/clear_refs``; elsewhere it cannot be, and stays as it was)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif process:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the resident-set high-water mark that getrusage reports
        except OSError:
            pass


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: ``max_memory_allocated`` since the last reset. CPU: the process's peak resident memory."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rng_states(device: torch.device) -> dict:
    """The RNG states a training run draws from (torch CPU, and the device's on CUDA)."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(device: torch.device, states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
