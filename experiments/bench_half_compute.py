"""Emulated tensor-core FP16 against FP32 on this CPU: step time and bytes saved for backward.

Runs the real training steps of mixprec.steps (baseline; manual with emulated half compute; amp in
float16 with GradScaler and the same emulation, the CPU default; amp in bfloat16 with PyTorch's own
kernels) on one model, interleaved round by round in one process so that machine noise hits every
variant alike, and prints the median step times and the ratios. Targets, against baseline:
manual step time <= 1.10 (issue: core study), amp-fp16 step time <= 1.20 (issue: amp reference),
and saved-for-backward bytes <= 0.52 for both (physical limit 0.50); manual-fp8 (--fp8
delayed scaling) step time <= 1.5 (issue 17) and saved bytes <= 0.52 (it saves the FP16 operands and
casts them again in backward, see fp8._saved_scales). Exits 1 when a target is missed.

    python experiments/bench_half_compute.py [--model resnet20] [--batch-size 128] [--rounds 7] [--native]

``--native`` adds one step of PyTorch's own FP16 kernels (slow on CPUs: ~25x FP32).
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial
import sys
import time

import torch

from mixprec.config import RunConfig
from mixprec.device import device_name
from mixprec.memory import saved_tensor_bytes
from mixprec.models import build_model
from mixprec.steps import setup_precision

# (step time, saved bytes) vs FP32; None: reported, no target
TARGETS = {"manual-emulated": (1.10, 0.52), "amp-fp16-emulated": (1.20, 0.52), "manual-fp8": (1.5, 0.52)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--native", action="store_true", help="also time one native FP16 step")
    args = p.parse_args()

    device = torch.device("cpu")
    torch.manual_seed(0)
    x, y = torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,))
    variants = {"baseline": dict(mode="baseline"), "manual-emulated": dict(mode="manual", half_compute="emulated"),
                "amp-fp16-emulated": dict(mode="amp", amp_dtype="float16", half_compute="emulated"),
                "amp-bf16-native": dict(mode="amp", amp_dtype="bfloat16", half_compute="native"),
                "manual-fp8": dict(mode="manual", fp8="delayed")}
    if args.native:
        variants["manual-native"] = dict(mode="manual", half_compute="native")
    precisions = {}
    for name, kw in variants.items():
        torch.manual_seed(0)
        model = build_model(args.model).to(device)
        precisions[name] = setup_precision(RunConfig(model=args.model, **kw), model, device)
        precisions[name].step(x, y)  # warm-up

    times = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, prec in precisions.items():
            if name == "manual-native" and r > 0:
                continue
            t = time.perf_counter()
            prec.step(x, y)
            times[name].append(time.perf_counter() - t)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {v[-1]:.3f}s" for n, v in times.items()
                                                          if len(v) == r + 1), file=sys.stderr)

    median = {n: statistics.median(v) for n, v in times.items()}
    saved = {n: saved_tensor_bytes(partial(prec.forward, x)) for n, prec in precisions.items()}
    print(f"{args.model}, batch {args.batch_size}, {device_name(device)} "
          f"({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'variant':<18}{'median step s':>14}{'vs FP32':>9}{'saved MiB':>11}{'vs FP32':>9}")
    for n in variants:
        print(f"{n:<18}{median[n]:>14.3f}{median[n] / median['baseline']:>9.2f}"
              f"{saved[n] / 2**20:>11.1f}{saved[n] / saved['baseline']:>9.3f}")
    ok = True
    for name, (time_target, bytes_target) in TARGETS.items():
        time_ratio, bytes_ratio = median[name] / median["baseline"], saved[name] / saved["baseline"]
        passed = time_ratio <= time_target and (bytes_target is None or bytes_ratio <= bytes_target)
        ok &= passed
        print(f"SUMMARY {name}/FP32: step time {time_ratio:.3f} (target <= {time_target}), saved bytes "
              f"{bytes_ratio:.4f} ({'no target' if bytes_target is None else f'target <= {bytes_target}'}): "
              f"{'PASS' if passed else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
