"""FP32 master weights for a half-precision model (Micikevicius et al. 2018, section 3.1).

The forward and backward passes run in the half model; the optimizer owns FP32 copies of the
parameters, so that an update much smaller than the weight (``1 + 1e-4`` is ``1`` in FP16) still
accumulates. Three steps, as in apex's ``fp16_utils``: make the copies (:class:`MasterWeights`),
move the gradients in (done by :meth:`DynamicLossScaler.unscale_`, which unscales them on the
way), and copy the updated weights back (:meth:`MasterWeights.copy_to_model_`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .telemetry import Telemetry

COLUMNS = ("update_lost_frac", "decay_lost_frac")  # steps.csv, NaN where not measured (see lost_updates)
_NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def half_with_fp32_norm_(model: nn.Module, dtype: torch.dtype = torch.float16, fp32_norm: bool = True) -> nn.Module:
    """Cast ``model`` to ``dtype`` in place, keeping normalization layers in FP32.

    BatchNorm's running variance and its sums over a whole batch lose too much in FP16; the FP32
    layers take the FP16 activations and return FP16 ones (PyTorch's mixed-type batch norm).
    ``fp32_norm=False`` casts them too (the --fp16-batchnorm ablation)."""
    model.to(dtype)
    if fp32_norm:
        for m in model.modules():
            if isinstance(m, _NORM_LAYERS):
                m.float()
    return model


class LostUpdateTelemetry(Telemetry):
    """What rounding took from a step without master weights (see :func:`lost_updates`): the fractions of
    the moving weights that did not move, and of the nonzero weights whose decay rounded away."""

    key, columns = "update_stats", COLUMNS

    def to_row(self, values: list[float]) -> dict[str, float]:
        lost, moving, decays_lost, nonzero = values
        return dict(zip(self.columns, (lost / max(moving, 1), decays_lost / max(nonzero, 1))))


class MasterWeights:
    """FP32 master copies of a model's parameters, made before the model is cast to half.

    Making the copies from the FP32 model keeps the manual mode's initial weights bit-identical to
    the baseline's; the half model then holds those weights rounded to ``dtype``.

    Example::

        master = MasterWeights(model)          # model still FP32
        half_with_fp32_norm_(model)            # now the model runs in FP16
        opt = torch.optim.SGD(master.params, lr=0.1)
        ...                                    # backward, scaler.unscale_(master.model_params, master.params)
        opt.step(); master.copy_to_model_()
    """

    def __init__(self, model: nn.Module, enabled: bool = True):
        self.enabled = enabled
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        # disabled (the --no-master-weights ablation): the optimizer owns the model's own parameters
        self.params = ([nn.Parameter(p.detach().clone().float()) for p in self.model_params] if enabled
                       else self.model_params)
        self.telemetry = LostUpdateTelemetry()

    @contextmanager
    def watching(self, optimizer: torch.optim.Optimizer, measure: bool):
        """Around ``optimizer.step()``: without master weights, on a ``measure`` step, count what the half
        weights failed to take (into :attr:`telemetry`); otherwise nothing. With master weights nothing is
        lost to the model's precision, so nothing is measured."""
        halves = [p for p in self.params if p.dtype != torch.float32]  # FP32 (BatchNorm) ones lose nothing
        if self.enabled or not measure or not halves:
            yield
            return
        before = [p.detach().clone() for p in halves]
        yield
        self.telemetry.record(lost_updates(optimizer, halves, before))

    def pop_stats(self) -> torch.Tensor | None:
        """``[updates lost, nonzero updates, decays lost, nonzero weights]`` of the last measured step
        (see :func:`lost_updates`), or None: the device tensor of :attr:`telemetry`'s ``pop``."""
        return self.telemetry.pop()

    @torch.no_grad()
    def copy_to_model_(self) -> None:
        """Round the FP32 master weights into the model's (half or FP32) parameters."""
        if self.enabled:
            torch._foreach_copy_(self.model_params, self.params)

    def state_dict(self) -> list[torch.Tensor]:
        return [p.detach() for p in self.params]

    @torch.no_grad()
    def load_state_dict(self, state: list[torch.Tensor]) -> None:
        torch._foreach_copy_(self.params, list(state))
        self.copy_to_model_()


@torch.no_grad()
def lost_updates(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], before: list[torch.Tensor]) -> torch.Tensor:
    """What SGD steps on half-precision weights (no master weights) lose to rounding, measured after
    ``optimizer.step()`` from the weights ``before`` it: ``[updates lost, nonzero updates, decays lost,
    nonzero weights]`` over the half-precision parameters (FP32 ones, BatchNorm's, are left out), as one device
    tensor (no host sync).

    * An update is lost where SGD's step direction ``d`` is nonzero and yet ``w - lr * d == w`` in the
      weight's precision: the weight did not move. ``d`` is recomputed in FP32 from the gradient, the
      weight decay and the momentum buffer the step left (``buf``, or ``g + wd * w + momentum * buf``
      with Nesterov).
    * A decay is lost where the weight decay alone, ``w * (1 - lr * wd)``, rounds back to ``w``: in FP16
      that is every weight once ``lr * wd`` is below half of FP16's relative spacing, 2**-12 (2.4e-4;
      lr 0.2 and wd 5e-4 give 1e-4). The decay can then move a weight only through SGD's step direction, where
      it is added to the gradient and, with momentum, accumulated over steps.
    """
    state, groups = optimizer.state, {id(p): g for g in optimizer.param_groups for p in g["params"]}
    device = params[0].device
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for p, w in zip(params, before, strict=True):
        if p.grad is None or p.dtype == torch.float32:  # BatchNorm stays FP32 (and so keeps its updates)
            continue
        group = groups[id(p)]
        lr, wd, momentum = group["lr"], group.get("weight_decay", 0.0), group.get("momentum", 0.0)
        d = p.grad.float() + wd * w.float()
        buf = state.get(p, {}).get("momentum_buffer")
        if momentum and buf is not None:
            d = d + momentum * buf.float() if group.get("nesterov") else buf.float()
        moving, nonzero = d != 0, w != 0
        decayed = (w.float() * (1 - lr * wd)).to(w.dtype)
        totals += torch.stack([torch.count_nonzero(moving & (p == w)), torch.count_nonzero(moving),
                               torch.count_nonzero(nonzero & (decayed == w)), torch.count_nonzero(nonzero)]).double()
    return totals
