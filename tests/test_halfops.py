from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mixprec.halfops import emulated_half_compute
from mixprec.memory import saved_tensor_bytes

CONVS = [  # (in, out, kernel, stride, padding, dilation, groups)
    (4, 6, 3, 1, 1, 1, 1),
    (4, 8, 3, 2, 1, 1, 2),
    (6, 6, 3, 1, 2, 2, 6),  # depthwise, dilated
    (4, 4, 1, 2, 0, 1, 1),
    (4, 6, 3, 1, "same", 1, 1),
]


def _grads(fn, *tensors):
    out = fn(*tensors)
    g = torch.randn_like(out, dtype=torch.float32, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    grads = torch.autograd.grad(out, tensors, g)
    return out, grads, g


@pytest.mark.parametrize("conf", CONVS)
def test_emulated_conv_is_fp32_math_on_fp16_operands_rounded_to_fp16(conf):
    cin, cout, k, stride, padding, dilation, groups = conf
    torch.manual_seed(0)
    x = torch.randn(2, cin, 9, 9).half().requires_grad_()
    w = torch.randn(cout, cin // groups, k, k).half().requires_grad_()
    b = torch.randn(cout).half().requires_grad_()
    conv = lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation, groups)
    with emulated_half_compute():
        out, grads, g = _grads(conv, x, w, b)
    assert out.dtype == torch.float16 and all(t.dtype == torch.float16 for t in grads)

    xf, wf, bf = (t.detach().float().requires_grad_() for t in (x, w, b))
    ref = conv(xf, wf, bf)
    ref_grads = torch.autograd.grad(ref, (xf, wf, bf), g.float())
    assert torch.equal(out, ref.half())
    for got, want in zip(grads, ref_grads):
        assert torch.equal(got, want.half())


@pytest.mark.parametrize("conf", CONVS[:3])
def test_emulated_and_native_fp16_conv_agree_within_fp16_rounding(conf):
    cin, cout, k, stride, padding, dilation, groups = conf
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups).half()
    x = torch.randn(2, cin, 8, 8).half().requires_grad_()
    native, native_grads, g = _grads(lambda x: conv(x), x)
    with emulated_half_compute():
        emulated, emulated_grads, _ = _grads(lambda x: conv(x), x)
    native_w = torch.autograd.grad(conv(x), conv.weight, g)[0]
    with emulated_half_compute():
        emulated_w = torch.autograd.grad(conv(x), conv.weight, g)[0]
    # native FP16 kernels may round partial sums; both stay within a few FP16 ulps of each other
    for a, b in ((native, emulated), (native_grads[0], emulated_grads[0]), (native_w, emulated_w)):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2 * b.float().abs().max().item())


def test_emulated_linear_matches_its_definition_and_native():
    torch.manual_seed(0)
    lin = nn.Linear(16, 5).half()
    x = torch.randn(3, 7, 16).half().requires_grad_()  # extra leading dims
    with emulated_half_compute():
        out, grads, g = _grads(lambda x, w, b: F.linear(x, w, b), x, lin.weight, lin.bias)
    xf, wf, bf = (t.detach().float().requires_grad_() for t in (x, lin.weight, lin.bias))
    ref = F.linear(xf, wf, bf)
    assert torch.equal(out, ref.half())
    for got, want in zip(grads, torch.autograd.grad(ref, (xf, wf, bf), g.float())):
        assert got.dtype == torch.float16 and torch.equal(got, want.half())
    torch.testing.assert_close(out.float(), lin(x).float(), rtol=1e-2, atol=1e-2)


class _Ops(TorchDispatchMode):
    """Records each ATen op that runs, forward and backward, with the dtype of its first tensor argument."""

    def __enter__(self):
        self.seen = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dtypes = [a.dtype for a in args if isinstance(a, torch.Tensor)]
        self.seen.append((func.overloadpacket.__name__, dtypes[0] if dtypes else None))
        return func(*args, **(kwargs or {}))


ROUTED = {  # each kind of call the emulation routes, and its operands' shapes
    "conv2d": (lambda x, w, b: F.conv2d(x, w, b, padding=1), [(2, 3, 6, 6), (4, 3, 3, 3), (4,)]),
    "linear": (F.linear, [(2, 5), (3, 5), (3,)]),
    "matmul": (torch.matmul, [(2, 4), (4, 3)]),
}


def _traced(fn, operands, context):
    """``fn`` forward and backward in ``context``: output, gradients, grad_fn type and the ops that ran."""
    with context:
        g = torch.ones_like(fn(*operands))
    with context, _Ops() as ops:
        out = fn(*operands)
        grads = torch.autograd.grad(out, operands, g)
    return out, grads, type(out.grad_fn), ops.seen


@pytest.mark.parametrize("call", ROUTED)
def test_fp16_calls_route_through_the_emulation_and_fp32_calls_are_left_alone(call):
    fn, shapes = ROUTED[call]
    torch.manual_seed(0)
    fp32 = [torch.randn(shape, requires_grad=True) for shape in shapes]
    fp16 = [t.detach().half().requires_grad_() for t in fp32]

    # FP16 operands: PyTorch's own op would compute in FP16; in the context they are only ever widened (or
    # detached), the arithmetic runs in FP32 kernels, and the emulation's own autograd function rounds to FP16
    out, grads, node, ops = _traced(fn, fp16, emulated_half_compute())
    _, _, native_node, native_ops = _traced(fn, fp16, nullcontext())
    assert {op for op, dtype in native_ops if dtype == torch.float16} - {"_to_copy", "detach"}  # the check can fail
    assert {op for op, dtype in ops if dtype == torch.float16} <= {"_to_copy", "detach"}
    assert node is not native_node and out.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)
    assert torch.equal(out, fn(*(t.detach().float() for t in fp16)).half())

    # FP32 operands: the very ops, autograd node and bits of PyTorch's own call, as if there were no context
    out, grads, node, ops = _traced(fn, fp32, emulated_half_compute())
    want, want_grads, want_node, want_ops = _traced(fn, fp32, nullcontext())
    assert ops == want_ops and node is want_node and torch.equal(out, want)
    assert all(torch.equal(a, b) for a, b in zip(grads, want_grads))


def test_saved_tensors_are_half_the_bytes_of_fp32():
    from mixprec.master import half_with_fp32_norm_
    from mixprec.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20")
    x = torch.randn(8, 3, 32, 32)
    fp32 = saved_tensor_bytes(lambda: model(x))
    half_with_fp32_norm_(model)
    with emulated_half_compute():
        fp16 = saved_tensor_bytes(lambda: model(x.half()))
    assert 0.49 < fp16 / fp32 < 0.52
