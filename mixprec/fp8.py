"""Emulated FP8 training: the two formats, scaled saturating casts, and TransformerEngine-style delayed scaling.

FP8 has far less range than FP16 (E4M3: 2^-9 to 448), so every tensor an FP8 matrix multiply takes is
scaled first: ``q = cast(clamp(x * scale, -max, max))``, and the product is multiplied by ``1 / scale``
of each operand afterwards, as an H100 tensor core's epilogue does. This module holds the pieces; the
arithmetic itself is :mod:`mixprec.halfops`' conv2d/linear layer, whose autograd Functions take a
:class:`Fp8Layer` and then quantize their operands here (see :class:`~mixprec.halfops.EmulatedFp8`).

The recipe is the "HYBRID" one of Micikevicius et al. 2022 ("FP8 Formats for Deep Learning") and of
NVIDIA TransformerEngine: E4M3 for the forward operands (activations and weights), E5M2 for the
gradients of the layer outputs in backward. Each routed layer keeps, for each of its three tensors, an
amax history (the largest magnitude of the last ``amax_history`` uses); **delayed scaling** takes the
scale from the history, ``scale = max_of_format / (max(history) * 2**margin)``, and pushes the current
tensor's amax only after using it, so the scale of step t comes from steps before t. While the history
is still empty (a layer's first use) the current tensor's own amax is used. **Current scaling** always
scales from the tensor's own amax. A tensor whose amax is 0 (all zeros) keeps the previous scale; one
holding inf/NaN (an overflowing step, which the loss scaler skips) pushes 0 into the history, and its
``scale_inv`` is NaN, so everything computed from it is NaN and the loss scaler sees the overflow.

Nothing here waits for the device: amaxes, scales and telemetry stay device tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn

from .telemetry import Telemetry


@dataclass(frozen=True)
class Fp8Format:
    """One FP8 format: its torch dtype, its largest finite value, and the magnitude from which a plain
    round-to-nearest cast would overflow (``max`` plus half a unit in its last place)."""

    name: str
    dtype: torch.dtype
    max: float
    overflow: float


E4M3 = Fp8Format("E4M3", torch.float8_e4m3fn, 448.0, 464.0)  # 3 mantissa bits: unit roundoff 2^-4
E5M2 = Fp8Format("E5M2", torch.float8_e5m2, 57344.0, 61440.0)  # 2 mantissa bits: unit roundoff 2^-3
ROLES = ("weight", "activation", "grad")  # the tensor classes of the telemetry, in its order
STATS = ("saturated_frac", "flushed_frac", "scale")
COLUMNS = tuple(f"fp8_{role}_{stat}" for role in ROLES for stat in STATS)  # steps.csv, NaN where not measured


@dataclass(frozen=True)
class Fp8Recipe:
    """How FP8 is applied: ``scaling`` "delayed" (from an amax history of ``amax_history`` uses) or
    "current" (from each tensor's own amax); the scale is divided by ``2**margin`` for headroom; with
    ``all_layers`` False the first layer to run and the last (the first convolution and the classifier)
    stay in FP16, as in the FP8 paper."""

    scaling: str = "delayed"
    amax_history: int = 16
    margin: int = 0
    all_layers: bool = False


class Fp8Tensor(NamedTuple):
    data: torch.Tensor  # FP8
    scale: torch.Tensor  # FP32 scalar: data ~ x * scale
    scale_inv: torch.Tensor  # 1 / scale; NaN when x held inf/NaN, so that results computed from it are NaN


def amax(x: torch.Tensor) -> torch.Tensor:
    """The largest magnitude in ``x`` as an FP32 scalar (inf/NaN if ``x`` holds any), in one pass."""
    lo, hi = torch.aminmax(x)
    return torch.maximum(-lo, hi).float()


def scaled_cast(x: torch.Tensor, scale: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """``cast(clamp(x * scale, -max, max))`` to ``fmt``: finite values saturate at the format's max instead
    of becoming NaN (E4M3) or inf (E5M2), as an H100's saturating conversion does; NaN stays NaN. The
    product is taken in FP32 (exact widening of a half ``x``), so the only rounding is the cast's."""
    return x.to(torch.float32, copy=True).mul_(scale).clamp_(-fmt.max, fmt.max).to(fmt.dtype)


_WIDEN: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def widen(data: torch.Tensor) -> torch.Tensor:
    """The FP32 values of an FP8 tensor's codes: ``data.float()``, bit for bit (NaN codes included), by a
    lookup in the format's 256-entry table. PyTorch's own FP8 -> FP32 conversion of E4M3 runs element by
    element on a CPU, about as long as the convolution it feeds; the lookup is a vectorized gather."""
    key = (data.dtype, data.device)
    table = _WIDEN.get(key)
    if table is None:
        codes = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(data.dtype)
        table = _WIDEN[key] = codes.float().to(data.device)
    return table.index_select(0, data.view(torch.uint8).flatten().int()).view(data.shape)


def dequantize(t: Fp8Tensor) -> torch.Tensor:
    """``t.data / t.scale`` in FP32: the value the FP8 tensor stands for."""
    return widen(t.data) * t.scale_inv


class Fp8Telemetry(Telemetry):
    """Per-step sums, on the device, over every FP8 quantization of one class (weights, activations,
    gradients): elements saturated (``|x * scale|`` at or beyond the format's overflow threshold, where a
    plain cast would have overflowed), elements flushed to zero (nonzero in, zero out), elements, and the
    sum of log2(scale) over uses. :meth:`pop` turns them into the fractions and the geometric-mean scale,
    one value per column of :data:`COLUMNS`."""

    key, columns = "fp8_stats", COLUMNS

    def __init__(self, device: torch.device):
        super().__init__()
        self.sums = torch.zeros(len(ROLES), 5, dtype=torch.float64, device=device)
        self.measured = False

    def add(self, role: str, saturated: torch.Tensor, flushed: torch.Tensor, elements: int,
            scale: torch.Tensor) -> None:
        """Count one quantization of ``elements`` elements (the counts are device tensors)."""
        device = self.sums.device
        self.sums[ROLES.index(role)] += torch.stack([
            saturated.double(), flushed.double(), torch.tensor(float(elements), dtype=torch.float64, device=device),
            scale.double().log2(), torch.ones((), dtype=torch.float64, device=device)])
        self.measured = True

    def pop(self) -> torch.Tensor | None:
        """``[saturated_frac, flushed_frac, scale]`` for weights, activations and gradients (the order of
        :data:`COLUMNS`) since the last pop, as one device tensor; None if nothing was measured. The scale
        is the geometric mean over the FP8 layers' uses; a class nothing measured is NaN."""
        if not self.measured:
            return None
        s = self.sums
        out = torch.stack([s[:, 0] / s[:, 2], s[:, 1] / s[:, 2], torch.exp2(s[:, 3] / s[:, 4])], dim=1).flatten()
        self.sums = torch.zeros_like(self.sums)
        self.measured = False
        return out


class TensorScaling:
    """The scaling state of one tensor of one layer: its format, amax history, and last scale.

    Example::

        s = TensorScaling(E4M3, Fp8Recipe(amax_history=3), "activation")
        q = s.quantize(x)            # first use: scaled from x's own amax, which is then pushed
        q = s.quantize(x2)           # scaled from max(history) = amax(x); then amax(x2) is pushed
    """

    def __init__(self, fmt: Fp8Format, recipe: Fp8Recipe, role: str, device: torch.device | str = "cpu",
                 telemetry: Fp8Telemetry | None = None, measuring: Callable[[], bool] = lambda: False):
        self.fmt, self.role, self.telemetry, self.measuring = fmt, role, telemetry, measuring
        self.delayed = recipe.scaling == "delayed"
        self.margin = recipe.margin
        self.history = torch.zeros(recipe.amax_history, device=device)  # zeros do not change its max
        self.scale = torch.ones((), device=device)
        self.recorded = 0  # amaxes pushed so far: a Python count, so choosing the reference costs no sync

    def next_scale(self, current_amax: torch.Tensor) -> torch.Tensor:
        """The scale for a tensor whose own amax is ``current_amax``, without recording anything."""
        reference = self.history.max() if self.delayed and self.recorded else current_amax
        usable = torch.isfinite(reference) & (reference > 0)
        return torch.where(usable, self.fmt.max / (reference * 2.0**self.margin), self.scale)

    def quantize(self, x: torch.Tensor, record: bool = True) -> Fp8Tensor:
        """``x`` scaled and cast to the format. With ``record`` (a training use) the scale is kept, ``x``'s
        amax is pushed into the history after the scale was chosen, and the telemetry counts it on the
        steps it measures; evaluation passes ``record=False`` and leaves the state as it was."""
        current = amax(x)
        scale = self.next_scale(current)
        y = x.to(torch.float32, copy=True).mul_(scale)  # one new FP32 tensor, scaled in place
        measure = record and self.telemetry is not None and self.measuring()
        if measure:  # before the clamp, which (in place) hides what saturated
            saturated = torch.count_nonzero(y.abs() >= self.fmt.overflow)
        q = y.clamp_(-self.fmt.max, self.fmt.max).to(self.fmt.dtype)
        finite = torch.isfinite(current)
        if record:
            self.history[self.recorded % len(self.history)] = torch.where(finite, current, 0.0)
            self.recorded += 1
            self.scale = scale
        if measure:
            # nonzero in, zero out; float8 has no count_nonzero, and -0 (bit pattern 0x80) is zero too
            flushed = torch.count_nonzero(x) - torch.count_nonzero(q.view(torch.uint8) & 0x7F)
            self.telemetry.add(self.role, saturated, flushed, x.numel(), scale)
        return Fp8Tensor(q, scale, torch.where(finite, 1.0 / scale, math.nan))

    def state_dict(self) -> dict:
        return {"history": self.history.clone(), "scale": self.scale.clone(), "recorded": self.recorded}

    def load_state_dict(self, state: dict) -> None:
        self.history = state["history"].to(self.history.device)
        self.scale = state["scale"].to(self.scale.device)
        self.recorded = state["recorded"]


class Fp8Layer:
    """The FP8 state of one Conv2d or Linear module: the scaling of its input activation and weight (E4M3)
    and of the gradient of its output (E5M2), and how often it ran in FP8 (``uses``)."""

    def __init__(self, name: str, recipe: Fp8Recipe, device, telemetry: Fp8Telemetry | None = None,
                 measuring: Callable[[], bool] = lambda: False):
        self.name = name
        self.input = TensorScaling(E4M3, recipe, "activation", device, telemetry, measuring)
        self.weight = TensorScaling(E4M3, recipe, "weight", device, telemetry, measuring)
        self.grad = TensorScaling(E5M2, recipe, "grad", device, telemetry, measuring)
        self.uses = 0

    def quantize_forward(self, x: torch.Tensor, weight: torch.Tensor, record: bool) -> tuple[Fp8Tensor, Fp8Tensor]:
        self.uses += record
        return self.input.quantize(x, record), self.weight.quantize(weight, record)

    def quantize_grad(self, grad_out: torch.Tensor) -> Fp8Tensor:
        return self.grad.quantize(grad_out)  # backward runs in training only: always recorded

    widen = staticmethod(widen)  # FP8 codes to FP32, for the layer's arithmetic (see :func:`widen`)

    @staticmethod
    def requantize(x: torch.Tensor, weight: torch.Tensor, x_scale: torch.Tensor,
                   w_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The FP8 input and weight of the forward pass, again, as FP32 values: the saved half tensors cast
        with the scales the forward pass used (the same FP8 codes bit for bit; nothing is recorded)."""
        return widen(scaled_cast(x, x_scale, E4M3)), widen(scaled_cast(weight, w_scale, E4M3))

    def state_dict(self) -> dict:
        return {k: getattr(self, k).state_dict() for k in ("input", "weight", "grad")} | {"uses": self.uses}

    def load_state_dict(self, state: dict) -> None:
        for k in ("input", "weight", "grad"):
            getattr(self, k).load_state_dict(state[k])
        self.uses = state["uses"]


def first_and_last_layers(model: nn.Module, image_size: int = 32) -> list[str]:
    """The names of the first and the last Conv2d/Linear module to run in a forward pass (the stem
    convolution and the classifier), found by running a meta-device copy of ``model`` once."""
    from .models import meta_copy

    net = meta_copy(model).eval()
    order = []
    hooks = [m.register_forward_hook(lambda m, args, out, name=name: order.append(name))
             for name, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            net(torch.empty(1, 3, image_size, image_size, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys([order[0], order[-1]])) if order else []


class Fp8Training:
    """The FP8 set-up of one half-precision model: an :class:`Fp8Layer` per Conv2d/Linear module that runs in
    FP8 (all but the first and the last unless ``recipe.all_layers``), and the telemetry they share.

    The routed ``conv2d``/``linear`` call finds its layer by the module's weight parameter, which is the
    same object at every call (master weights are copied into it in place). ``measuring()`` says whether
    the current step is a telemetry step (manual mode passes its loss scaler's, so that the FP8 and the
    gradient statistics are measured at the same steps).

    Example::

        fp8 = Fp8Training(model, Fp8Recipe(), device)      # model already FP16, FP32 BatchNorm
        with fp8.compute():
            out = model(x.half())                           # FP8 operands, FP32 accumulation, FP16 out
    """

    def __init__(self, model: nn.Module, recipe: Fp8Recipe, device, measuring: Callable[[], bool] = lambda: False):
        self.recipe = recipe
        self.telemetry = Fp8Telemetry(device)
        keep = set() if recipe.all_layers else set(first_and_last_layers(model))
        modules = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        self.fp16_layers = [n for n, _ in modules if n in keep]
        self.layers = {n: Fp8Layer(n, recipe, device, self.telemetry, measuring) for n, m in modules if n not in keep}
        self._weights = {n: m.weight for n, m in modules if n not in keep}  # holds them, so their ids stay theirs
        self._by_weight = {id(w): self.layers[n] for n, w in self._weights.items()}
        if not self.layers:
            raise ValueError("no Conv2d/Linear layer left to run in FP8 (the first and last stay FP16): "
                             "use all_layers")

    def layer_for(self, weight) -> Fp8Layer | None:
        """The FP8 layer whose weight is ``weight``, or None for a layer that stays in half precision."""
        return self._by_weight.get(id(weight))

    def compute(self):
        """The context the forward pass runs in: :class:`~mixprec.halfops.EmulatedFp8` over these layers."""
        from .halfops import EmulatedFp8

        return EmulatedFp8(self.layer_for)

    def describe(self) -> dict:
        """The recipe, for summary.json."""
        r = self.recipe
        return {"formats": {"weights": E4M3.name, "activations": E4M3.name, "gradients": E5M2.name},
                "format_dtypes": {"E4M3": str(E4M3.dtype).removeprefix("torch."),
                                  "E5M2": str(E5M2.dtype).removeprefix("torch.")},
                "recipe": "HYBRID (E4M3 forward, E5M2 backward), per-tensor scaling",
                "scaling": r.scaling, "amax_history": r.amax_history if r.scaling == "delayed" else None,
                "margin": r.margin, "fp16_layers": self.fp16_layers, "fp8_layers": len(self.layers),
                "first_step": "current amax (history empty)" if r.scaling == "delayed" else None,
                "telemetry_scale": "geometric mean over the FP8 layers' uses in the step"}

    def state_dict(self) -> dict:
        return {n: layer.state_dict() for n, layer in self.layers.items()}

    def load_state_dict(self, state: dict) -> None:
        for n, layer in self.layers.items():
            layer.load_state_dict(state[n])
