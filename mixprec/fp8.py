"""Emulated FP8 training: the two formats, scaled saturating casts, and TransformerEngine-style delayed scaling.

FP8 has far less range than FP16 (E4M3: 2^-9 to 448), so every tensor an FP8 matrix multiply takes is
scaled first: ``q = cast(clamp(x * scale, -max, max))``, and the product is multiplied by ``1 / scale``
of each operand afterwards, as an H100 tensor core's epilogue does.

FP8 is a recipe over a 16-bit model, as TransformerEngine's ``DelayedScaling`` is: manual mode's FP16 model
(``--fp8 delayed`` or ``--fp8 current``) runs in :class:`EmulatedFp8`, which is :mod:`mixprec.halfops`'
emulated FP16 arithmetic with the ``conv2d`` and ``linear`` calls of the FP8 layers routed to this module's
autograd Functions: they quantize their operands to scaled E4M3 (forward) and E5M2 (the output gradient, in
backward), multiply the FP8 values in FP32, unscale, and round the results to the model's FP16.

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
import torch.nn.functional as F
from torch import nn

from .halfops import HALF_DTYPES, EmulateHalf, conv2d_backward, conv_padding, fp32_kernels, pair
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
        """The context the forward pass runs in: :class:`EmulatedFp8` over these layers."""
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


# The arithmetic: conv2d and linear on FP8 operands, as an FP8 tensor core computes them.

def _saved_scales(xq: Fp8Tensor, wq: Fp8Tensor) -> tuple[torch.Tensor, ...]:
    """What an FP8 layer saves for backward besides its half input and weight: their scales and inverse
    scales. The half tensors, not their FP8 copies, are saved: in a CNN the preceding BatchNorm or ReLU keeps
    the half input alive anyway, and the model keeps the weight, so an FP8 copy would be extra memory on top
    (measured: 0.63 of FP32's saved bytes against FP16's 0.50). Backward casts them again with the same
    scales (:meth:`Fp8Layer.requantize`), which gives the same FP8 values bit for bit."""
    return xq.scale, wq.scale, xq.scale_inv, wq.scale_inv


def _epilogue(out: torch.Tensor, scale_inv: torch.Tensor, bias, dtype: torch.dtype, channel_dim: int):
    """What the FP8 tensor core does after the FP32 accumulation: unscale, add the bias, round to ``dtype``."""
    out = out * scale_inv
    if bias is not None:
        shape = [1] * out.dim()
        shape[channel_dim] = -1
        out += bias.float().view(shape)
    return out.to(dtype)


def _backward_operands(ctx, grad_out):
    """In backward: the forward's FP8 input and weight again (as FP32 values), the output gradient cast to
    scaled E5M2 (as FP32 values), and the three inverse scales (gradient, input, weight)."""
    x, weight, x_scale, w_scale, x_inv, w_inv = ctx.saved_tensors
    xf, wf = ctx.layer.requantize(x, weight, x_scale, w_scale)
    gq = ctx.layer.quantize_grad(grad_out)
    return xf, wf, widen(gq.data), gq.scale_inv, x_inv, w_inv


class _Fp8Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, layer):
        ctx.conf, ctx.has_bias = (stride, padding, dilation, groups), bias is not None
        ctx.layer, ctx.dtypes = layer, (x.dtype, weight.dtype)
        xq, wq = layer.quantize_forward(x, weight, record=any(ctx.needs_input_grad[:2]))  # training, not eval
        ctx.save_for_backward(x, weight, *_saved_scales(xq, wq))
        with fp32_kernels(x):
            out = F.conv2d(widen(xq.data), widen(wq.data), None, stride, padding, dilation, groups)
            return _epilogue(out, xq.scale_inv * wq.scale_inv, bias, x.dtype, channel_dim=1)

    @staticmethod
    def backward(ctx, grad_out):
        x_dtype, w_dtype = ctx.dtypes
        xf, wf, g, g_inv, x_inv, w_inv = _backward_operands(ctx, grad_out)
        grad_x, grad_w, _ = conv2d_backward(g, xf, wf, ctx.conf, ctx.needs_input_grad, bias_in_kernel=False)
        with fp32_kernels(grad_out):  # unscale the FP32 accumulations: 1 / (scale of grad_out * scale of operand)
            grad_x = None if grad_x is None else (grad_x * (g_inv * w_inv)).to(x_dtype)
            grad_w = None if grad_w is None else (grad_w * (g_inv * x_inv)).to(w_dtype)
            # the bias gradient from the half output gradient, as TransformerEngine does
            grad_b = grad_out.float().sum((0, 2, 3)).to(w_dtype) if ctx.has_bias and ctx.needs_input_grad[2] \
                else None
        return grad_x, grad_w, grad_b, None, None, None, None, None


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.has_bias, ctx.layer, ctx.dtypes = bias is not None, layer, (x.dtype, weight.dtype)
        xq, wq = layer.quantize_forward(x, weight, record=any(ctx.needs_input_grad[:2]))
        ctx.save_for_backward(x, weight, *_saved_scales(xq, wq))
        with fp32_kernels(x):
            out = F.linear(widen(xq.data), widen(wq.data))
            return _epilogue(out, xq.scale_inv * wq.scale_inv, bias, x.dtype, channel_dim=-1)

    @staticmethod
    def backward(ctx, grad_out):
        x_dtype, w_dtype = ctx.dtypes
        xf, wf, g, g_inv, x_inv, w_inv = _backward_operands(ctx, grad_out)
        grad_x = grad_w = grad_b = None
        with fp32_kernels(grad_out):
            if ctx.needs_input_grad[0]:
                grad_x = ((g @ wf) * (g_inv * w_inv)).to(x_dtype)
            if ctx.needs_input_grad[1]:
                product = g.reshape(-1, g.shape[-1]).t() @ xf.reshape(-1, xf.shape[-1])
                grad_w = (product * (g_inv * x_inv)).to(w_dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:  # from the half grad_out, as for the convolution
                grad_b = grad_out.float().reshape(-1, grad_out.shape[-1]).sum(0).to(w_dtype)
        return grad_x, grad_w, grad_b, None


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, layer: Fp8Layer):
    """``F.conv2d`` of half tensors on FP8 operands: ``layer``'s scaled E4M3 input and weight, FP32
    accumulation, the result unscaled and rounded to the input's dtype; backward in E5M2."""
    return _Fp8Conv2d.apply(x, weight, bias, pair(stride), conv_padding(padding, dilation, weight), pair(dilation),
                            groups, layer)


