"""Tensor-core FP16 arithmetic, emulated with FP32 kernels for CPUs that have no FP16 units.

A GPU tensor core multiplies FP16 operands, accumulates in FP32 and rounds the result to FP16.
CPUs run PyTorch's FP16 convolutions through a naive fallback (``aten::_slow_conv2d_*``), ~25x
slower than FP32 here, which would make manual mode unusable. :func:`emulated_half_compute` is a
context in which every FP16 ``conv2d`` and ``linear`` is computed the tensor-core way instead:

* the FP16 inputs and weights are widened to FP32 (exact) and multiplied with FP32 kernels,
  so products and sums carry FP32 precision, as in the tensor core's FP32 accumulator;
* outputs, input gradients and weight gradients are rounded to FP16;
* the tensors saved for backward are the FP16 ones, so activation memory is that of FP16.

Everything else (BatchNorm, ReLU, pooling, additions) runs in PyTorch's own FP16 or FP32 ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

HALF_DTYPES = (torch.float16, torch.bfloat16)


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)  # half tensors: half the bytes of FP32 activations
        ctx.conf = (stride, padding, dilation, groups, bias is not None)
        out = F.conv2d(x.float(), weight.float(), None if bias is None else bias.float(),
                       stride, padding, dilation, groups)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conf
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out.float(), x.float(), weight.float(), [weight.shape[0]] if has_bias else None,
            stride, padding, dilation, False, [0, 0], groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]])
        return (None if grad_x is None else grad_x.to(x.dtype),
                None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(weight.dtype), None, None, None, None)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        g = grad_out.float()
        grad_x = (g @ weight.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_w = (g.reshape(-1, g.shape[-1]).t() @ x.float().reshape(-1, x.shape[-1])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.reshape(-1, g.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv2d`` for half-precision tensors, with FP32 accumulation (see the module docstring)."""
    if isinstance(padding, str):  # 'same' / 'valid': resolve to numbers for convolution_backward
        if padding == "valid":
            padding = 0
        else:
            d, k = _pair(dilation), weight.shape[2:]
            total = [di * (ki - 1) for di, ki in zip(d, k)]
            if any(t % 2 for t in total):
                raise NotImplementedError("emulated conv2d: asymmetric 'same' padding is not supported")
            padding = [t // 2 for t in total]
    return _Conv2d.apply(x, weight, bias, _pair(stride), _pair(padding), _pair(dilation), groups)


def linear(x, weight, bias=None):
    """``F.linear`` for half-precision tensors, with FP32 accumulation."""
    return _Linear.apply(x, weight, bias)


class _EmulateHalf(TorchFunctionMode):
    _routes = {F.conv2d: conv2d, torch.conv2d: conv2d, F.linear: linear}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = self._routes.get(func)
        if route is not None and args and getattr(args[0], "dtype", None) in HALF_DTYPES:
            return route(*args, **kwargs)
        return func(*args, **kwargs)


def emulated_half_compute() -> TorchFunctionMode:
    """A context in which half-precision ``conv2d``/``linear`` calls use FP32 accumulation.

    The returned object can be entered again and again, so one instance serves a whole run.

    Example::

        model = nn.Conv2d(3, 8, 3).half()
        with emulated_half_compute():
            y = model(x.half())  # FP16 result, computed at FP32 speed on a CPU
    """
    return _EmulateHalf()
