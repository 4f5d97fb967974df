"""The hand-written dynamic loss scaler for manual mode.

Small gradients underflow in FP16: anything below 2**-24 becomes zero, and below 2**-14 it loses
precision. Multiplying the loss by a large scale before backward lifts the gradients into FP16's
range; dividing them by the same scale in FP32 afterwards gives the true gradients back. Too large
a scale overflows to inf, which the scaler detects, answering by skipping that optimizer step and
backing the scale off. After ``growth_interval`` clean steps it tries a larger scale again.

The policy is ``torch.amp.GradScaler``'s, with the same defaults, and the scale trajectory is the
same step for step (the scale is kept in float32 arithmetic as GradScaler's tensor is). What
differs is where the gradients go: GradScaler unscales FP32 gradients in place, while this scaler
widens the FP16 model gradients into FP32 master gradients and unscales them there, so the true
gradient never has to fit in FP16.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from .telemetry import Telemetry


def _f32_mul(a: float, b: float) -> float:
    """``a * b`` rounded to float32, as GradScaler's float32 scale tensor computes it."""
    with np.errstate(over="ignore", under="ignore"):
        return float(np.float32(a) * np.float32(b))


FP16_SMALLEST_NORMAL = 2.0**-14
FP16_SMALLEST_SUBNORMAL = 2.0**-24
FP16_MAX = 65504.0
COLUMNS = ("grad_max_abs", "grad_zero_frac", "grad_underflow_frac")  # steps.csv, NaN where not measured


class GradientTelemetry(Telemetry):
    """The gradient statistics of a step, as :meth:`DynamicLossScaler.unscale_` measures them (see there):
    the largest |gradient|, and the fractions of the elements that are zero in the half backward pass's
    gradients and that would underflow FP16 without the scale."""

    key, columns = "grad_stats", COLUMNS

    def to_row(self, values: list[float]) -> dict[str, float]:
        largest, zeros, underflow, elements = values
        return dict(zip(self.columns, (largest, zeros / elements, underflow / elements)))


class LossScaleCollapse(RuntimeError):
    """The scale would back off below ``min_scale``: even there the gradients overflow."""


