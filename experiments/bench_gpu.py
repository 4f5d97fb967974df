"""One model's training step in true FP32, TF32, amp and manual mode: step time, images/s and peak memory.

The GPU study's speed-and-memory table (``experiments/gpu_study.sh``, stage 2). Every variant is the real
training step of ``mixprec.steps`` (``setup_precision``), on one fixed random batch on the device, so data
loading is left out. The variants live side by side in one process and are timed interleaved, round by round
(as ``bench_half_compute.py`` does): machine noise hits them alike, and torch's import, CUDA's start and
cuDNN's autotuning are paid once.

* ``fp32``: baseline with ``--no-tf32`` (true FP32); ``tf32``: baseline as a GPU of compute capability >= 8.0
  runs it by default (convolutions in TF32); ``amp``: autocast float16 + GradScaler; ``manual``: FP16 model,
  FP32 BatchNorm, FP32 master weights, dynamic loss scaler. On a CPU (rehearsal) TF32 does not exist and amp
  and manual run the emulated half arithmetic.
* ``--compile``: ``tf32+compile``, ``amp+compile`` and ``manual+compile`` instead (``torch.compile`` of the
  model; the warm-up then includes compilation, reported as ``warmup_s``).

Memory is ``torch.cuda.max_memory_allocated`` over one training step after the warm-up, counting only what
the variant itself allocated (its model, master weights, gradients, optimizer state and activations; the
other variants' tensors are subtracted), with the breakdown by role of ``mixprec.memory.breakdown``. On a
CPU it is the breakdown's sum (the process's peak resident set says nothing per variant).

Writes one CSV row per variant (``--out``) and prints a table with the ratios. Steps that fail are recorded
with their error and the other variants go on. Exit code 0 when every variant ran, 1 otherwise.

    python experiments/bench_gpu.py --model resnet50 [--batch-size 128] [--max-seconds 30] [--compile]
        [--out bench/resnet50.csv]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
from pathlib import Path

T_START = time.perf_counter()

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from mixprec import device as dev  # noqa: E402
from mixprec.config import RunConfig  # noqa: E402
from mixprec.memory import SavedTensorBytes, breakdown  # noqa: E402
from mixprec.models import MODELS, build_model  # noqa: E402
from mixprec.results import write_csv  # noqa: E402
from mixprec.steps import setup_precision  # noqa: E402

EAGER = {"fp32": dict(mode="baseline", tf32=False), "tf32": dict(mode="baseline"), "amp": dict(mode="amp"),
         "manual": dict(mode="manual")}
COMPILED = {"tf32+compile": dict(mode="baseline", compile=True), "amp+compile": dict(mode="amp", compile=True),
            "manual+compile": dict(mode="manual", compile=True)}
ROLES = ("weights", "master_weights", "grads", "optimizer_state", "activations")


class Variant:
    """One precision's model, optimizer and step, built and warmed up, with its memory measured."""

    def __init__(self, name: str, cfg: RunConfig, device: torch.device, x: torch.Tensor, y: torch.Tensor,
                 warmup: int):
        self.name, self.cfg, self.device, self.x, self.y = name, cfg, device, x, y
        self.times: list[float] = []
        self.error: str | None = None
        others = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        torch.manual_seed(0)  # every variant starts from the same weights
        self.model = build_model(cfg.model).to(device)
        self.precision = setup_precision(cfg, self.model, device)
        start = time.perf_counter()
        for _ in range(warmup):  # cuDNN autotuning, the allocator, and compilation with --compile
            self.step()
        dev.synchronize(device)
        self.warmup_s = time.perf_counter() - start
        dev.reset_peak_memory(device)
        with SavedTensorBytes() as saved:
            self.step()
        dev.synchronize(device)
        self.memory = breakdown(self.model, self.precision.master, self.precision.optimizer, saved.bytes)
        self.peak_memory = (torch.cuda.max_memory_allocated(device) - others if device.type == "cuda"
                            else sum(self.memory.values()))

    def step(self):
        dev.configure(self.device, tf32=self.cfg.tf32)  # TF32 is a process-wide switch: set it for this variant
        return self.precision.step(self.x, self.y)

    def timed(self, steps: int) -> None:
        dev.synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        dev.synchronize(self.device)  # host sync: the kernels queued by the steps are in the time
        self.times.append((time.perf_counter() - start) / steps)

    def row(self) -> dict:
        p = self.precision
        median = statistics.median(self.times) if self.times else None
        return dict(variant=self.name, mode=self.cfg.mode, tf32=self.cfg.tf32 and self.device.type == "cuda",
                    compile=self.cfg.compile, half_compute=p.half_compute, amp_dtype=p.amp_dtype,
                    rounds=len(self.times), median_step_s=median, min_step_s=min(self.times, default=None),
                    max_step_s=max(self.times, default=None),
                    images_per_s=self.x.shape[0] / median if median else None, warmup_s=self.warmup_s,
                    peak_memory_bytes=self.peak_memory, **{f"memory_{k}": self.memory[k] for k in ROLES},
                    error=None)


