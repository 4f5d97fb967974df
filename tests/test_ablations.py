"""The manual mode's ablations and scaler controls, on a tiny CNN so that each test takes seconds."""


import pytest
import torch

from mixprec.cli import UsageError
from mixprec.steps import setup_precision
from tests.conftest import CPU, TinyNet, tiny_cfg, train_tiny

pytestmark = pytest.mark.usefixtures("tiny_models")


@pytest.mark.parametrize("mode", ["manual", "amp"])  # amp on a CPU: float16 and GradScaler unless asked otherwise
def test_injected_overflow_skips_backs_off_and_holds_the_lr_schedule(tiny_cifar, mode):
    result = train_tiny(tiny_cifar, mode=mode, inject_overflow=(2, 5), schedule="cosine")
    steps = result.steps
    assert [r["skipped"] for r in steps[:6]] == [False, True, False, False, True, False]
    assert steps[0]["loss_scale"] == 2.0**16 and steps[1]["loss_scale"] == 2.0**15
    assert result.skipped_steps == 2 and result.final_loss_scale == 2.0**14
    lrs = [r["lr"] for r in steps]
    assert lrs[0] != lrs[1]  # the cosine schedule moves after a step that was taken...
    assert lrs[1] == lrs[2]  # ...and stands still after the skipped one
    assert lrs[4] == lrs[5]


@pytest.mark.parametrize("mode", ["manual", "amp", "baseline"])
def test_clip_acts_on_the_unscaled_gradients(mode):
    torch.manual_seed(0)
    model = TinyNet(batchnorm=False)
    p = setup_precision(tiny_cfg(mode=mode, clip_grad_norm=1e-3, lr=1.0, momentum=0.0, weight_decay=0.0), model, CPU)
    params = p.master.params if p.master else list(model.parameters())
    before = [t.detach().clone() for t in params]
    assert not p.step(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))).skipped
    update = torch.cat([(a - b).flatten() for a, b in zip(before, params)])
    # lr 1: the update is the clipped gradient. Clipping the scaled gradients would leave 1e-3 / 2**16.
    assert update.norm().item() == pytest.approx(1e-3, rel=1e-2)


def test_without_master_weights_small_updates_vanish():
    def step_once(master_weights):
        torch.manual_seed(0)
        model = TinyNet(batchnorm=False)
        with torch.no_grad():
            model.fc.weight.fill_(1.0)
        p = setup_precision(tiny_cfg(master_weights=master_weights, lr=1e-4, momentum=0.0, weight_decay=0.0),
                            model, CPU)
        assert p.step(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))).skipped is False
        return model, p

    model, p = step_once(master_weights="none")
    assert p.master.params[0] is p.master.model_params[0]  # the optimizer owns the FP16 weights
    assert p.optimizer.param_groups[0]["params"][0].dtype == torch.float16
    assert torch.all(model.fc.weight == 1.0)  # 1 - ~1e-5 rounds back to 1 in FP16: the update is lost
    model, p = step_once(master_weights="fp32")
    master_fc = p.master.params[-2]
    assert (master_fc != 1.0).float().mean() > 0.9  # the FP32 master weights keep it


def test_fp16_batchnorm_and_bfloat16_manual():
    p = setup_precision(tiny_cfg(fp16_batchnorm=True), model := TinyNet(), CPU)
    assert model.bn.weight.dtype == torch.float16 and model.bn.running_var.dtype == torch.float16
    p = setup_precision(tiny_cfg(manual_dtype="bfloat16"), model := TinyNet(), CPU)
    assert model.conv.weight.dtype == torch.bfloat16 and model.bn.weight.dtype == torch.float32
    assert any("loss scaling is unnecessary" in n for n in p.notes)
    assert not p.step(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))).skipped
    assert not setup_precision(tiny_cfg(manual_dtype="bfloat16", loss_scale="none"), TinyNet(), CPU).notes


