"""amp mode on a CPU: torch.autocast to float16 with GradScaler, its convolutions, linears and matmuls computed
as emulated tensor-core arithmetic by the same layer as manual mode's."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mixprec.config import RunConfig
from mixprec.halfops import EmulatedAutocast
from mixprec.memory import saved_tensor_bytes
from mixprec.steps import setup_precision

CPU = torch.device("cpu")
U16 = 2.0**-11  # FP16's unit roundoff


class SmallConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _forward_backward(net, context, x, y, scale=1.0):
    """Logits, loss and the parameters' gradients; the loss is scaled by ``scale`` for backward (as GradScaler
    does: small FP16 gradients would otherwise be subnormal) and the gradients unscaled."""
    net.zero_grad(set_to_none=True)
    with context:
        logits = net(x)
        loss = F.cross_entropy(logits, y)
    (loss * scale).backward()
    return logits, loss, [p.grad / scale for p in net.parameters()]


def test_emulated_and_native_fp16_autocast_agree_within_fp16_rounding():
    """Both round the same FP16 operands and differ only in how each kernel sums: each FP16 rounding on the
    way back to the first layer (the outputs and input gradients of the linear, two BatchNorms, two ReLUs and
    two convolutions: 8) may differ by u in each implementation, so the two agree within 2 x 8u in norm
    (7.5u measured at worst here, in the first BatchNorm's gradients; the logits within 0.8u)."""
    torch.manual_seed(0)
    net = SmallConvNet()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    native = _forward_backward(net, torch.autocast("cpu", dtype=torch.float16), x, y, scale=2.0**12)
    emulated = _forward_backward(net, EmulatedAutocast("cpu", torch.float16), x, y, scale=2.0**12)
    assert native[0].dtype == emulated[0].dtype == torch.float16  # autocast's policy: linear -> FP16
    assert native[1].dtype == emulated[1].dtype == torch.float32  # ...and cross_entropy -> FP32
    for a, b in [(native[0], emulated[0]), (native[1], emulated[1]), *zip(native[2], emulated[2], strict=True)]:
        assert a.dtype == b.dtype  # FP32 gradients for the FP32 parameters, in both
        assert (a.float() - b.float()).norm() <= 16 * U16 * b.float().norm()


def test_emulated_autocast_is_fp32_arithmetic_on_fp16_rounded_operands():
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(3, 4, 3), nn.Linear(4, 5)
    x = torch.randn(2, 3, 6, 6)
    with EmulatedAutocast("cpu", torch.float16):
        out_conv, out_lin = conv(x), lin(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)))
        a, b = torch.randn(2, 3, 4), torch.randn(4, 5)
        out_mm = a @ b
    h = lambda t: t.half().float()  # noqa: E731 - autocast's cast to FP16, widened exactly
    assert torch.equal(out_conv, F.conv2d(h(x), h(conv.weight), h(conv.bias)).half())
    x_lin = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out_lin, F.linear(h(x_lin), h(lin.weight), h(lin.bias)).half())
    assert torch.equal(out_mm, torch.matmul(h(a), h(b)).half())


class _ConvolutionDtypes(TorchDispatchMode):
    """Records the input dtype of every aten convolution, forward and backward."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.convolution, torch.ops.aten.convolution_backward):
            self.seen.append((func.overloadpacket.__name__, args[0].dtype))
        return func(*args, **(kwargs or {}))


def test_emulated_autocast_runs_fp32_kernels_and_saves_fp16_tensors():
    """No FP16 convolution kernel runs (on a CPU that is PyTorch's naive fallback), and what backward keeps
    is FP16: about half the bytes that FP32 keeps."""
    torch.manual_seed(0)
    net, x, y = SmallConvNet(), torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    with _ConvolutionDtypes() as record:
        _forward_backward(net, EmulatedAutocast("cpu", torch.float16), x, y)
    assert {name for name, _ in record.seen} == {"convolution", "convolution_backward"}
    assert {dtype for _, dtype in record.seen} == {torch.float32}
    with _ConvolutionDtypes() as record:
        _forward_backward(net, torch.autocast("cpu", dtype=torch.float16), x, y)
    assert {dtype for _, dtype in record.seen} == {torch.float16}  # the check can tell the two apart

    def forward(context):
        with context:
            return net(x)
    fp32 = saved_tensor_bytes(lambda: forward(torch.autocast("cpu", enabled=False)))
    half = saved_tensor_bytes(lambda: forward(EmulatedAutocast("cpu", torch.float16)))
    assert 0.45 < half / fp32 < 0.56  # FP16 activations, plus FP16 weight copies and BatchNorm's FP32 statistics


def test_amp_on_a_cpu_is_float16_with_gradscaler_by_default():
    torch.manual_seed(0)
    p = setup_precision(RunConfig(mode="amp", model="resnet20", device="cpu"), SmallConvNet(), CPU)
    assert (p.amp_dtype, p.half_compute) == ("float16", "emulated")
    assert isinstance(p.scaler, torch.amp.GradScaler) and p.scaler.is_enabled()
    assert p.loss_scale() == 2.0**16
    assert "GradScaler from 65536" in p.description and "emulated" in p.description
    out = p.step(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)))
    assert not out.skipped and torch.isfinite(out.loss) and p.loss_scale() == 2.0**16


def test_bfloat16_is_a_named_variant_without_a_scaler():
    p = setup_precision(RunConfig(mode="amp", model="resnet20", device="cpu", amp_dtype="bfloat16",
                                  half_compute="native"), SmallConvNet(), CPU)
    assert (p.amp_dtype, p.half_compute, p.loss_scale()) == ("bfloat16", "native", None)
