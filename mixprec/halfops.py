"""Tensor-core FP16 arithmetic, emulated with FP32 kernels for CPUs that have no FP16 units.

A GPU tensor core multiplies FP16 operands, accumulates in FP32 and rounds the result to FP16.
CPUs run PyTorch's FP16 convolutions through a naive fallback (``aten::_slow_conv2d_*``), ~25x
slower than FP32 here, which would make manual mode unusable. :func:`emulated_half_compute` is a
context in which every FP16 ``conv2d``, ``linear`` and ``matmul`` is computed the tensor-core way instead:

* the FP16 inputs and weights are widened to FP32 (exact) and multiplied with FP32 kernels,
  so products and sums carry FP32 precision, as in the tensor core's FP32 accumulator;
* outputs, input gradients and weight gradients are rounded to FP16;
* the tensors saved for backward are the FP16 ones, so activation memory is that of FP16.

Everything else (BatchNorm, ReLU, pooling, additions) runs in PyTorch's own FP16 or FP32 ops.

The same layer serves both half-precision modes. In manual mode the model itself is FP16, and the
routed calls are those whose input is half. In amp mode (:class:`EmulatedAutocast`) the model is
FP32 and ``torch.autocast`` decides: the calls that autocast's lower-precision policy would cast
(``conv2d``, ``linear``, ``matmul``/``mm``/``bmm``) are cast to autocast's dtype here, as autocast
would, and then computed the tensor-core way; every other op keeps autocast's own policy. Ops that
autocast casts but this layer does not route (``conv_transpose*``, ``conv1d``/``conv3d``,
``addmm``/``baddbmm``, ``prelu``) run autocast's native kernels: right, but slow on a CPU.

FP8 (``--manual-dtype float8``) is the same layer again: :class:`EmulatedFp8` hands the ``conv2d`` and
``linear`` calls of the FP8 layers a :class:`~mixprec.fp8.Fp8Layer`, and the same autograd Functions then
quantize their operands to scaled E4M3 (forward) and E5M2 (the output gradient, in backward), multiply the
FP8 values in FP32, unscale, and round the results to the model's FP16.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _fp32_kernels(t: torch.Tensor) -> AbstractContextManager:
    """Inside an emulated op: autocast off, so that the FP32 kernels are not cast back to half."""
    return torch.autocast(t.device.type, enabled=False)


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, fp8=None):
        ctx.conf = (stride, padding, dilation, groups, bias is not None)
        ctx.fp8, ctx.dtypes = fp8, (x.dtype, weight.dtype)
        if fp8 is None:
            ctx.save_for_backward(x, weight)  # half tensors: half the bytes of FP32 activations
            with _fp32_kernels(x):
                out = F.conv2d(x.float(), weight.float(), None if bias is None else bias.float(),
                               stride, padding, dilation, groups)
            return out.to(x.dtype)
        xq, wq = fp8.quantize_forward(x, weight, record=any(ctx.needs_input_grad[:2]))  # training, not eval
        ctx.save_for_backward(x, weight, *_fp8_scales(xq, wq))  # see _fp8_scales
        with _fp32_kernels(x):
            out = F.conv2d(fp8.widen(xq.data), fp8.widen(wq.data), None, stride, padding, dilation, groups)
            return _fp8_epilogue(out, xq.scale_inv * wq.scale_inv, bias, x.dtype, channel_dim=1)

    @staticmethod
    def backward(ctx, grad_out):
        stride, padding, dilation, groups, has_bias = ctx.conf
        x_dtype, w_dtype = ctx.dtypes
        if ctx.fp8 is None:
            x, weight = ctx.saved_tensors
            g, x_inv = grad_out.float(), None
        else:  # FP8: grad_out to E5M2 with its own scale; the bias gradient from the FP16 one, as TE does
            x, weight, x_scale, w_scale, x_inv, w_inv = ctx.saved_tensors
            x, weight = ctx.fp8.requantize(x, weight, x_scale, w_scale)  # FP32: .float() below is a no-op
            gq = ctx.fp8.quantize_grad(grad_out)
            g = ctx.fp8.widen(gq.data)
        bias_in_kernel = has_bias and ctx.fp8 is None
        with _fp32_kernels(grad_out):
            grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
                g, x.float(), weight.float(), [weight.shape[0]] if bias_in_kernel else None,
                stride, padding, dilation, False, [0, 0], groups,
                [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias_in_kernel and ctx.needs_input_grad[2]])
            if ctx.fp8 is not None:  # unscale the FP32 accumulations: 1 / (scale of grad_out * scale of operand)
                grad_x = None if grad_x is None else grad_x * (gq.scale_inv * w_inv)
                grad_w = None if grad_w is None else grad_w * (gq.scale_inv * x_inv)
                if has_bias and ctx.needs_input_grad[2]:
                    grad_b = grad_out.float().sum((0, 2, 3))
        return (None if grad_x is None else grad_x.to(x_dtype),
                None if grad_w is None else grad_w.to(w_dtype),
                None if grad_b is None else grad_b.to(w_dtype), None, None, None, None, None)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, fp8=None):
        ctx.has_bias = bias is not None
        ctx.fp8, ctx.dtypes = fp8, (x.dtype, weight.dtype)
        if fp8 is None:
            ctx.save_for_backward(x, weight)
            with _fp32_kernels(x):
                out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
            return out.to(x.dtype)
        xq, wq = fp8.quantize_forward(x, weight, record=any(ctx.needs_input_grad[:2]))
        ctx.save_for_backward(x, weight, *_fp8_scales(xq, wq))
        with _fp32_kernels(x):
            out = F.linear(fp8.widen(xq.data), fp8.widen(wq.data))
            return _fp8_epilogue(out, xq.scale_inv * wq.scale_inv, bias, x.dtype, channel_dim=-1)

    @staticmethod
    def backward(ctx, grad_out):
        x_dtype, w_dtype = ctx.dtypes
        if ctx.fp8 is None:
            x, weight = ctx.saved_tensors
            g, g_inv, x_inv, w_inv = grad_out.float(), None, None, None
        else:
            x, weight, x_scale, w_scale, x_inv, w_inv = ctx.saved_tensors
            x, weight = ctx.fp8.requantize(x, weight, x_scale, w_scale)  # FP32: .float() below is a no-op
            gq = ctx.fp8.quantize_grad(grad_out)
            g, g_inv = ctx.fp8.widen(gq.data), gq.scale_inv
        grad_x = grad_w = grad_b = None
        with _fp32_kernels(grad_out):
            if ctx.needs_input_grad[0]:
                grad_x = _unscaled(g @ weight.float(), g_inv, w_inv).to(x_dtype)
            if ctx.needs_input_grad[1]:
                grad_w = _unscaled(g.reshape(-1, g.shape[-1]).t() @ x.float().reshape(-1, x.shape[-1]),
                                   g_inv, x_inv).to(w_dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:  # from the half grad_out, also in FP8
                grad_b = grad_out.float().reshape(-1, grad_out.shape[-1]).sum(0).to(w_dtype)
        return grad_x, grad_w, grad_b, None


def _fp8_scales(xq, wq) -> tuple[torch.Tensor, ...]:
    """What an FP8 layer saves for backward besides its half input and weight: their scales and inverse
    scales. The half tensors, not their FP8 copies, are saved: in a CNN the preceding BatchNorm or ReLU keeps
    the half input alive anyway, and the model keeps the weight, so an FP8 copy would be extra memory on top
    (measured: 0.63 of FP32's saved bytes against FP16's 0.50). Backward casts them again with the same
    scales, which gives the same FP8 values bit for bit."""
    return xq.scale, wq.scale, xq.scale_inv, wq.scale_inv


def _unscaled(product: torch.Tensor, *scale_invs) -> torch.Tensor:
    """An FP32 product of FP8 operands times the operands' inverse scales; half operands have None."""
    return product if scale_invs[0] is None else product * (scale_invs[0] * scale_invs[1])


