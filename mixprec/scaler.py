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

import numpy as np
import torch


def _f32_mul(a: float, b: float) -> float:
    """``a * b`` rounded to float32, as GradScaler's float32 scale tensor computes it."""
    with np.errstate(over="ignore", under="ignore"):
        return float(np.float32(a) * np.float32(b))


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

    Note: ``update`` with a tensor, or ``bool(found_inf)``, waits for the device (one host sync).
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale must be a positive finite number, got {init_scale}")
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
        if not (isinstance(growth_interval, int) and growth_interval > 0):
            raise ValueError(f"growth_interval must be a positive integer, got {growth_interval}")
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self._scale = _f32_mul(init_scale, 1.0)
        self._growth_tracker = 0
        self._unscaled = False

    def get_scale(self) -> float:
        return self._scale

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale``. Pass an FP32 loss: an FP16 one would overflow at 65504."""
        return loss * self._scale

    @torch.no_grad()
    def unscale_(self, model_params: list[torch.Tensor], master_params: list[torch.Tensor]) -> torch.Tensor:
        """Set each master grad to its model grad (widened to FP32) divided by the scale.

        Returns ``found_inf``, a one-element float tensor on the gradients' device that is 1.0 if
        any gradient is inf or NaN. Nothing here waits for the device. Call once per step, after
        backward and before :meth:`update`."""
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
        torch._foreach_copy_(master_grads, model_grads)  # FP16 -> FP32 is exact
        found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        inv_scale = torch.full((1,), 1.0 / self._scale, dtype=torch.float32, device=device)
        # one fused kernel: grads *= inv_scale, and found_inf = 1 if any element is inf or NaN
        torch._amp_foreach_non_finite_check_and_unscale_(master_grads, found_inf, inv_scale)
        self._unscaled = True
        return found_inf

    def update(self, found_inf: bool | torch.Tensor) -> None:
        """Back off after an overflow, grow after ``growth_interval`` clean steps.

        ``found_inf`` is a bool or a tensor (reading a tensor is a host sync)."""
        found = bool(found_inf.item()) if isinstance(found_inf, torch.Tensor) else bool(found_inf)
        if found:
            self._scale = _f32_mul(self._scale, self.backoff_factor)
            self._growth_tracker = 0
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                grown = _f32_mul(self._scale, self.growth_factor)
                if math.isfinite(grown):  # as GradScaler: never grow to inf
                    self._scale = grown
                self._growth_tracker = 0
        self._unscaled = False

    def state_dict(self) -> dict:
        return {"scale": self._scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "growth_tracker": self._growth_tracker}

    def load_state_dict(self, state: dict) -> None:
        self._scale = float(state["scale"])
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
        self._growth_tracker = int(state["growth_tracker"])
        self._unscaled = False
