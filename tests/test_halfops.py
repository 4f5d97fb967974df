import pytest
import torch
import torch.nn.functional as F
from torch import nn

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


def test_fp32_calls_are_left_alone():
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    with emulated_half_compute():
        out = conv(x)
    assert out.dtype == torch.float32 and torch.equal(out, conv(x))


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