def _fp8_epilogue(out: torch.Tensor, scale_inv: torch.Tensor, bias, dtype: torch.dtype, channel_dim: int):
    """What the FP8 tensor core does after the FP32 accumulation: unscale, add the bias, round to ``dtype``."""
    out = out * scale_inv
    if bias is not None:
        shape = [1] * out.dim()
        shape[channel_dim] = -1
        out += bias.float().view(shape)
    return out.to(dtype)


class _Matmul(torch.autograd.Function):
    """``torch.matmul`` with its broadcasting; backward recomputes the product in FP32 from the saved
    half operands (one extra product, for any shapes matmul takes)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        with _fp32_kernels(a):
            return torch.matmul(a.float(), b.float()).to(a.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        a, b = ctx.saved_tensors
        with torch.enable_grad(), _fp32_kernels(a):
            af, bf = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
            grad_a, grad_b = torch.autograd.grad(torch.matmul(af, bf), (af, bf), grad_out.float())
        return grad_a.to(a.dtype), grad_b.to(b.dtype)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, fp8=None):
    """``F.conv2d`` for half-precision tensors, with FP32 accumulation (see the module docstring); with
    ``fp8`` (a :class:`~mixprec.fp8.Fp8Layer`) on FP8-quantized operands."""
    if isinstance(padding, str):  # 'same' / 'valid': resolve to numbers for convolution_backward
        if padding == "valid":
            padding = 0
        else:
            d, k = _pair(dilation), weight.shape[2:]
            total = [di * (ki - 1) for di, ki in zip(d, k)]
            if any(t % 2 for t in total):
                raise NotImplementedError("emulated conv2d: asymmetric 'same' padding is not supported")
            padding = [t // 2 for t in total]
    return _Conv2d.apply(x, weight, bias, _pair(stride), _pair(padding), _pair(dilation), groups, fp8)


def linear(x, weight, bias=None, fp8=None):
    """``F.linear`` for half-precision tensors, with FP32 accumulation; with ``fp8``, on FP8 operands."""
    return _Linear.apply(x, weight, bias, fp8)


def matmul(a, b):
    """``torch.matmul`` (and ``mm``, ``bmm``, ``@``) for half-precision tensors, with FP32 accumulation."""
    return _Matmul.apply(a, b)


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The half dtype autocast casts ``t``'s lower-precision ops to, or None where autocast is off."""
    kind = t.device.type
    if not t.is_floating_point() or not torch.is_autocast_enabled(kind):
        return None
    dtype = torch.get_autocast_dtype(kind)
    return dtype if dtype in HALF_DTYPES else None


