"""Emulated FP8 training (--fp8): casts, delayed scaling, one step against FP32, skips, layers, telemetry."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixprec.cli import UsageError
from mixprec.config import RunConfig, config_from_json
from mixprec.fp8 import COLUMNS, E4M3, E5M2, Fp8Recipe, Fp8Tensor, TensorScaling, dequantize, scaled_cast, widen
from mixprec.halfops import emulated_half_compute
from mixprec.steps import setup_precision
from tests.conftest import CPU, ThreeLayerNet

pytestmark = pytest.mark.usefixtures("tiny_models")


def _cfg(**kw):
    kw.setdefault("mode", "manual")
    kw.setdefault("fp8", "delayed")
    return RunConfig(model="three", device="cpu", **kw)


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_widen_is_torchs_fp8_to_fp32_conversion_for_every_code(fmt):
    codes = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(fmt.dtype)
    ref, got = codes.float(), widen(codes)
    assert torch.equal(ref.isnan(), got.isnan()) and ref.isnan().any()  # the NaN codes stay NaN
    finite = ~ref.isnan()
    assert torch.equal(ref[finite], got[finite]) and torch.equal(ref.signbit(), got.signbit())  # -0 too
    x = (torch.randn(2, 3, 5, 7) * fmt.max / 4).to(fmt.dtype)  # any shape, the codes in their places
    assert torch.equal(widen(x), x.float()) and widen(x).dtype == torch.float32


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_scaled_cast_is_torchs_cast_in_range_and_saturates_beyond(fmt):
    torch.manual_seed(0)
    scale = torch.tensor(3.0)  # not a power of two: the product is rounded once in FP32, then by the cast
    x = torch.cat([torch.randn(4000) * fmt.max / 8, torch.randn(1000) * 1e-3, torch.zeros(3)]).half()
    x = x[(x.float() * scale).abs() <= fmt.max]
    got = scaled_cast(x, scale, fmt)
    assert got.dtype == fmt.dtype
    assert torch.equal(got.view(torch.uint8), (x.float() * scale).to(fmt.dtype).view(torch.uint8))
    # the FP8 values themselves round-trip exactly with a power-of-two scale
    exact = (torch.randn(1000) * 10).to(fmt.dtype).float()
    q = scaled_cast(exact / 4, torch.tensor(4.0), fmt)
    assert torch.equal(dequantize(Fp8Tensor(q, torch.tensor(4.0), torch.tensor(0.25))), exact / 4)
    # beyond the range: +-max, never inf or NaN (torch's own E5M2 cast gives inf there)
    big = torch.tensor([fmt.max * 1.01, -fmt.max * 3, 1e30, -1e30, math.inf, -math.inf])
    sat = scaled_cast(big, torch.tensor(1.0), fmt).float()
    assert sat.tolist() == [fmt.max, -fmt.max] * 3 and torch.isfinite(sat).all()
    assert torch.isnan(scaled_cast(torch.tensor([math.nan]), torch.tensor(1.0), fmt).float()).all()


@pytest.mark.parametrize("margin", [0, 1])
def test_delayed_scale_follows_a_hand_worked_amax_history(margin):
    s = TensorScaling(E4M3, Fp8Recipe(amax_history=3, margin=margin), "activation")
    amaxes = [2.0, 8.0, 1.0, 0.5, 0.25, 4.0]
    # step 1: history empty, so the tensor's own amax 2; then max of the previous (at most 3) amaxes:
    # [2] -> 2, [2, 8] -> 8, [2, 8, 1] -> 8, [8, 1, 0.5] -> 8, [1, 0.5, 0.25] -> 1 (8 rolled off)
    references = [2.0, 2.0, 8.0, 8.0, 8.0, 1.0]
    used = [s.quantize(torch.tensor([a, -a / 2])).scale.item() for a in amaxes]
    assert used == [448 / (r * 2**margin) for r in references]
    assert sorted(s.history.tolist()) == [0.25, 0.5, 4.0]


def test_current_scaling_uses_each_tensors_own_amax_and_evaluation_records_nothing():
    s = TensorScaling(E5M2, Fp8Recipe(scaling="current"), "grad")
    assert [s.quantize(torch.tensor([a])).scale.item() for a in (2.0, 8.0)] == [57344 / 2, 57344 / 8]
    d = TensorScaling(E4M3, Fp8Recipe(), "weight")
    d.quantize(torch.tensor([4.0]))
    assert d.quantize(torch.tensor([1.0]), record=False).scale.item() == 448 / 4  # the delayed scale...
    assert d.recorded == 1 and d.history.max().item() == 4.0  # ...and the history untouched


def test_inf_in_a_tensor_makes_its_results_nan_and_does_not_poison_the_history():
    s = TensorScaling(E5M2, Fp8Recipe(), "grad")
    s.quantize(torch.tensor([4.0]))
    q = s.quantize(torch.tensor([1.0, math.inf]))
    assert q.scale.item() == 57344 / 4 and math.isnan(q.scale_inv.item())  # NaN products: the scaler skips
    assert s.history.max().item() == 4.0 and s.quantize(torch.tensor([2.0])).scale.item() == 57344 / 4
    c = TensorScaling(E5M2, Fp8Recipe(scaling="current"), "grad")
    c.quantize(torch.tensor([2.0]))
    zeros = c.quantize(torch.zeros(3))  # amax 0: the previous scale, not inf
    assert zeros.scale.item() == 57344 / 2 and torch.equal(dequantize(zeros), torch.zeros(3))


def test_one_fp8_step_matches_fp32_within_fp8_unit_roundoff():
    """One manual step of a one-layer net y = x W^T (all layers in FP8, loss scale S = 2^16) against the
    same step in FP64 on the same FP16-rounded x and W. The bound is componentwise and derived from the
    unit roundoffs u4 = 2^-4 (E4M3), u5 = 2^-3 (E5M2), u16 = 2^-11 (FP16) and FP32's 2^-24:

    * each FP8 operand: |x^ - x| <= u|x| + a, with a the half step of the format's subnormals divided by
      the scale (E4M3 2^-10/s, E5M2 2^-17/s); the scales are the first step's, from the current amax;
    * forward: |y^ - y| <= Ex(|W| + Ew)^T + |x| Ew^T + n 2^-24 (|x| + Ex)(|W| + Ew)^T, then the FP16
      rounding of the output: (1 + u16) that + u16 |y|;
    * softmax: p^_k / p_k lies in [exp(-2D), exp(2D)] with D = max_k |y^_k - y_k|, so |p^ - p| <= p (e^2D - 1);
    * grad_out g = S (p - t) / B in FP16 then E5M2: |g^q - g| <= Eg = Dg + u5 (|g| + Dg) + a_g, with
      Dg = S/B |p^ - p| (1 + u16) + u16 S/B |p - t| (+ FP32 softmax rounding, 2^-20 S/B);
    * weight gradient: |G^ - G| <= (1 + u16)[Eg^T (|x| + Ex) + |g|^T Ex + B 2^-24 (|g| + Eg)^T (|x| + Ex)]
      + u16 |G|, and the master gradient is G^ / S exactly (S a power of two).
    The test fails if the FP8 error exceeds this, if there is none (FP8 not applied), or if the bound is
    not well below |g|^T |x| (the first-order bound is ~(u4 + u5 + 2 u4 + ...) |g|^T |x|, under 0.5 of it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 10, bias=False))
    nn.init.normal_(model[1].weight, std=0.02)  # small logits: the softmax passes on little of the forward error
    w16 = model[1].weight.detach().half().double()
    p = setup_precision(_cfg(fp8_all_layers=True, lr=1e-3, momentum=0.0, weight_decay=0.0), model, CPU)
    batch, n, S = 8, 48, 2.0**16
    images, labels = torch.randn(batch, 3, 4, 4), torch.randint(0, 10, (batch,))
    assert not p.step(images, labels).skipped
    got = p.master.params[0].grad.double()

    u4, u5, u16, u32 = 2.0**-4, 2.0**-3, 2.0**-11, 2.0**-24
    x = images.half().double().flatten(1)
    ex = u4 * x.abs() + 2.0**-10 * x.abs().max() / 448
    ew = u4 * w16.abs() + 2.0**-10 * w16.abs().max() / 448
    y = x @ w16.T
    big_x, big_w = x.abs() + ex, w16.abs() + ew
    dy = ex @ big_w.T + x.abs() @ ew.T + n * u32 * big_x @ big_w.T
    dy = (1 + u16) * dy + u16 * y.abs()
    prob = torch.softmax(y, 1)
    target = F.one_hot(labels, 10).double()
    dp = prob * (torch.exp(2 * dy.max(1, keepdim=True).values) - 1)
    g = S * (prob - target) / batch
    dg = S / batch * (dp * (1 + u16) + u16 * (prob - target).abs() + 2.0**-20)
    eg = dg + u5 * (g.abs() + dg) + 2.0**-17 * (g.abs().max() + dg.max()) / 57344
    bound = (1 + u16) * (eg.T @ big_x + g.abs().T @ ex + batch * u32 * (g.abs() + eg).T @ big_x) + u16 * (g.T @ x).abs()
    want = (g.T @ x) / S
    error = (got - want).abs()
    assert (error <= bound / S).all(), (error / (bound / S)).max()
    assert error.max() > 0  # FP8 really rounded something
    # and the bound says something: well below the sum of magnitudes |g|^T |x| it is relative to (the cancellation
    # in g^T x over the batch is what any componentwise bound cannot count on)
    relative = bound / (g.abs().T @ x.abs())
    assert relative.median() < 0.5 and relative.max() < 1, (relative.median(), relative.max())