class DynamicLossScaler:
    """Dynamic loss scaling with overflow skipping.

    Each optimizer step:

    1. ``scaler.scale(loss).backward()`` backpropagates ``loss * scale``;
    2. ``found_inf = scaler.unscale_(model_params, master_params)`` copies the model's gradients
       into the master gradients, divides them by the scale and checks them for inf/NaN, in one
       fused pass and without a host sync;
    3. the caller skips the optimizer step if ``found_inf``;
    4. ``scaler.update(found_inf)`` backs the scale off by ``backoff_factor`` after an overflow,
       or multiplies it by ``growth_factor`` after ``growth_interval`` consecutive clean steps.

    With ``hysteresis=1`` and neither ``min_scale`` nor ``max_scale`` reached, the scale follows
    ``torch.amp.GradScaler`` step for step.

    Example::

        scaler = DynamicLossScaler()
        scaler.scale(loss).backward()
        found_inf = scaler.unscale_(master.model_params, master.params)
        skipped = bool(found_inf)        # the one host sync per step
        if not skipped:
            optimizer.step()
            master.copy_to_model_()
        scaler.update(skipped)

    Args:
        init_scale: the scale at the first step (default ``2.**16``, as GradScaler).
        growth_factor: multiplies the scale after ``growth_interval`` clean steps (default 2.0).
        backoff_factor: multiplies the scale after an overflow (default 0.5).
        growth_interval: clean steps between growths (default 2000).
        hysteresis: overflows tolerated before the scale backs off (default 1: back off at once). The
            count refills when the scale grows, as in DeepSpeed and Megatron (who default to 2).
        min_scale: the floor (default 1.0, as DeepSpeed and Megatron); ``None`` for none.
        max_scale: the ceiling for growth (default ``2.**24``, as apex); ``None`` for none.
        on_min_scale: ``"raise"`` (default) raises :class:`LossScaleCollapse` when a backoff would go
            below ``min_scale``; ``"skip"`` holds the scale at ``min_scale``, keeps skipping the
            overflowing steps and warns.
        dynamic: ``False`` keeps the scale at ``init_scale`` forever (a static scale; 1.0 = no
            scaling). Overflowing steps are still skipped: an inf gradient cannot be applied.
        telemetry_every: measure gradient statistics in :meth:`unscale_` every this many steps
            (the first step included), into :attr:`telemetry` (a :class:`GradientTelemetry`); ``None`` never.

    Note: ``update`` with a tensor, or ``bool(found_inf)``, waits for the device (one host sync).
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, hysteresis: int = 1, min_scale: float | None = 1.0,
                 max_scale: float | None = 2.0**24, on_min_scale: str = "raise", dynamic: bool = True,
                 telemetry_every: int | None = None):
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale must be a positive finite number, got {init_scale}")
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
        for name, value in (("growth_interval", growth_interval), ("hysteresis", hysteresis)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if on_min_scale not in ("raise", "skip"):
            raise ValueError(f"on_min_scale must be 'raise' or 'skip', got {on_min_scale!r}")
        if dynamic and min_scale is not None and max_scale is not None and not min_scale <= init_scale <= max_scale:
            raise ValueError(f"init_scale {init_scale} is outside [min_scale {min_scale}, max_scale {max_scale}]")
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.on_min_scale = on_min_scale
        self.dynamic = dynamic
        self._scale = _f32_mul(init_scale, 1.0)
        self._growth_tracker = 0
        self._hysteresis_tracker = hysteresis
        self.telemetry_every = telemetry_every
        self._steps = 0  # update() calls: optimizer steps taken or skipped
        self._steps_at_min_scale = 0
        self._unscaled = False
        self.telemetry = GradientTelemetry()

    def get_scale(self) -> float:
        return self._scale

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale``. Pass an FP32 loss: an FP16 one would overflow at 65504."""
        return loss * self._scale

    def telemetry_due(self) -> bool:
        """Whether the step in progress measures statistics: every ``telemetry_every`` steps, the first included
        (the FP8 layers ask too, so that their statistics come from the same steps)."""
        return self.telemetry_every is not None and self._steps % self.telemetry_every == 0

    def pop_stats(self) -> torch.Tensor | None:
        """The statistics measured at this step's :meth:`unscale_`, if it measured any (see there): the
        device tensor of :attr:`telemetry`'s :meth:`~GradientTelemetry.pop`."""
        return self.telemetry.pop()

    @torch.no_grad()
    def unscale_(self, model_params: list[torch.Tensor], master_params: list[torch.Tensor]) -> torch.Tensor:
        """Set each master grad to its model grad (widened to FP32) divided by the scale.

        Returns ``found_inf``, a one-element float tensor on the gradients' device that is 1.0 if
        any gradient is inf or NaN. Nothing here waits for the device. Call once per step, after
        backward and before :meth:`update`. ``master_params`` may be ``model_params`` themselves
        (no master weights): the gradients are then unscaled in place, in their own precision.

        Every ``telemetry_every`` steps it also records in :attr:`telemetry` a device tensor
        ``[largest |grad|, zero elements, elements that underflow FP16 unscaled, elements]``. The
        zeros are counted in the scaled model gradients (what the half backward pass produced), the
        underflows in the unscaled master gradients (nonzero and below FP16's smallest normal,
        2**-14: zero or subnormal in FP16 without scaling). The largest |grad| is inf/NaN on an
        overflowing step. Measuring costs three extra passes over the gradients and no sync."""
        if self._unscaled:
            raise RuntimeError("unscale_() was already called since the last update(); "
                               "call it once per optimizer step")
        model_grads, master_grads = [], []
        for p, m in zip(model_params, master_params, strict=True):
            if p.grad is None:
                m.grad = None  # an unused parameter must not be stepped with a stale gradient
                continue
            if m.grad is None:
                m.grad = torch.empty_like(m)
            model_grads.append(p.grad)
            master_grads.append(m.grad)
        if not master_grads:
            raise RuntimeError("unscale_() found no gradients: call it after backward()")
        device = master_grads[0].device
        telemetry = self.telemetry_due()
        separate = master_grads[0] is not model_grads[0]  # False without master weights: unscaled in place
        if telemetry:  # before the copy and the unscale, which (in place) would change what is counted
            elements = sum(g.numel() for g in model_grads)
            zeros = elements - sum(torch.count_nonzero(g) for g in model_grads)
        if separate:
            torch._foreach_copy_(master_grads, model_grads)  # FP16 -> FP32 is exact
        found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        inv_scale = torch.full((1,), 1.0 / self._scale, dtype=torch.float32, device=device)
        # one fused kernel: grads *= inv_scale, and found_inf = 1 if any element is inf or NaN
        torch._amp_foreach_non_finite_check_and_unscale_(master_grads, found_inf, inv_scale)
        if telemetry:
            # aminmax keeps inf/NaN, so an overflowing step shows as largest = inf or NaN
            largest = torch.stack([torch.stack(torch.aminmax(g)) for g in master_grads]).abs().max()
            below_normal = sum(torch.count_nonzero(g.abs().lt_(FP16_SMALLEST_NORMAL)) for g in master_grads)
            # FP16 -> FP32 widening and an FP32 unscale keep every nonzero nonzero; in FP16, in place, not
            master_zeros = zeros if separate else elements - sum(torch.count_nonzero(g) for g in master_grads)
            underflow = below_normal - master_zeros
            self.telemetry.record(torch.stack([largest.float(), zeros.float(), underflow.float(),
                                               torch.tensor(float(elements), device=device)]))
        self._unscaled = True
        return found_inf

    def update(self, found_inf: bool | torch.Tensor) -> None:
        """Back off after an overflow, grow after ``growth_interval`` clean steps.

        ``found_inf`` is a bool or a tensor (reading a tensor is a host sync). Raises
        :class:`LossScaleCollapse` under ``on_min_scale="raise"`` when the scale would fall
        below ``min_scale``."""
        found = bool(found_inf.item()) if isinstance(found_inf, torch.Tensor) else bool(found_inf)
        self._unscaled = False
        self._steps += 1
        if not self.dynamic:
            return
        if found:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self._back_off()
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                grown = _f32_mul(self._scale, self.growth_factor)
                if self.max_scale is not None:
                    grown = min(grown, self.max_scale)
                if math.isfinite(grown):  # as GradScaler: never grow to inf
                    self._scale = grown
                self._growth_tracker = 0
                self._hysteresis_tracker = self.hysteresis

    def _back_off(self) -> None:
        backed_off = _f32_mul(self._scale, self.backoff_factor)
        if self.min_scale is None or backed_off >= self.min_scale:
            self._scale = backed_off
            return
        if self.on_min_scale == "raise":
            raise LossScaleCollapse(
                f"the loss scale would fall below min_scale={self.min_scale:g}: the gradients overflow FP16 "
                f"even at scale {self._scale:g}, so the run has likely diverged; lower --lr, or let it go on "
                "skipping with --on-min-scale skip")
        self._scale = float(self.min_scale)
        self._steps_at_min_scale += 1
        if self._steps_at_min_scale in (1, 10, 100) or self._steps_at_min_scale % 1000 == 0:
            warnings.warn(f"loss scale held at min_scale={self.min_scale:g}: {self._steps_at_min_scale} "
                          "overflowing steps skipped there so far", stacklevel=3)

    # what a checkpoint holds, in state_dict's order: (key, attribute, how a loaded value is read; None: as it is)
    _STATE = (("scale", "_scale", float), ("growth_factor", "growth_factor", float),
              ("backoff_factor", "backoff_factor", float), ("growth_interval", "growth_interval", int),
              ("growth_tracker", "_growth_tracker", int), ("hysteresis", "hysteresis", int),
              ("hysteresis_tracker", "_hysteresis_tracker", int), ("min_scale", "min_scale", None),
              ("max_scale", "max_scale", None), ("on_min_scale", "on_min_scale", None), ("dynamic", "dynamic", bool),
              ("steps_at_min_scale", "_steps_at_min_scale", int), ("steps", "_steps", int),
              ("telemetry_every", "telemetry_every", None))

    def state_dict(self) -> dict:
        return {key: getattr(self, attr) for key, attr, _ in self._STATE}

    def load_state_dict(self, state: dict) -> None:
        for key, attr, read in self._STATE:
            setattr(self, attr, state[key] if read is None else read(state[key]))
        self._unscaled = False