def _cast(value, dtype: torch.dtype):
    """Autocast's cast of one argument: floating-point tensors to ``dtype``, anything else as it is."""
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value


class _EmulateHalf(TorchFunctionMode):
    _routes = {F.conv2d: conv2d, torch.conv2d: conv2d, F.linear: linear,
               torch.matmul: matmul, torch.mm: matmul, torch.bmm: matmul, torch.Tensor.__matmul__: matmul,
               torch.Tensor.matmul: matmul, torch.Tensor.mm: matmul, torch.Tensor.bmm: matmul}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = self._routes.get(func)
        if route is not None and args and isinstance(args[0], torch.Tensor):
            if args[0].dtype in HALF_DTYPES:  # manual mode: the model itself is half
                return route(*args, **kwargs)
            dtype = _autocast_dtype(args[0])
            if dtype is not None:  # amp mode: cast as autocast would, then compute the tensor-core way
                return route(*(_cast(a, dtype) for a in args), **{k: _cast(v, dtype) for k, v in kwargs.items()})
        return func(*args, **kwargs)


def emulated_half_compute() -> TorchFunctionMode:
    """A context in which half-precision ``conv2d``/``linear``/``matmul`` calls use FP32 accumulation,
    and so do the ones that an enclosing ``torch.autocast`` to a half dtype would cast.

    The returned object can be entered again and again, so one instance serves a whole run.

    Example::

        model = nn.Conv2d(3, 8, 3).half()
        with emulated_half_compute():
            y = model(x.half())  # FP16 result, computed at FP32 speed on a CPU
    """
    return _EmulateHalf()


class EmulatedFp8(_EmulateHalf):
    """The same emulation, in which the half-precision ``conv2d`` and ``linear`` calls of FP8 layers take
    FP8 operands: the input activation and the weight scaled and cast to E4M3, the output gradient in
    backward to E5M2, each with its layer's scale (:mod:`mixprec.fp8`); FP32 accumulation, results in the
    half dtype, the half operands and their scales saved for backward. ``layer_for(weight)`` names the FP8 layer
    of a call by its weight parameter; calls it returns None for (the layers kept in FP16) and every other
    op run as in :func:`emulated_half_compute`.

    Example::

        with EmulatedFp8(Fp8Training(model, Fp8Recipe(), "cpu").layer_for):
            y = model(x.half())
    """

    _fp8_routes = {F.conv2d: conv2d, torch.conv2d: conv2d, F.linear: linear}

    def __init__(self, layer_for):
        super().__init__()
        self.layer_for = layer_for

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = self._fp8_routes.get(func)
        if route is not None and args and isinstance(args[0], torch.Tensor) and args[0].dtype in HALF_DTYPES:
            layer = self.layer_for(args[1] if len(args) > 1 else kwargs.get("weight"))
            if layer is not None:
                return route(*args, **kwargs, fp8=layer)
        return super().__torch_function__(func, types, args, kwargs)


class EmulatedAutocast:
    """``torch.autocast(device_type, dtype)`` whose convolutions, linears and matmuls are computed as
    emulated tensor-core arithmetic (FP16 operands, FP32 accumulation, FP16 results and saved tensors)
    instead of by PyTorch's half kernels, which are slow on CPUs. All other ops follow autocast's policy.

    Like ``torch.autocast``, one instance can be entered again and again.

    Example::

        model = nn.Conv2d(3, 8, 3)                       # FP32 weights, as amp keeps them
        with EmulatedAutocast("cpu", torch.float16):
            y = model(x)                                 # FP16 result, FP32 accumulation
    """

    def __init__(self, device_type: str, dtype: torch.dtype = torch.float16):
        self.autocast = torch.autocast(device_type, dtype=dtype)
        self.emulation = _EmulateHalf()

    def __enter__(self):
        self.autocast.__enter__()
        self.emulation.__enter__()
        return self

    def __exit__(self, *exc):
        self.emulation.__exit__(*exc)
        return self.autocast.__exit__(*exc)
