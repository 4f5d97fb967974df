"""Our loss scaler's unscale + check + step + update against torch.amp.GradScaler's, on resnet18's grads.

Times the optimizer-step half of a training step with the gradients already in place (backward
is not timed) on resnet18's 11.17M parameters, on CPU, every variant in one process, interleaved
round by round so that machine noise hits them alike, and prints the median times and their
ratios to GradScaler. Target (issue: scaler benchmark): ours/GradScaler step time <= 1.0 with
telemetry off, GradScaler doing the same job (``gradscaler+master`` below). Exits 1 when the target
is missed. The comparison with GradScaler on an FP32 model, the telemetry-every-step figure and the
copy+unscale-only pair are reported for context, with no target.

    python experiments/bench_scaler.py [--rounds 15]

Run it on an idle machine: another busy process on these 2 cores slowed every variant ~35x, unevenly
(a warning is printed when the load average is already at the core count at start).

Variants, each timed from the scaler's unscale to its update, with its one host sync:

* ``gradscaler``: FP32 params and grads; ``scaler.unscale_(opt)``, ``scaler.step(opt)`` (reads
  found_inf: the sync), ``scaler.update()``. What amp mode does; no master weights.
* ``gradscaler+master``: GradScaler in manual mode's place. GradScaler refuses FP16 gradients
  ("Attempting to unscale FP16 gradients", pytorch #74739), so with an FP16 model it must work on
  FP32 master grads: copy the FP16 grads into them, then ``unscale_``, ``step``,
  ``master.copy_to_model_()``, ``update``. The same job as ``ours``: this is the target's reference.
* ``ours``: the manual mode's FP16 model (BatchNorm FP32) with FP32 master weights;
  ``unscale_`` (FP16 -> FP32 grad copy + fused unscale and check), ``bool(found_inf)`` (the
  sync), ``opt.step()``, ``master.copy_to_model_()``, ``update``. Telemetry off.
* ``ours+telemetry``: the same with ``telemetry_every=1`` and ``pop_stats().tolist()`` every step.
* ``gradscaler unscale``, ``ours unscale``: context only, the same without the optimizer step
  (and without the master -> model copy).

Both sides use ``SGD(lr=0, momentum=0.9)``: the optimizer does its full work (momentum buffer and
parameter update) while the weights stay put. Ours also copies the FP16 grads into the FP32
master grads and the master weights back into the FP16 model, which GradScaler's usage (FP32
params) does not need: that is part of manual mode's cost, so it is timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from mixprec.device import device_name
from mixprec.master import MasterWeights, half_with_fp32_norm_
from mixprec.models import build_model
from mixprec.scaler import DynamicLossScaler

MODEL, TARGET, SCALE, WARMUP = "resnet18", 1.0, 2.0**16, 2


def true_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    """The same unscaled gradients for every variant: randn * 1e-3 per parameter, seed 0."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(p.shape, generator=gen) * 1e-3 for p in model.parameters()]


class Variant:
    """``prepare()`` writes the scaled grads into the model as backward would (not timed); ``step()`` is timed.

    Why the grads are rewritten before every step: GradScaler.unscale_ divides the FP32 grads in
    place, so kept across iterations they would shrink by 2**16 a step, reach FP32 subnormals after
    ~7 steps (slow on x86 CPUs: timing does depend on values there) and then zero. Rewriting the
    same scaled grads each step keeps every iteration's work and values identical: true grads
    ~1e-3, scaled ~65 (well inside FP16), unscaled back to ~1e-3, and the SGD momentum buffer
    settles at ~10x the grad, never subnormal. Ours never modifies its FP16 model grads, but gets
    the same rewrite so that both sides start each step with their grads just written (as after
    backward), with the same cache state. Both sides keep the default scale 2**16 and
    growth_interval 2000, so the scale never changes in the few steps timed here.
    """

    def __init__(self, model_params: list[torch.Tensor], scaled_grads: list[torch.Tensor]):
        self.model_params, self.scaled_grads = model_params, scaled_grads
        for p, g in zip(model_params, scaled_grads, strict=True):
            p.grad = torch.empty_like(g)

    @torch.no_grad()
    def prepare(self) -> None:
        torch._foreach_copy_([p.grad for p in self.model_params], self.scaled_grads)


class GradScalerVariant(Variant):
    def __init__(self, with_step: bool):
        model = build_model(MODEL)
        params = list(model.parameters())
        super().__init__(params, [g * SCALE for g in true_grads(model)])
        self.opt = torch.optim.SGD(params, lr=0.0, momentum=0.9)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
        self.scaler.scale(torch.ones(()))  # GradScaler makes its scale tensor at the first scale(loss)
        self.with_step = with_step

    def step(self) -> None:
        self.scaler.unscale_(self.opt)
        if self.with_step:
            self.scaler.step(self.opt)  # reads found_inf (.item(): the host sync), steps if clean
        else:  # the same read, without the step
            bool(sum(v.item() for v in self.scaler._found_inf_per_device(self.opt).values()))
        self.scaler.update()


