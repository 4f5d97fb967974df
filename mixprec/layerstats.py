"""Per-layer gradient numerics during training (``--layer-stats-every N``): where in the network FP16 loses
gradients, and what the loss scale does about it.

On every N-th optimizer step (the first included), for each Conv2d, Linear and BatchNorm layer, two tensors
are measured:

* ``activation``: the gradient of the loss w.r.t. the layer's output, through a tensor hook on the output
  (an in-place op after the layer, such as ReLU, does not change which gradient arrives: autograd hands the
  hook the gradient w.r.t. the output as the layer returned it). A layer called several times in a step
  (``--accumulate``) adds up over its calls.
* ``weight``: the gradient of its weight, as it stands after the step's last backward pass (a
  post-accumulate-grad hook; before any unscaling or clipping).

Both are measured as the backward pass produced them, in its precision (FP16 in manual mode, FP16 or FP32 per
op under autocast, FP32 in baseline) and multiplied by the loss scale ``S`` of the step. For each:

========================  ====================================================================================
``zero_frac``             elements exactly zero as computed: what the backward pass flushed, and the zeros
                          that are zero in any precision (behind a ReLU that was off, about half of them)
``fp16_underflow_frac``   elements nonzero as computed that would become 0 in FP16 without loss scaling:
                          ``0 < |g / S| < 2^-24``
``fp16_subnormal_frac``   elements that would be subnormal there: ``2^-24 <= |g / S| < 2^-14``
``max_abs``               the largest ``|g / S|``: the true gradient's magnitude (inf or NaN on an overflow)
``headroom_log2``         ``log2(65504 / max |g|)`` at the step's scale: binades left before FP16 overflows
                          (negative or -inf: it overflowed)
========================  ====================================================================================

The fractions are of all the tensor's elements, and the thresholds are the edges of FP16's range, as in
:mod:`mixprec.gradstats`. What loss scaling bought a layer shows two ways: within a run, as its
``fp16_underflow_frac`` (what scale 1 would have flushed that the scale kept); across runs of one seed, as
the difference of ``zero_frac`` between a run with ``--loss-scale none`` and one with a scale. Baseline runs answer the same
questions for FP32 gradients at scale 1: what FP16 would lose if the same backward ran in it.

The table is ``layer_grads.csv`` in the run directory, one row per (step, layer, tensor, statistic). It costs
nothing on the steps it does not measure (the hooks exist only during a measured step); what a measured step
costs is measured by ``experiments/bench_layer_stats.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from .scaler import FP16_MAX, FP16_SMALLEST_NORMAL, FP16_SMALLEST_SUBNORMAL
from .telemetry import Telemetry

LAYERS = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)
TENSORS = ("activation", "weight")
STATISTICS = ("zero_frac", "fp16_underflow_frac", "fp16_subnormal_frac", "max_abs", "headroom_log2")
_COUNTS = 5  # per measured tensor on the device: zeros, FP16 underflows, FP16 subnormals, max |g|, elements


@torch.no_grad()
def _measure(g: torch.Tensor, scale: float) -> torch.Tensor:
    """``[zeros, nonzeros that would be 0 in FP16 unscaled, would be subnormal, max |g|, elements]`` of one gradient,
    as FP32 on its device (no host sync). ``g`` is scaled by ``scale``, so the thresholds are scaled instead of
    ``g`` (exact for a power-of-2 scale): three counts of ``|g|`` below a bound, one pass each."""
    mag = g.detach().abs().float()
    zeros = torch.count_nonzero(mag == 0)
    below_subnormal = torch.count_nonzero(mag < FP16_SMALLEST_SUBNORMAL * scale)  # zeros included
    below_normal = torch.count_nonzero(mag < FP16_SMALLEST_NORMAL * scale)
    return torch.stack([zeros.float(), (below_subnormal - zeros).float(), (below_normal - below_subnormal).float(),
                        mag.max() if mag.numel() else mag.new_zeros(()),  # max keeps inf and NaN: an overflow shows
                        torch.tensor(float(g.numel()), device=g.device)])


def _combine(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    """Two calls' measurements of one layer: counts add up, the largest is the larger."""
    if a is None:
        return b
    return torch.cat([a[:3] + b[:3], torch.maximum(a[3:4], b[3:4]), a[4:] + b[4:]])


