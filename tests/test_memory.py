import pytest
import torch

from mixprec.config import RunConfig
from mixprec.data import load_cifar10, make_splits
from mixprec.memory import breakdown
from mixprec.models import build_model, count_params
from mixprec.steps import setup_precision
from mixprec.train import train
from tests.conftest import CPU, TinyNet, tiny_cfg


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
    assert set(base) == {"weights", "master_weights", "grads", "optimizer_state", "activations", "compensation",
                         "update_workspace"}
    assert base["master_weights"] == 0 and manual["master_weights"] == 4 * params
    assert base["compensation"] == manual["compensation"] == base["update_workspace"] == manual["update_workspace"] == 0
    assert base["optimizer_state"] == manual["optimizer_state"] == 4 * params  # FP32 momentum buffers
    assert base["grads"] == 4 * params
    assert 2 * params < manual["weights"] < base["weights"]  # FP16 but for the FP32 BatchNorm layers
    assert manual["grads"] == manual["weights"] - _buffer_bytes() + 4 * params  # half grads + FP32 master grads


@pytest.mark.parametrize("kind", ["fp32", "none", "stochastic", "kahan"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_each_master_weights_kind_shows_what_it_keeps(kind, dtype, tiny_models):
    """FP32 master copies (4 bytes a parameter) with fp32; a half compensation buffer per half parameter (2
    bytes) with kahan; nothing with stochastic and none. stochastic and kahan step FP32 working copies, shown
    apart and held during the step only, with FP32 gradients and momentum as fp32 has; none steps the half
    weights, with half momentum."""
    torch.manual_seed(0)
    model = TinyNet()
    p = setup_precision(tiny_cfg(master_weights=kind, manual_dtype=dtype, loss_scale="none"), model, CPU)
    out = p.step(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))
    assert not out.skipped
    mem = breakdown(model, p.master, p.optimizer, 0)
    params = sum(t.numel() for t in model.parameters())
    half = sum(t.numel() for t in model.parameters() if t.dtype != torch.float32)  # BatchNorm's stay FP32
    model_grads = sum(t.numel() * t.element_size() for t in model.parameters())
    fp32_copies = kind in ("fp32", "stochastic", "kahan")
    assert mem["master_weights"] == (4 * params if kind == "fp32" else 0)
    assert mem["compensation"] == (2 * half if kind == "kahan" else 0)
    assert mem["update_workspace"] == (4 * params if kind in ("stochastic", "kahan") else 0)
    assert mem["grads"] == model_grads + (4 * params if fp32_copies else 0)
    assert mem["optimizer_state"] == (4 * params if fp32_copies else model_grads)  # momentum, as the weights it steps
    # the working copies exist during the optimizer step only: between steps they hold no storage
    held = sum(m.untyped_storage().nbytes() for m in p.master.params) if kind != "none" else 0  # none: the model's
    assert held == (4 * params if kind == "fp32" else 0)


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


def test_the_breakdown_comes_from_the_first_step_that_was_not_skipped(tiny_cifar, tiny_models):
    """A skipped first step never reaches the optimizer, which then holds no momentum: the breakdown waits for
    the first step taken, and shows the optimizer state it holds."""
    from tests.conftest import train_tiny

    skipped = train_tiny(tiny_cifar, inject_overflow=(1, 2))
    clean = train_tiny(tiny_cifar)
    assert skipped.skipped_steps == 2
    assert skipped.memory["optimizer_state"] == clean.memory["optimizer_state"] > 0
    assert skipped.memory["master_weights"] == clean.memory["master_weights"]
