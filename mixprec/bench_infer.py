"""``python -m mixprec.bench_infer --model M``: inference latency and peak memory, FP32 against half precision.

The EfficientNet thesis (Frankola 2022) timed one 750x750 image through each trained model, averaged
over 100 runs; this measures the same for any model here and each precision, side by side in one
process. For every model x mode it runs ``--warmup`` untimed forward passes (allocator, cuDNN
autotuning, caches), then ``--repeats`` timed ones, each between two host syncs, and reports the
mean ± standard deviation in milliseconds, the peak memory over the warm-up and the repeats, and the
speed-up over FP32 when FP32 ran too. Each row is appended to ``--out`` (a CSV file) with the device
and the versions it depends on.

Modes, in eval mode under ``torch.inference_mode``:

* ``baseline``: the FP32 model.
* ``amp``: the FP32 model under ``torch.autocast`` (``--amp-dtype`` auto: float16 on every device).
* ``manual``: the model cast to FP16 with FP32 BatchNorm, FP16 input, as manual mode trains it.

On a CPU, both half modes run their convolutions, linears and matmuls as the emulated tensor-core
arithmetic (``--half-compute`` auto), as training does.

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA; on a CPU it is the process's peak resident
set (weights, activations, and the Python process itself), reset before each row on Linux.

Example::

    python -m mixprec.bench_infer --model resnet18 efficientnet_b3 efficientnetv2_b3 --image-size 750
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

from .config import MODES, RunConfig


def prepare(model, mode: str, device, amp_dtype: str = "auto", half_compute: str = "auto"):
    """Turn an FP32 ``model`` (on ``device``) into ``mode``'s inference: ``(forward, description)``, where
    ``forward(x)`` takes an FP32 batch and returns FP32 logits, as the training run evaluates
    (:func:`mixprec.steps.setup_inference`). Manual mode casts ``model`` in place."""
    from .steps import setup_inference

    model.eval()
    cfg = RunConfig(mode, amp_dtype=amp_dtype, half_compute=half_compute)
    forward, dtype, how = setup_inference(cfg, model, device)
    return forward, {"dtype": dtype, "half_compute": how}


def time_forward(forward, x, device, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` forward passes, after ``warmup`` untimed ones."""
    import torch

    from . import device as dev

    with torch.inference_mode():
        for _ in range(warmup):
            forward(x)
        times = []
        for _ in range(repeats):
            dev.synchronize(device)  # host sync: each pass is timed alone, from an idle device
            start = time.perf_counter()
            forward(x)
            dev.synchronize(device)
            times.append((time.perf_counter() - start) * 1e3)
    return times


def bench(model_name: str, mode: str, device, image_size: int = 750, batch_size: int = 1, warmup: int = 10,
          repeats: int = 100, amp_dtype: str = "auto", half_compute: str = "auto",
          channels_last: bool = False) -> dict:
    """One CSV row: ``model_name`` (freshly initialised; weights do not change the timing) in ``mode``."""
    import torch

    from . import device as dev
    from .models import build_model, count_macs, count_params

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(model_name).to(device, memory_format=memory_format)
    params, macs = count_params(model), count_macs(model, image_size)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=memory_format)
    forward, what = prepare(model, mode, device, amp_dtype, half_compute)
    dev.reset_peak_memory(device, process=True)
    times = time_forward(forward, x, device, warmup, repeats)
    peak = dev.peak_memory_bytes(device)
    return {
        "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": model_name, "mode": mode, "dtype": what["dtype"], "half_compute": what["half_compute"],
        "channels_last": channels_last, "image_size": image_size, "batch_size": batch_size, "warmup": warmup,
        "repeats": repeats, "mean_ms": statistics.fmean(times), "std_ms": statistics.stdev(times),
        "min_ms": min(times), "peak_memory_bytes": peak,
        "memory_measure": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "params": params, "gmacs_per_image": macs / 1e9,
        "device": device.type, "device_name": dev.device_name(device), "torch": torch.__version__,
        "cuda": torch.version.cuda, "torch_threads": torch.get_num_threads(),
    }