def linear(x, weight, bias=None, *, layer: Fp8Layer):
    """``F.linear`` of half tensors on FP8 operands (see :func:`conv2d`)."""
    return _Fp8Linear.apply(x, weight, bias, layer)


class EmulatedFp8(EmulateHalf):
    """The emulated FP16 arithmetic of :mod:`mixprec.halfops`, in which the half-precision ``conv2d`` and
    ``linear`` calls of FP8 layers take FP8 operands: the input activation and the weight scaled and cast to
    E4M3, the output gradient in backward to E5M2, each with its layer's scale; FP32 accumulation, results in
    the half dtype, the half operands and their scales saved for backward. ``layer_for(weight)`` names the FP8
    layer of a call by its weight parameter; calls it returns None for (the layers kept in FP16) and every
    other op run as in :func:`~mixprec.halfops.emulated_half_compute`.

    Example::

        with EmulatedFp8(Fp8Training(model, Fp8Recipe(), "cpu").layer_for):
            y = model(x.half())
    """

    _fp8_routes = {F.conv2d: conv2d, torch.conv2d: conv2d, F.linear: linear}

    def __init__(self, layer_for: Callable[[torch.Tensor], Fp8Layer | None]):
        super().__init__()
        self.layer_for = layer_for

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = self._fp8_routes.get(func)
        if route is not None and args and isinstance(args[0], torch.Tensor) and args[0].dtype in HALF_DTYPES:
            layer = self.layer_for(args[1] if len(args) > 1 else kwargs.get("weight"))
            if layer is not None:
                return route(*args, **kwargs, layer=layer)
        return super().__torch_function__(func, types, args, kwargs)