class GradScalerMasterVariant(Variant):
    def __init__(self):
        model = build_model(MODEL)
        grads = true_grads(model)
        self.master = MasterWeights(model)
        half_with_fp32_norm_(model)
        super().__init__(self.master.model_params,
                         [(g * SCALE).to(p.dtype) for g, p in zip(grads, self.master.model_params, strict=True)])
        for m in self.master.params:
            m.grad = torch.empty_like(m)
        self.opt = torch.optim.SGD(self.master.params, lr=0.0, momentum=0.9)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
        self.scaler.scale(torch.ones(()))

    @torch.no_grad()
    def step(self) -> None:
        torch._foreach_copy_([m.grad for m in self.master.params], [p.grad for p in self.master.model_params])
        self.scaler.unscale_(self.opt)
        self.scaler.step(self.opt)  # the host sync
        self.master.copy_to_model_()
        self.scaler.update()


class OursVariant(Variant):
    def __init__(self, with_step: bool, telemetry_every: int | None = None):
        model = build_model(MODEL)
        grads = true_grads(model)
        self.master = MasterWeights(model)  # from the FP32 model, before the cast
        half_with_fp32_norm_(model)  # model grads take the params' dtypes: FP16, FP32 for BatchNorm
        super().__init__(self.master.model_params,
                         [(g * SCALE).to(p.dtype) for g, p in zip(grads, self.master.model_params, strict=True)])
        self.opt = torch.optim.SGD(self.master.params, lr=0.0, momentum=0.9)
        self.scaler = DynamicLossScaler(init_scale=SCALE, telemetry_every=telemetry_every)
        self.with_step, self.telemetry = with_step, telemetry_every is not None
        self.last_stats: list[float] | None = None

    def step(self) -> None:
        found_inf = self.scaler.unscale_(self.master.model_params, self.master.params)
        skipped = bool(found_inf)  # the one host sync
        if self.with_step and not skipped:
            self.opt.step()
            self.master.copy_to_model_()
        if self.telemetry:
            self.last_stats = self.scaler.pop_stats().tolist()  # the telemetry's read
        self.scaler.update(skipped)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()

    device = torch.device("cpu")
    if (load := os.getloadavg()[0]) >= (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores: other processes will skew the timings",
              file=sys.stderr)
    variants = {"gradscaler": GradScalerVariant(with_step=True), "gradscaler+master": GradScalerMasterVariant(),
                "ours": OursVariant(with_step=True),
                "ours+telemetry": OursVariant(with_step=True, telemetry_every=1),
                "gradscaler unscale": GradScalerVariant(with_step=False), "ours unscale": OursVariant(with_step=False)}
    n_params = sum(p.numel() for p in variants["gradscaler"].model_params)
    for v in variants.values():
        for _ in range(WARMUP):
            v.prepare()
            v.step()
    for name, v in variants.items():  # no step may be skipped: an overflow would time a different path
        if (scale := v.scaler.get_scale()) != SCALE:
            raise RuntimeError(f"{name}: the scale moved to {scale} during warm-up (an overflow?)")

    names = list(variants)
    times = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            v = variants[name]
            v.prepare()
            t = time.perf_counter()
            v.step()
            times[name].append(time.perf_counter() - t)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.1f}ms" for n in names),
              file=sys.stderr)

    stats = variants["ours+telemetry"].last_stats
    print(f"stats read by ours+telemetry at its last step: largest |grad| {stats[0]:.3g}, zeros {stats[1]:.0f}, "
          f"FP16 underflows {stats[2]:.0f} of {stats[3]:.0f}", file=sys.stderr)
    median = {n: statistics.median(v) for n, v in times.items()}
    print(f"{MODEL} ({n_params / 1e6:.2f}M params), {device_name(device)} "
          f"({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds")
    print(f"{'variant':<20}{'median ms':>10}{'ratio':>8}  against")
    for n, base in (("gradscaler", "gradscaler"), ("gradscaler+master", "gradscaler"), ("ours", "gradscaler"),
                    ("gradscaler+master", "gradscaler+master"), ("ours", "gradscaler+master"),
                    ("ours+telemetry", "gradscaler+master"),
                    ("gradscaler unscale", "gradscaler unscale"), ("ours unscale", "gradscaler unscale")):
        print(f"{n:<20}{median[n] * 1e3:>10.2f}{median[n] / median[base]:>8.3f}  {base}")
    ratio = median["ours"] / median["gradscaler+master"]
    ratio_tel = median["ours+telemetry"] / median["gradscaler+master"]
    ratio_fp32 = median["ours"] / median["gradscaler"]
    ok = ratio <= TARGET
    print(f"SUMMARY ours/GradScaler, same job (FP16 model, FP32 master weights): {ratio:.3f} (target <= {TARGET}); "
          f"with telemetry every step {ratio_tel:.3f}; against GradScaler on an FP32 model {ratio_fp32:.3f}: "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