def test_injected_overflow_in_fp8_skips_keeps_master_weights_and_halves_the_scale():
    torch.manual_seed(0)
    p = setup_precision(_cfg(inject_overflow=(2,)), ThreeLayerNet(), CPU)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    assert not p.step(x, y).skipped
    weights = [m.detach().clone() for m in p.master.params]
    assert p.step(x, y).skipped
    assert all(torch.equal(a, b) for a, b in zip(weights, p.master.params))
    assert p.loss_scale() == 2.0**15
    grad = p.fp8.layers["mid"].grad
    assert torch.isfinite(grad.history).all() and grad.recorded == 2  # the overflow pushed 0, not inf
    assert not p.step(x, y).skipped  # and training goes on


@pytest.mark.parametrize("all_layers", [False, True])
def test_first_conv_and_classifier_stay_fp16_unless_all_layers(all_layers):
    torch.manual_seed(0)
    model = ThreeLayerNet()
    p = setup_precision(_cfg(fp8_all_layers=all_layers), model, CPU)
    outputs = {}
    for name in ("stem", "mid", "fc"):
        getattr(model, name).register_forward_hook(  # the module as it was then: the step updates it
            lambda m, args, out, name=name: outputs.update({name: (copy.deepcopy(m), args[0], out)}))
    p.step(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,)))
    assert sorted(p.fp8.layers) == (["fc", "mid", "stem"] if all_layers else ["mid"])
    assert p.fp8.fp16_layers == ([] if all_layers else ["stem", "fc"])
    assert all(layer.uses == 1 for layer in p.fp8.layers.values())
    for name, (module, inp, out) in outputs.items():
        with torch.no_grad(), emulated_half_compute():
            fp16 = module(inp)
        quantized = name == "mid" or all_layers
        assert out.dtype == torch.float16 and torch.equal(out, fp16) != quantized, name


