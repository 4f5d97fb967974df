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


def test_half_precision_halves_the_activations(breakdowns):
    ratio = breakdowns["manual"]["activations"] / breakdowns["baseline"]["activations"]
    assert 0.49 < ratio < 0.52


def _buffer_bytes():
    return sum(b.numel() * b.element_size() for b in build_model("resnet20").buffers())  # FP32 BN statistics