def headroom_log2(largest: float) -> float:
    """Binades between ``largest`` (a scaled gradient's max |g|) and FP16's 65504: inf for an all-zero gradient,
    -inf for an overflow (inf), NaN for NaN."""
    if math.isnan(largest) or largest == 0:
        return math.nan if math.isnan(largest) else math.inf
    return math.log2(FP16_MAX / largest) if math.isfinite(largest) else -math.inf


class LayerGradientTelemetry(Telemetry):
    """The per-layer source: it has no ``steps.csv`` columns, but rows of its own ``table``.

    ``wrap(step)`` returns the training step measured on every ``every``-th call (the first included), with
    ``loss_scale()`` (None: no scaler, 1) read before the step as the scale its gradients carry."""

    key, columns, table = "layer_grads", (), "layer_grads"

    def __init__(self, model: nn.Module, every: int, loss_scale: Callable[[], float | None]):
        super().__init__()
        self.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LAYERS)]
        self.every, self.loss_scale = every, loss_scale
        self.steps = 0  # steps taken (measured or not); in the checkpoint, so that a resumed run measures the same

    def due(self) -> bool:
        return self.steps % self.every == 0

    def wrap(self, step: Callable) -> Callable:
        def step_with_layer_stats(images, labels):
            due = self.due()
            self.steps += 1
            if not due:
                return step(images, labels)
            with self.measuring(self.loss_scale() or 1.0):
                return step(images, labels)

        return step_with_layer_stats

    @contextmanager
    def measuring(self, scale: float):
        """Hooks on every layer for the duration of one step; what they measured is recorded on the way out."""
        activation: list[torch.Tensor | None] = [None] * len(self.layers)
        weight: list[torch.Tensor | None] = [None] * len(self.layers)

        def on_forward(i):
            def hook(module, inputs, output):
                if output.requires_grad:
                    output.register_hook(lambda g: activation.__setitem__(i, _combine(activation[i],
                                                                                      _measure(g, scale))))
            return hook

        def on_weight_grad(i):
            return lambda p: weight.__setitem__(i, _measure(p.grad, scale))  # after each accumulation: the last wins

        handles = []
        for i, (_, m) in enumerate(self.layers):
            handles.append(m.register_forward_hook(on_forward(i)))
            if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.requires_grad:
                handles.append(m.weight.register_post_accumulate_grad_hook(on_weight_grad(i)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        missing = torch.full((_COUNTS,), math.nan)
        device = next((t.device for t in activation + weight if t is not None), None)
        if device is not None:
            missing = missing.to(device)
            self.record(torch.cat([torch.tensor([scale], device=device)]
                                  + [t if t is not None else missing for pair in zip(activation, weight) for t in pair]))

    def to_rows(self, values: list[float]) -> list[dict]:
        """The table's rows of one measured step (without its ``step``), from the values of :meth:`pop`'s tensor."""
        scale, rows = values[0], []
        for i, (name, m) in enumerate(self.layers):
            for j, tensor in enumerate(TENSORS):
                at = 1 + (2 * i + j) * _COUNTS
                zeros, underflows, subnormal, largest, elements = values[at: at + _COUNTS]
                if math.isnan(elements):
                    continue  # not measured: a layer without a weight, or not called in this step
                stats = (zeros / elements, underflows / elements, subnormal / elements, largest / scale,
                         headroom_log2(largest))
                rows += [dict(layer=name, layer_type=type(m).__name__, tensor=tensor, statistic=s, value=v)
                         for s, v in zip(STATISTICS, stats)]
        return rows

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