def test_telemetry_lands_in_the_step_rows_for_fp8_and_is_nan_otherwise(tiny_cifar):
    from mixprec.data import load_cifar10, make_splits
    from mixprec.train import train

    splits = make_splits(load_cifar10(tiny_cifar["pickles"]))
    fp8 = train(_cfg(epochs=1, batch_size=16, telemetry_every=5), splits, log=lambda msg: None)
    fp16 = train(_cfg(epochs=1, batch_size=16, fp8="off"), splits, log=lambda msg: None)
    for result in (fp8, fp16):
        assert all(set(COLUMNS) <= set(row) for row in result.steps)
    measured = [i for i, row in enumerate(fp8.steps) if not math.isnan(row["fp8_grad_scale"])]
    assert measured == [0, 5, 10]  # steps 1, 6, 11: every --telemetry-every 5
    first = fp8.steps[0]
    assert all(0 <= first[f"fp8_{r}_{s}"] <= 1 for r in ("weight", "activation", "grad")
               for s in ("saturated_frac", "flushed_frac"))
    assert first["fp8_weight_scale"] > 1 and first["fp8_grad_scale"] > 0
    assert all(math.isnan(row[c]) for row in fp16.steps for c in COLUMNS)
    assert fp8.fp8["formats"] == {"weights": "E4M3", "activations": "E4M3", "gradients": "E5M2"}
    assert fp8.fp8["scaling"] == "delayed" and fp8.fp8["fp16_layers"] == ["stem", "fc"] and fp16.fp8 is None


@pytest.mark.parametrize("kw, message", [
    (dict(fp8="off", fp8_margin=1), "--fp8-margin sets up FP8 training"),
    (dict(mode="amp", fp8="off", fp8_all_layers=True), "--fp8-all-layers sets up FP8 training"),
    (dict(mode="amp"), "--fp8 is an ablation of manual mode"),
    (dict(manual_dtype="bfloat16"), "--fp8 is a recipe over an FP16 model"),
    (dict(fp8="current", fp8_amax_history=4), "--fp8 current keeps none"),
    (dict(fp8_margin=-1), "--fp8-margin must be a non-negative integer"),
    (dict(fp8_amax_history=0), "--fp8-amax-history must be a positive integer"),
    (dict(half_compute="native"), "drop --half-compute native"),
])
def test_fp8_options_are_checked(kw, message):
    with pytest.raises(UsageError, match=message):
        _cfg(**kw)


@pytest.mark.parametrize("old, fp8", [({"manual_dtype": "float8", "fp8_scaling": "current"}, "current"),
                                      ({"manual_dtype": "float8", "fp8_scaling": "delayed"}, "delayed"),
                                      ({"manual_dtype": "float16", "fp8_scaling": "delayed"}, "off")])
def test_a_run_directory_from_before_the_fp8_option_reads_as_that_recipe(old, fp8):
    """Runs made before --fp8 wrote manual_dtype float8 and fp8_scaling into config.json."""
    cfg = config_from_json({"mode": "manual", "model": "resnet20", **old})
    assert (cfg.manual_dtype, cfg.fp8) == ("float16", fp8)