def bench(model: str, batch_size: int, device: torch.device, variants: dict, max_seconds: float,
          steps_per_round: int, max_rounds: int, warmup: int, log) -> list[dict]:
    """Build every variant (one at a time, so that each one's memory is its own), then time them round by
    round until ``max_rounds`` or ``max_seconds`` of timing; one row per variant."""
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    built, rows = [], []
    for name, kw in variants.items():
        cfg = RunConfig(model=model, batch_size=batch_size, device=device.type, **kw)
        start = time.perf_counter()
        try:
            built.append(Variant(name, cfg, device, x, y, warmup))
            log(f"{model} {name}: built and warmed up in {time.perf_counter() - start:.1f} s "
                f"(peak {built[-1].peak_memory / 2**20:.0f} MiB)")
        except Exception as e:  # noqa: BLE001 - a variant that cannot run is recorded, the others go on
            log(f"{model} {name}: FAILED to build or warm up: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            rows.append(dict(variant=name, mode=kw["mode"], compile=kw.get("compile", False),
                             error=f"{type(e).__name__}: {e}"))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    start = time.perf_counter()
    for r in range(max_rounds):
        for v in built:
            if v.error is not None:
                continue
            try:
                v.timed(steps_per_round)
            except Exception as e:  # noqa: BLE001
                v.error = f"{type(e).__name__}: {e}"
                log(f"{model} {v.name}: FAILED in round {r + 1}: {v.error}")
        log(f"round {r + 1}: " + ", ".join(f"{v.name} {1e3 * v.times[-1]:.1f} ms" for v in built
                                          if v.error is None and len(v.times) == r + 1))
        if time.perf_counter() - start > max_seconds:
            break
    for v in built:
        rows.append({**v.row(), "error": v.error})
    return rows


def ratios(rows: list[dict]) -> list[str]:
    """The study's ratios where both sides ran: amp and TF32 against true FP32, manual against amp."""
    rate = {r["variant"]: r.get("images_per_s") for r in rows}
    memory = {r["variant"]: r.get("peak_memory_bytes") for r in rows}
    lines = []
    for a, b in (("tf32", "fp32"), ("amp", "fp32"), ("manual", "fp32"), ("manual", "amp"),
                 ("amp+compile", "amp"), ("manual+compile", "manual"), ("tf32+compile", "tf32")):
        if rate.get(a) and rate.get(b):
            lines.append(f"{a}/{b}: images/s {rate[a] / rate[b]:.2f}x, peak memory {memory[a] / memory[b]:.2f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", choices=tuple(MODELS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--compile", action="store_true", help="time the torch.compile variants instead")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant before timing")
    p.add_argument("--steps-per-round", type=int, default=10)
    p.add_argument("--max-rounds", type=int, default=7)
    p.add_argument("--max-seconds", type=float, default=30.0, help="stop timing after the round that passes this")
    p.add_argument("--out", type=Path, default=None, help="CSV to write (one row per variant)")
    args = p.parse_args(argv)

    device = dev.resolve_device(args.device)
    startup = time.perf_counter() - T_START
    if device.type == "cuda":
        torch.zeros(1, device=device)  # CUDA's start, timed apart
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"start-up: imports {startup:.1f} s, device ready {time.perf_counter() - T_START:.1f} s after start")
    rows = bench(args.model, args.batch_size, device, COMPILED if args.compile else EAGER, args.max_seconds,
                 args.steps_per_round, args.max_rounds, args.warmup, log)
    common = dict(model=args.model, batch_size=args.batch_size, device=dev.device_name(device),
                  device_type=device.type, torch=torch.__version__, startup_s=round(startup, 2))
    frame = pd.DataFrame([{**common, **r} for r in rows])
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_csv(args.out, frame)
    print(f"{args.model}, batch {args.batch_size}, {common['device']}, torch {torch.__version__}")
    shown = frame.reindex(columns=["variant", "median_step_s", "images_per_s", "peak_memory_bytes", "error"])
    shown["peak_memory_bytes"] = shown["peak_memory_bytes"] / 2**20
    print(shown.rename(columns={"peak_memory_bytes": "peak_MiB"}).to_string(index=False, float_format="%.4g"))
    for line in ratios(rows):
        print(line)
    return 0 if all(r.get("error") is None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