@pytest.mark.parametrize("loss_scale,expect", [("none", 1.0), ("512", 512.0)])
def test_static_loss_scales_skip_without_backing_off(loss_scale, expect):
    p = setup_precision(tiny_cfg(loss_scale=loss_scale, inject_overflow=(1,)), TinyNet(), CPU)
    assert p.loss_scale() == expect
    assert p.step(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))).skipped
    assert p.loss_scale() == expect


def test_accumulated_micro_batches_add_up_to_the_full_batch_gradient():
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))

    def one_step(accumulate):
        torch.manual_seed(0)
        model = TinyNet(batchnorm=False)  # BatchNorm statistics differ per micro-batch by design
        p = setup_precision(tiny_cfg(mode="baseline", accumulate=accumulate), model, CPU)
        p.step(x, y)
        return [t.detach().clone() for t in model.parameters()]

    for a, b in zip(one_step(1), one_step(4)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_accumulation_makes_one_overflow_decision_per_optimizer_step():
    p = setup_precision(tiny_cfg(accumulate=2, inject_overflow=(1,)), TinyNet(), CPU)
    assert p.step(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))).skipped
    assert p.loss_scale() == 2.0**15  # backed off once, not once per micro-batch


@pytest.mark.parametrize("kw,message", [
    (dict(mode="amp", fp16_batchnorm=True), "ablation of manual mode"),
    (dict(mode="baseline", inject_overflow=(3,)), "needs a loss scaler"),
    (dict(loss_scale="-2"), "positive number"),
    (dict(batch_size=10, accumulate=4), "equal micro-batches"),
    (dict(mode="amp", amp_dtype="bfloat16", inject_overflow=(1,)), "needs a GradScaler, which only float16 uses"),
])
def test_meaningless_combinations_are_refused(kw, message):
    with pytest.raises(UsageError, match=message):
        tiny_cfg(**kw)


@pytest.mark.parametrize("kind", ["stochastic", "kahan"])
@pytest.mark.parametrize("recipe", [{}, dict(manual_dtype="bfloat16", loss_scale="none"),
                                    dict(fp8="delayed", fp8_all_layers=True)], ids=["float16", "bfloat16", "fp8"])
def test_stochastic_and_kahan_train_in_float16_bfloat16_and_fp8(tiny_cifar, kind, recipe):
    """One epoch of the tiny net: the steps train, and every --telemetry-every step measures the updates
    lost beside what nearest rounding would have lost. FP8 runs its layers' operands from the FP16 weights
    that the rounding updates in place, so it combines with both (its layer still finds its weight)."""
    import pandas as pd

    result = train_tiny(tiny_cifar, master_weights=kind, telemetry_every=3, **recipe)
    steps = pd.DataFrame(result.steps)
    assert result.status == "completed" and torch.isfinite(torch.tensor(steps["loss"].to_numpy())).all()
    measured = steps.dropna(subset=["update_lost_frac"])
    assert list(measured["step"]) == list(range(1, len(steps) + 1, 3))
    assert measured["update_lost_frac"].between(0, 1).all() and measured["update_lost_nearest_frac"].between(0, 1).all()
    assert measured["decay_lost_frac"].isna().all()
    if kind == "kahan":  # what neither the half weight nor its compensation took, nearest rounding lost too
        assert (measured["update_lost_frac"] <= measured["update_lost_nearest_frac"]).all()
    if recipe.get("fp8"):
        assert result.fp8 is not None


@pytest.mark.parametrize("kind", ["stochastic", "kahan"])
def test_fp8_layers_keep_finding_their_weights_under_stochastic_and_kahan(kind):
    from mixprec.config import RunConfig
    from tests.conftest import ThreeLayerNet

    model = ThreeLayerNet()
    cfg = RunConfig(mode="manual", model="three", device="cpu", master_weights=kind, fp8="current")
    p = setup_precision(cfg, model, CPU)
    weight = model.mid.weight
    before = weight.detach().clone()
    assert not p.step(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))).skipped
    assert model.mid.weight is weight and p.fp8.layer_for(weight) is not None and weight.dtype == torch.float16
    assert not torch.equal(weight.detach(), before)  # it moved, in place
