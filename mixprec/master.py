"""How the optimizer's updates reach a half-precision model: FP32 master weights (Micikevicius et al. 2018,
section 3.1), or what can replace them (``--master-weights``).

The forward and backward passes run in the half model. With ``fp32`` the optimizer owns FP32 copies of the
parameters, so that an update much smaller than the weight (``1 + 1e-4`` is ``1`` in FP16) still accumulates.
Three steps, as in apex's ``fp16_utils``: make the copies (:class:`MasterWeights`), move the gradients in
(done by :meth:`DynamicLossScaler.unscale_`, which unscales them on the way), and copy the updated weights
back (:meth:`MasterWeights.copy_to_model_`, which :meth:`MasterWeights.stepping` calls after the step).

The alternatives keep no FP32 weights from one step to the next:

* ``none``: the optimizer updates the half weights in place, and an update below half their spacing is lost
  (:func:`lost_updates` measures how many).
* ``stochastic``: the optimizer updates FP32 working copies of the half weights, widened from them just
  before the step and freed after it (between steps they hold no storage), and each new weight is rounded stochastically into the model (:func:`stochastic_round`):
  up or down with the probabilities that make its expectation the FP32 result (Wang et al. 2018; Zamirai et
  al. 2020). The random bits come from a generator of their own, seeded by the run's seed.
* ``kahan``: the same working copies, and each new weight is rounded to nearest, with what rounding took
  carried in a half-precision compensation buffer and added to the next update (:func:`kahan_add_`), as
  the ``optimi`` optimizers and AnyPrecisionAdamW do.

In all three of fp32, stochastic and kahan the optimizer (SGD with momentum and weight decay) does the update
arithmetic in FP32, on FP32 gradients, with FP32 momentum; only what the model keeps differs.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .config import MASTER_WEIGHTS as KINDS  # fp32, none, stochastic, kahan
from .telemetry import Telemetry

COLUMNS = ("update_lost_frac", "decay_lost_frac")  # steps.csv, NaN where not measured (see lost_updates)
NEAREST_COLUMNS = ("update_lost_nearest_frac",)  # with stochastic and kahan, what nearest rounding would lose
# The stochastic-rounding generator's seed is the run's seed plus this, so that its stream of random bits is
# not the stream (seeded with the run's seed alone) that drew the initial weights, which it would then follow.
ROUNDING_SEED_OFFSET = 0x5EED_0BAD
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
    """What rounding took from a step without FP32 master weights: the fraction of the moving weights (those
    with a nonzero update) that did not move, and (with ``none``, see :func:`lost_updates`) of the nonzero
    weights whose decay rounded away."""

    key, columns = "update_stats", COLUMNS

    def to_row(self, values: list[float]) -> dict[str, float]:
        lost, moving, decays_lost, nonzero = values[:4]
        return dict(zip(COLUMNS, (lost / max(moving, 1), decays_lost / max(nonzero, 1))))


class LostUpdateVsNearestTelemetry(LostUpdateTelemetry):
    """:class:`LostUpdateTelemetry` of ``stochastic`` and ``kahan``, beside what rounding the same FP32 result to
    nearest, without compensation, would have lost (``update_lost_nearest_frac``). A weight counts as lost when
    what the run keeps of it did not move: its half weight with ``stochastic``, its half weight and its
    compensation with ``kahan`` (an update that only moved the compensation is carried, not lost). Weight
    decay is not measured apart (``decay_lost_frac`` is NaN)."""

    columns = COLUMNS + NEAREST_COLUMNS

    def to_row(self, values: list[float]) -> dict[str, float]:
        lost, moving, _, _, nearest_lost = values
        return {**super().to_row(values), "update_lost_nearest_frac": nearest_lost / max(moving, 1)}


@torch.no_grad()
def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """``x`` (FP32) rounded stochastically to ``dtype``: to one of its two neighbours in ``dtype``, the farther
    one with probability ``|x - nearest| / spacing``, so that the expectation is ``x`` (up to FP32's
    resolution of that probability, 2**-24 of the spacing). A value ``dtype`` holds exactly stays as it is.
    One uniform number per element comes from ``generator``, which must be on ``x``'s device.

    Example::

        g = torch.Generator().manual_seed(0)
        stochastic_round(torch.full((10000,), 1 + 2**-12), torch.float16, g).float().mean()  # ~1 + 2**-12
    """
    nearest = x.to(dtype)
    near = nearest.float()
    away = torch.full((), torch.inf, dtype=dtype, device=x.device)
    other = torch.nextafter(nearest, torch.where(x > near, away, -away))  # the neighbour on x's other side
    p_other = (x - near) / (other.float() - near)  # in [0, 1/2]; 0 where x is exact
    u = torch.rand(x.shape, generator=generator, device=x.device)
    return torch.where(u < p_other, other, nearest)


@torch.no_grad()
def kahan_add_(weight: torch.Tensor, compensation: torch.Tensor, update: torch.Tensor) -> None:
    """``weight += update`` (an FP32 update to a half ``weight``) with Kahan's compensation: the update is added
    to what earlier roundings took (``compensation``, in ``weight``'s dtype), the sum is rounded to nearest
    into ``weight``, and what this rounding took becomes the new ``compensation``. The arithmetic is FP32;
    only the two stored tensors are half. Over many steps the weight then tracks the FP32 sum to within its
    own spacing, where rounding each update alone would drop every update below half of it.

    Example::

        w, c = torch.ones(1, dtype=torch.float16), torch.zeros(1, dtype=torch.float16)
        for _ in range(1000):
            kahan_add_(w, c, torch.full((1,), 1e-5))  # w ends at 1.01 (within 2**-10); w += 1e-5 stays 1
    """
    old = weight.float()
    carried = update + compensation.float()
    weight.copy_(old + carried)  # round to nearest
    compensation.copy_(carried - (weight.float() - old))  # what it did not take (exact difference of halves)


class MasterWeights:
    """What the optimizer steps for a half model, and how its result gets into the model: ``kind`` is one of
    :data:`KINDS` (``--master-weights``), see the module's docstring.

    Make it from the FP32 model, before the model is cast to half: the FP32 master copies (``fp32``) then
    hold the initial weights bit-identical to the baseline's, and the half model holds them rounded. Build
    the optimizer over :attr:`params` (FP32 Parameters, or with ``none`` the model's own), have the loss
    scaler unscale the model's gradients into theirs, and run ``optimizer.step()`` inside :meth:`stepping`,
    which prepares :attr:`params` before the step and writes the result into the model after it.

    Example::

        master = MasterWeights(model, "kahan")     # model still FP32
        half_with_fp32_norm_(model)                # now the model runs in FP16
        opt = torch.optim.SGD(master.params, lr=0.1)
        ...                                        # backward, scaler.unscale_(master.model_params, master.params)
        with master.stepping(opt, measure=False):
            opt.step()

    ``stochastic`` draws from a generator on the parameters' device, seeded by ``seed`` (the run's, see
    :data:`ROUNDING_SEED_OFFSET`); every rank of a torchrun group draws the same numbers, so the replicas stay
    equal. Its state, and ``kahan``'s compensation, are in :meth:`state_dict`.
    """

    def __init__(self, model: nn.Module, kind: str = "fp32", seed: int = 0):
        if kind not in KINDS:
            raise ValueError(f"unknown master weights {kind!r}: choose one of {', '.join(KINDS)}")
        self.kind = kind
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        # none: the optimizer owns the model's own parameters. Otherwise FP32 ones: with fp32 the master weights,
        # with stochastic and kahan working copies, widened from the half weights for each step and released
        # after it (the Parameters keep their shape, as the optimizer's keys; between steps, no storage)
        self.params = (self.model_params if kind == "none"
                       else [nn.Parameter(p.detach().clone().float()) for p in self.model_params])
        self._release_workspace_()
        device = self.model_params[0].device if self.model_params else torch.device("cpu")
        self.generator = (torch.Generator(device=device).manual_seed(seed + ROUNDING_SEED_OFFSET)
                          if kind == "stochastic" else None)
        self._compensation: list[torch.Tensor | None] | None = None  # kahan: made once the model is half
        self.telemetry = LostUpdateVsNearestTelemetry() if kind in ("stochastic", "kahan") else LostUpdateTelemetry()

    @property
    def master_params(self) -> list[torch.Tensor]:
        """The FP32 master weights (``fp32``), else none."""
        return self.params if self.kind == "fp32" else []

    @property
    def workspace_bytes(self) -> int:
        """Bytes of the FP32 working copies that the optimizer steps with ``stochastic`` and ``kahan`` (else 0).
        They exist only during the optimizer step (:meth:`stepping` widens them from the half weights first and
        releases them after): a transient, not a copy of the weights kept between steps; an implementation that
        fused the step and the rounding into one kernel would not need them at all."""
        return 4 * sum(p.numel() for p in self.model_params) if self.kind in ("stochastic", "kahan") else 0

    def _release_workspace_(self) -> None:
        """``stochastic`` and ``kahan``: free the working copies' storage, keeping their shape (as FSDP frees a
        sharded parameter's). Their gradients, the FP32 gradients the scaler unscales into, stay."""
        if self.kind in ("stochastic", "kahan"):
            for m in self.params:
                m.untyped_storage().resize_(0)

    @property
    def compensation(self) -> list[torch.Tensor]:
        """``kahan``'s compensation buffers, one per half-precision parameter in its dtype (else none): what
        rounding took from its weight so far."""
        return [c for c in self._aligned_compensation() if c is not None] if self.kind == "kahan" else []

    def _aligned_compensation(self) -> list[torch.Tensor | None]:
        """``kahan``'s buffers aligned with :attr:`model_params` (None for an FP32 one), made at first use, since
        the model is cast to half after this object is made."""
        if self._compensation is None:
            self._compensation = [torch.zeros_like(p) if p.dtype != torch.float32 else None
                                  for p in self.model_params]
        return self._compensation

    def describe(self) -> str:
        """How the run's weights are kept, for its first log line."""
        return {"fp32": "FP32 master weights", "none": "no master weights (updated in half)",
                "stochastic": "no master weights (FP32 updates stochastically rounded into the half weights)",
                "kahan": "no master weights (FP32 updates rounded into the half weights with a half-precision "
                         "Kahan compensation buffer)"}[self.kind]

    @contextmanager
    def stepping(self, optimizer: torch.optim.Optimizer, measure: bool):
        """Around ``optimizer.step()``. Before it, ``stochastic`` and ``kahan`` widen the half weights into the
        FP32 working copies (exactly). After it, the result reaches the model: ``fp32`` rounds the master
        weights to nearest into it (:meth:`copy_to_model_`), ``stochastic`` rounds the working copies
        stochastically, ``kahan`` adds their update with compensation; ``none`` has nothing to do. On a
        ``measure`` step, what rounding lost is recorded into :attr:`telemetry` (not with ``fp32``, which loses
        nothing to the model's precision)."""
        if self.kind == "fp32":
            yield
            self.copy_to_model_()
            return
        if self.kind == "none":
            halves = [p for p in self.params if p.dtype != torch.float32]  # FP32 (BatchNorm) ones lose nothing
            before = [p.detach().clone() for p in halves] if measure and halves else None
            yield
            if before is not None:
                self.telemetry.record(lost_updates(optimizer, halves, before))
            return
        for m in self.params:
            m.untyped_storage().resize_(m.numel() * m.element_size())
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.model_params)  # half -> FP32 is exact
        yield
        self._round_into_model_(measure)
        self._release_workspace_()

    @torch.no_grad()
    def _round_into_model_(self, measure: bool) -> None:
        """``stochastic`` and ``kahan``: the stepped working copies into the half weights (FP32 ones, BatchNorm's,
        are copied), counting ``[lost, moving, NaN, 0, lost to nearest rounding]`` on a ``measure`` step."""
        compensation = self._aligned_compensation() if self.kind == "kahan" else None
        counts = []
        for i, (p, new) in enumerate(zip(self.model_params, self.params, strict=True)):
            if p.dtype == torch.float32:
                p.copy_(new)
                continue
            old = p.detach().clone() if measure else None
            if self.kind == "stochastic":
                p.copy_(stochastic_round(new, p.dtype, self.generator))
                kept = p == old if measure else None
            else:
                c = compensation[i]
                c_old = c.clone() if measure else None
                kahan_add_(p, c, new - p.float())  # the FP32 update: exact, new and p being close
                kept = (p == old) & (c == c_old) if measure else None
            if measure:
                moving = new != old.float()
                counts.append(torch.stack([torch.count_nonzero(moving & kept), torch.count_nonzero(moving),
                                           torch.count_nonzero(moving & (new.to(p.dtype) == old))]))
        if counts:
            lost, moving, nearest = torch.stack(counts).sum(0).double()
            self.telemetry.record(torch.stack([lost, moving, torch.full_like(lost, torch.nan),
                                               torch.zeros_like(lost), nearest]))

    def pop_stats(self) -> torch.Tensor | None:
        """What :attr:`telemetry` measured at the last measured step (see :func:`lost_updates` and
        :meth:`stepping`), or None: the device tensor of its ``pop``."""
        return self.telemetry.pop()

    @torch.no_grad()
    def copy_to_model_(self) -> None:
        """``fp32``: round the FP32 master weights to nearest into the model's (half or FP32) parameters."""
        if self.kind == "fp32":
            torch._foreach_copy_(self.model_params, self.params)

    def state_dict(self) -> list[torch.Tensor] | dict | None:
        """What a checkpoint needs: ``fp32``'s master weights (a list, as before there were other kinds),
        ``stochastic``'s generator state, ``kahan``'s compensation buffers; None for ``none`` (the model's
        weights are all there is)."""
        if self.kind == "fp32":
            return [p.detach() for p in self.params]
        if self.kind == "stochastic":
            return {"generator": self.generator.get_state()}
        if self.kind == "kahan":
            return {"compensation": [c.detach() for c in self.compensation]}
        return None

    @torch.no_grad()
    def load_state_dict(self, state) -> None:
        if self.kind == "fp32":
            torch._foreach_copy_(self.params, list(state))
            self.copy_to_model_()
        elif self.kind == "stochastic":
            self.generator.set_state(state["generator"])
        elif self.kind == "kahan":
            torch._foreach_copy_(self.compensation, list(state["compensation"]))


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
