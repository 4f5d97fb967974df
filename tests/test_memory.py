import pytest

from mixprec.config import RunConfig
from mixprec.data import load_cifar10, make_splits
from mixprec.models import build_model, count_params
from mixprec.train import train


@pytest.fixture(scope="module")
def breakdowns(tiny_cifar):
    splits = make_splits(load_cifar10(tiny_cifar["pickles"]))
    out = {}
    for mode in ("baseline", "manual"):
        cfg = RunConfig(mode=mode, model="resnet20", epochs=1, batch_size=32, device="cpu")
        out[mode] = train(cfg, splits, log=lambda msg: None).memory
    return out


def test_breakdown_by_role_on_a_real_step(breakdowns):
    params = count_params(build_model("resnet20"))
    base, manual = breakdowns["baseline"], breakdowns["manual"]
    assert set(base) == {"weights", "master_weights", "grads", "optimizer_state", "activations"}
    assert base["master_weights"] == 0 and manual["master_weights"] == 4 * params
    assert base["optimizer_state"] == manual["optimizer_state"] == 4 * params  # FP32 momentum buffers
    assert base["grads"] == 4 * params
    assert 2 * params < manual["weights"] < base["weights"]  # FP16 but for the FP32 BatchNorm layers
    assert manual["grads"] == manual["weights"] - _buffer_bytes() + 4 * params  # half grads + FP32 master grads


def _buffer_bytes():
    return sum(b.numel() * b.element_size() for b in build_model("resnet20").buffers())  # FP32 BN statistics


def test_activation_bytes_of_a_two_layer_net_by_hand():
    """Linear(8, 16) -> ReLU -> Linear(16, 4) on a 5 x 8 FP32 batch. Autograd saves the input (for the first
    weight's gradient, 5*8*4 = 160 B), ReLU's output (5*16*4 = 320 B), which is also the second Linear's
    input and so is counted once, and the second weight (16*4*4 = 256 B, needed for the gradient of an input
    that requires grad). The first weight is not saved: the batch itself needs no gradient."""
    import torch
    from torch import nn

    from mixprec.memory import SavedTensorBytes

    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with SavedTensorBytes() as saved:
        net(torch.randn(5, 8))
    assert saved.bytes == 160 + 320 + 256
    with SavedTensorBytes() as saved:
        net.half()(torch.randn(5, 8).half())
    assert saved.bytes == (160 + 320 + 256) // 2