def build_parser() -> argparse.ArgumentParser:
    from .cli import OneLineParser
    from .config import add_precision_options
    from .models import MODELS

    p = OneLineParser(prog="python -m mixprec.bench_infer",
                       description="Inference latency (mean ± std ms) and peak memory of models, FP32 against half "
                       "precision, one CSV row per model and mode (as Frankola 2022 timed one 750x750 image).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", nargs="+", required=True, choices=tuple(MODELS), metavar="MODEL",
                   help=f"one or more of: {', '.join(MODELS)}")
    p.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES),
                   help="baseline: FP32; amp: torch.autocast; manual: FP16 model with FP32 BatchNorm")
    p.add_argument("--image-size", type=int, default=750, help="square input side in pixels (the thesis: 750)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    p.add_argument("--repeats", type=int, default=100, help="timed forward passes (at least 2, for a std)")
    p.add_argument("--warmup", type=int, default=10, help="untimed forward passes before them")
    add_precision_options(p)
    p.add_argument("--channels-last", action="store_true", help="weights and input in channels_last memory format")
    p.add_argument("--out", default="results/bench_infer.csv", help="CSV file the rows are appended to (python -m mixprec.report RESULTS_DIR "
                   "shows RESULTS_DIR/bench_infer.csv as a table)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for option, value, least in (("image-size", args.image_size, 1), ("batch-size", args.batch_size, 1),
                                 ("repeats", args.repeats, 2), ("warmup", args.warmup, 0)):
        if value < least:
            parser.error(f"--{option} must be at least {least}, got {value}")
    import pandas as pd

    from .cli import UsageError
    from .device import resolve_device
    from .results import write_csv

    rows = []
    try:
        device = resolve_device(args.device)
        for model_name in dict.fromkeys(args.model):  # each once, in the order given
            for mode in dict.fromkeys(args.mode):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # bfloat16/FP16 CPU caveats: the numbers say it
                    row = bench(model_name, mode, device, args.image_size, args.batch_size, args.warmup,
                                args.repeats, args.amp_dtype, args.half_compute, args.channels_last)
                rows.append(row)
                print(f"{model_name:>18} {mode:>8} {row['dtype']:>17}: {row['mean_ms']:9.2f} ± "
                      f"{row['std_ms']:.2f} ms, peak {row['peak_memory_bytes'] / 2**20:,.0f} MiB", file=sys.stderr)
    except UsageError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if "out of memory" not in str(e).lower():
            raise
        print(f"{parser.prog}: error: out of memory at --image-size {args.image_size} --batch-size "
              f"{args.batch_size}; lower them", file=sys.stderr)
        return 2
    table = pd.DataFrame(rows)
    fp32 = table[table["mode"] == "baseline"].set_index("model")["mean_ms"]
    table["speedup_vs_fp32"] = table["model"].map(fp32) / table["mean_ms"]
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        old = pd.read_csv(out) if out.exists() else None
        write_csv(out, table if old is None else pd.concat([old, table], ignore_index=True))
    except OSError as e:
        print(f"{parser.prog}: error: cannot write {out} ({e.strerror}); pass --out with a writable path",
              file=sys.stderr)
        return 2
    shown = table.assign(latency_ms=[f"{m:.2f} ± {s:.2f}" for m, s in zip(table.mean_ms, table.std_ms)],
                         peak_MiB=(table.peak_memory_bytes / 2**20).round(0).astype(int),
                         speedup_vs_fp32=table.speedup_vs_fp32.round(2))
    print(f"{args.image_size}x{args.image_size}, batch {args.batch_size}, {args.repeats} runs after {args.warmup} "
          f"warm-up, on {table.device_name[0]} ({table.memory_measure[0]})")
    print(shown[["model", "mode", "dtype", "latency_ms", "speedup_vs_fp32", "peak_MiB", "gmacs_per_image"]]
          .to_string(index=False))
    print(f"appended {len(table)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
