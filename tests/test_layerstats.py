"""Per-layer gradient numerics (--layer-stats-every): what each statistic counts, on gradients made to order;
which steps are measured; and that the table reaches layer_grads.csv."""

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixprec.cli import UsageError
from mixprec.config import RunConfig
from mixprec.layerstats import STATISTICS, LayerGradientTelemetry, headroom_log2
from mixprec.run import main
from mixprec.steps import setup_precision
from tests.conftest import CPU, TinyNet, tiny_cfg

pytestmark = pytest.mark.usefixtures("tiny_models")

TINY = 2.0**-30  # below FP16's smallest subnormal, 2^-24: 0 in FP16 at scale 1, kept at scale 2^10 (2^-20)
SUBNORMAL = 2.0**-20  # an FP16 subnormal at scale 1, a normal number (2^-10) at scale 2^10


def _rows(source: LayerGradientTelemetry) -> pd.DataFrame:
    values = source.pop().double().tolist()
    return pd.DataFrame(source.to_rows(values)).set_index(["layer", "tensor", "statistic"])["value"]


@pytest.mark.parametrize("scale", [1.0, 2.0**10])
def test_statistics_count_what_fp16_makes_of_an_output_gradient_made_to_order(scale):
    """An FP16 layer called twice in a step (two micro-batches): the gradient reaching its output is ``scale``
    times G1, then G2. Each statistic is what the docstring says, over both calls' elements, and the tiny
    value survives the FP16 backward pass only under the scale."""
    layer = nn.Linear(4, 4, bias=False).half()
    g1 = torch.tensor([[0.0, TINY, SUBNORMAL, 1.0]])
    g2 = torch.tensor([[-3.0, 0.5, 0.25, 0.125]])
    source = LayerGradientTelemetry(layer, every=1, loss_scale=lambda: scale)

    def step(images, labels):
        for g in (g1, g2):
            out = layer(torch.ones(1, 4, dtype=torch.float16))
            ((out.float() * g).sum() * scale).backward()

    source.wrap(step)(None, None)
    stats = _rows(source)
    act = stats.loc[("", "activation")]
    flushed = 1 if scale == 1 else 0  # TINY * 1 rounds to 0 in the FP16 gradient
    assert act["zero_frac"] == (1 + flushed) / 8
    assert act["fp16_underflow_frac"] == (1 - flushed) / 8  # nonzero as computed, below 2^-24 once unscaled
    assert act["fp16_subnormal_frac"] == 1 / 8
    assert act["max_abs"] == 3.0
    assert act["headroom_log2"] == pytest.approx(math.log2(65504 / (3 * scale)))
    weight = stats.loc[("", "weight")]  # the accumulated weight gradient: each row is (G1 + G2) * scale
    expected = (g1 + g2).expand(4, 4).T.reshape(-1)
    assert weight["max_abs"] == pytest.approx(float(expected.abs().max()), rel=1e-3)
    assert weight["zero_frac"] == 0


def test_headroom_is_binades_to_65504():
    assert headroom_log2(65504.0) == 0 and headroom_log2(65504.0 / 8) == 3
    assert headroom_log2(0.0) == math.inf and headroom_log2(math.inf) == -math.inf
    assert math.isnan(headroom_log2(math.nan))


def test_baseline_layer_stats_are_the_gradients_of_the_step():
    """FP32: the classifier's output gradient is (softmax - onehot) / batch, computed here apart; its weight
    gradient is what the step left in ``.grad``; every Conv2d, BatchNorm and Linear layer is measured."""
    torch.manual_seed(0)
    model = TinyNet()
    precision = setup_precision(tiny_cfg(mode="baseline", layer_stats_every=1), model, CPU)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    out = precision.step(x, y)
    stats = _rows(next(s for s in precision.telemetry if isinstance(s, LayerGradientTelemetry)))
    logits_grad = (F.softmax(out.logits, 1) - F.one_hot(y, 10)) / 8
    assert stats.loc[("fc", "activation", "max_abs")] == pytest.approx(float(logits_grad.abs().max()), rel=1e-6)
    assert stats.loc[("fc", "weight", "max_abs")] == pytest.approx(float(model.fc.weight.grad.abs().max()), rel=1e-6)
    assert stats.loc[("fc", "activation", "zero_frac")] == 0
    # the BatchNorm output's gradient is zero wherever the ReLU after it was off
    assert 0.2 < stats.loc[("bn", "activation", "zero_frac")] < 0.8
    assert set(stats.index.get_level_values("layer")) == {"conv", "bn", "fc"}
    assert set(stats.index.get_level_values("statistic")) == set(STATISTICS)


@pytest.mark.parametrize("mode", ["baseline", "amp", "manual"])
def test_only_every_nth_step_is_measured_and_no_hook_outlives_it(mode):
    torch.manual_seed(0)
    model = TinyNet()
    precision = setup_precision(tiny_cfg(mode=mode, layer_stats_every=3), model, CPU)
    measured = []
    for _ in range(7):
        precision.step(torch.randn(8, 3, 32, 32), torch.arange(8))
        measured.append("layer_grads" in precision.pop_stats())
        assert not any(m._forward_hooks for m in model.modules())
        assert not any(p._post_accumulate_grad_hooks for p in model.parameters())
    assert measured == [True, False, False, True, False, False, True]


def test_manual_mode_measures_the_scaled_fp16_gradients_at_the_scalers_scale():
    """Manual mode's gradients carry the dynamic scale 2^16: the headroom counts from the scaled values, the
    largest magnitude is the unscaled one."""
    torch.manual_seed(0)
    model = TinyNet()
    precision = setup_precision(tiny_cfg(layer_stats_every=1), model, CPU)
    precision.step(torch.randn(8, 3, 32, 32), torch.arange(8))
    stats = _rows(precision.telemetry[-1])
    largest = stats.loc[("fc", "weight", "max_abs")]
    assert largest == pytest.approx(float(model.fc.weight.grad.abs().max()) / 2**16, rel=1e-6)
    assert stats.loc[("fc", "weight", "headroom_log2")] == pytest.approx(math.log2(65504 / (largest * 2**16)))


def test_compile_and_a_nonpositive_cadence_are_refused():
    with pytest.raises(UsageError, match="--layer-stats-every.*--compile"):
        RunConfig(mode="manual", layer_stats_every=5, compile=True)
    with pytest.raises(UsageError, match="--layer-stats-every must be a positive integer"):
        RunConfig(mode="manual", layer_stats_every=0)


def test_a_run_writes_layer_grads_csv(tiny_cifar, tmp_path):
    code = main(["--mode", "amp", "--model", "tiny", "--epochs", "2", "--batch-size", "40", "--device", "cpu",
                 "--data", str(tiny_cifar["pickles"]), "--out", str(tmp_path), "--layer-stats-every", "3"])
    assert code == 0
    (run,) = (tmp_path / "runs").iterdir()
    table = pd.read_csv(run / "layer_grads.csv")
    assert list(table.columns) == ["step", "layer", "layer_type", "tensor", "statistic", "value"]
    steps = len(pd.read_csv(run / "steps.csv"))
    assert sorted(table.step.unique()) == list(range(1, steps + 1, 3))
    assert len(table) == len(table.step.unique()) * 3 * 2 * len(STATISTICS)
