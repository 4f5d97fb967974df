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

FP8 (``--fp8``) is a recipe over this layer, in :mod:`mixprec.fp8`: its :class:`~mixprec.fp8.EmulatedFp8`
is :class:`EmulateHalf` with the FP8 layers' ``conv2d`` and ``linear`` calls routed to FP8 arithmetic.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

HALF_DTYPES = (torch.float16, torch.bfloat16)


def fp32_kernels(t: torch.Tensor) -> AbstractContextManager:
    """Inside an emulated op: autocast off, so that the FP32 kernels are not cast back to half."""
    return torch.autocast(t.device.type, enabled=False)


def conv2d_backward(grad_out, x, weight, conf, needs_input_grad, bias_in_kernel: bool):
    """The FP32 gradients of a convolution (input, weight, and the bias if ``bias_in_kernel``) from FP32 or
    FP32-valued operands: ``conf`` is the forward's ``(stride, padding, dilation, groups)``."""
    stride, padding, dilation, groups = conf
    with fp32_kernels(grad_out):
        return torch.ops.aten.convolution_backward(
            grad_out, x.float(), weight.float(), [weight.shape[0]] if bias_in_kernel else None,
            stride, padding, dilation, False, [0, 0], groups,
            [needs_input_grad[0], needs_input_grad[1], bias_in_kernel and needs_input_grad[2]])


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.conf, ctx.has_bias = (stride, padding, dilation, groups), bias is not None
        ctx.save_for_backward(x, weight)  # half tensors: half the bytes of FP32 activations
        with fp32_kernels(x):
            out = F.conv2d(x.float(), weight.float(), None if bias is None else bias.float(),
                           stride, padding, dilation, groups)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x, grad_w, grad_b = conv2d_backward(grad_out.float(), x, weight, ctx.conf, ctx.needs_input_grad,
                                                 ctx.has_bias)
        return (None if grad_x is None else grad_x.to(x.dtype), None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(weight.dtype), None, None, None, None)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        with fp32_kernels(x):
            out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        g = grad_out.float()
        grad_x = grad_w = grad_b = None
        with fp32_kernels(grad_out):
            if ctx.needs_input_grad[0]:
                grad_x = (g @ weight.float()).to(x.dtype)
            if ctx.needs_input_grad[1]:
                grad_w = (g.reshape(-1, g.shape[-1]).t() @ x.float().reshape(-1, x.shape[-1])).to(weight.dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = g.reshape(-1, g.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b


class _Matmul(torch.autograd.Function):
    """``torch.matmul`` with its broadcasting; backward recomputes the product in FP32 from the saved
    half operands (one extra product, for any shapes matmul takes)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        with fp32_kernels(a):
            return torch.matmul(a.float(), b.float()).to(a.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        a, b = ctx.saved_tensors
        with torch.enable_grad(), fp32_kernels(a):
            af, bf = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
            grad_a, grad_b = torch.autograd.grad(torch.matmul(af, bf), (af, bf), grad_out.float())
        return grad_a.to(a.dtype), grad_b.to(b.dtype)


def pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def conv_padding(padding, dilation, weight) -> tuple[int, int]:
    """``padding`` as numbers, for ``convolution_backward``: 'valid' and 'same' resolved for ``weight``."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(pair(dilation), weight.shape[2:])]
        if any(t % 2 for t in total):
            raise NotImplementedError("emulated conv2d: asymmetric 'same' padding is not supported")
        return tuple(t // 2 for t in total)
    return pair(padding)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv2d`` for half-precision tensors, with FP32 accumulation (see the module docstring)."""
    return _Conv2d.apply(x, weight, bias, pair(stride), conv_padding(padding, dilation, weight), pair(dilation),
                         groups)


def linear(x, weight, bias=None):
    """``F.linear`` for half-precision tensors, with FP32 accumulation."""
    return _Linear.apply(x, weight, bias)


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


class EmulateHalf(TorchFunctionMode):
    """The ``TorchFunctionMode`` behind :func:`emulated_half_compute`: routes half-precision (or autocast-cast)
    ``conv2d``, ``linear`` and ``matmul`` calls to the emulated arithmetic above."""

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
    return EmulateHalf()


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
        self.emulation = EmulateHalf()

    def __enter__(self):
        self.autocast.__enter__()
        self.emulation.__enter__()
        return self

    def __exit__(self, *exc):
        self.emulation.__exit__(*exc)
        return self.autocast.__exit__(*exc)
