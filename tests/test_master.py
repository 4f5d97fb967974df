"""The no-master-weights telemetry: updates and weight decay lost to rounding in half-precision weights."""

import io
import math

import pytest
import torch
from torch import nn

from mixprec.master import MasterWeights, kahan_add_, lost_updates, stochastic_round
from tests.conftest import train_tiny


def _sgd_step(w, grad, **kw):
    p = nn.Parameter(w.clone())
    opt = torch.optim.SGD([p], **kw)
    p.grad = grad.clone()
    before = [p.detach().clone()]
    opt.step()
    return p, lost_updates(opt, [p], before).tolist()


def test_an_update_below_half_an_ulp_is_lost_and_a_larger_one_is_not():
    w = torch.ones(4, dtype=torch.float16)  # FP16 spacing above 1 is 2**-10, below it 2**-11
    grad = torch.tensor([2**-13, -2**-13, 2**-8, 0.0], dtype=torch.float16)  # lr 1: steps of 2^-13 are lost
    p, (lost, moving, _, _) = _sgd_step(w, grad, lr=1.0)
    assert p.tolist() == [1.0, 1.0, 1 - 2**-8, 1.0]
    assert (lost, moving) == (2, 3)  # the zero gradient is not an update


def test_weight_decay_vanishes_in_fp16_when_lr_times_wd_is_below_2_to_the_minus_12():
    torch.manual_seed(0)
    w = (torch.randn(10000) * 0.1).half()
    zero = torch.zeros_like(w)
    for lr, wd, expect_all_lost in ((0.2, 5e-4, True), (0.1, 5e-4, True), (1.0, 5e-3, False)):
        p, (lost, moving, decays_lost, nonzero) = _sgd_step(w, zero, lr=lr, weight_decay=wd)
        assert nonzero == torch.count_nonzero(w).item() and moving == nonzero
        if expect_all_lost:  # lr * wd = 1e-4 or 5e-5 < 2^-12: predicted, every decay rounds away
            assert decays_lost == nonzero and lost == moving and torch.equal(p.detach(), w)
        else:  # lr * wd = 5e-3 > 2^-10: every weight moves
            assert decays_lost == 0 and lost == 0


def test_momentum_and_nesterov_directions_are_the_ones_sgd_applied():
    w = torch.ones(3, dtype=torch.float16)
    grad = torch.tensor([2**-9, 2**-14, 0.0], dtype=torch.float16)
    for nesterov in (False, True):
        p, (lost, moving, _, _) = _sgd_step(w, grad, lr=1.0, momentum=0.9, nesterov=nesterov)
        moved = (p.detach() != w).sum().item()
        assert moving == 2 and lost == moving - moved == 1  # 2^-14 is lost, 2^-9 is taken


def test_master_weights_measure_only_without_masters_and_on_measured_steps():
    model = nn.Linear(4, 2).half()
    for kind, measure, expected in (("fp32", True, False), ("none", False, False), ("none", True, True)):
        master = MasterWeights(model, kind)
        opt = torch.optim.SGD(master.params, lr=0.1, weight_decay=5e-4)
        for p in master.params:
            p.grad = torch.full_like(p, 1e-5)
        with master.stepping(opt, measure):
            opt.step()
        stats = master.pop_stats()
        assert (stats is not None) == expected
        if expected:
            assert stats.tolist()[1] == sum(p.numel() for p in master.params)  # every weight had an update
            assert master.pop_stats() is None  # popped once


def test_no_master_weights_runs_measure_lost_updates_in_steps_csv_rows(tiny_cifar, tiny_models):
    rows = train_tiny(tiny_cifar, mode="manual", master_weights="none", lr=0.1, weight_decay=5e-4,
                      telemetry_every=2).steps
    measured = [r for r in rows if r["decay_lost_frac"] == r["decay_lost_frac"]]  # not NaN
    assert [r["step"] for r in measured] == [s for s in range(1, len(rows) + 1) if (s - 1) % 2 == 0]
    # lr * wd = 5e-5 < 2^-12: every weight's decay rounds away, as predicted
    assert all(r["decay_lost_frac"] == 1.0 for r in measured)
    assert all(0 <= r["update_lost_frac"] <= 1 for r in measured)
    with_masters = train_tiny(tiny_cifar, mode="manual", lr=0.1, weight_decay=5e-4).steps
    assert all(r["update_lost_frac"] != r["update_lost_frac"] for r in with_masters)  # NaN: nothing lost


# --master-weights stochastic and kahan: the mechanics, then through the optimizer


def _neighbours(x: float, dtype: torch.dtype) -> tuple[float, float]:
    """The two values of ``dtype`` around ``x`` (equal when ``dtype`` holds ``x``)."""
    t = torch.tensor(x)
    near = t.to(dtype)
    if near.float() == t:
        return near.item(), near.item()
    other = torch.nextafter(near, torch.tensor(torch.inf if t > near.float() else -torch.inf, dtype=dtype))
    return tuple(sorted((near.item(), other.item())))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("x", [1 + 2**-12, -(1 + 2**-12), 1 - 2**-13, 0.1, -3e-3, 3e-7, 1.0, 0.0])
def test_the_mean_of_many_stochastic_roundings_of_x_is_x_within_its_statistical_bound(dtype, x):
    """Each rounding is the lower neighbour ``lo`` or the upper ``hi``, ``hi`` with probability
    ``p = (x - lo) / (hi - lo)``: the mean of n roundings has expectation x and standard deviation
    ``(hi - lo) * sqrt(p (1 - p) / n)``. It must lie within 5 of those (a false alarm once in 1.7 million);
    nearest rounding of the same x is more than 10 of them away."""
    n, x = 100_000, torch.tensor(x).item()  # x as FP32 holds it
    lo, hi = _neighbours(x, dtype)
    rounded = stochastic_round(torch.full((n,), x), dtype, torch.Generator().manual_seed(1)).double()
    assert set(rounded.unique().tolist()) <= {lo, hi}
    if lo == hi:  # a value the dtype holds stays exactly as it is
        assert rounded.eq(lo).all()
        return
    p = (x - lo) / (hi - lo)
    sigma = (hi - lo) * math.sqrt(p * (1 - p) / n)
    assert abs(rounded.mean().item() - x) < 5 * sigma
    assert abs(torch.tensor(x).to(dtype).item() - x) > 10 * sigma  # the bound tells nearest rounding apart


def test_stochastic_rounding_is_reproducible_from_its_generator_and_random_between_seeds():
    x = torch.linspace(-1, 1, 1000) + 1e-4
    one, again, other = (stochastic_round(x, torch.float16, torch.Generator().manual_seed(s)) for s in (0, 0, 1))
    assert torch.equal(one, again) and not torch.equal(one, other)


@pytest.mark.parametrize("dtype,update,steps", [(torch.float16, 1e-5, 10_000), (torch.bfloat16, 1e-4, 2_000)])
def test_a_long_kahan_sum_of_tiny_updates_ends_within_one_ulp_of_the_fp32_sum_and_nearest_rounding_does_not(
        dtype, update, steps):
    """1 plus many updates each below half the spacing of the half weight at 1 (2**-11 in FP16, 2**-8 in
    bfloat16): rounded to nearest alone, every one is lost and the weight stays 1; with the compensation
    buffer the weight ends within one spacing of the FP32 sum (about 1.1 and 1.2)."""
    ups = torch.full((1,), update)
    fp32 = torch.ones(1)
    kahan, compensation, nearest = torch.ones(1, dtype=dtype), torch.zeros(1, dtype=dtype), torch.ones(1, dtype=dtype)
    for _ in range(steps):
        fp32 += ups
        kahan_add_(kahan, compensation, ups)
        nearest.copy_(nearest.float() + ups)
    rounded = fp32.to(dtype)
    ulp = (torch.nextafter(rounded, torch.tensor(torch.inf, dtype=dtype)).float() - rounded.float()).item()
    assert abs(kahan.float().item() - fp32.item()) <= ulp
    assert nearest.item() == 1.0 and abs(nearest.float().item() - fp32.item()) > 10 * ulp


def _half_layer(kind: str, dtype=torch.float16, seed: int = 0, **sgd):
    """A 1000-weight layer at 1.0, cast to ``dtype`` after its :class:`MasterWeights` of ``kind`` is made, and
    SGD (lr 1e-4) over what that steps."""
    model = nn.Linear(1000, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    master = MasterWeights(model, kind, seed=seed)
    model.to(dtype)
    return model, master, torch.optim.SGD(master.params, lr=1e-4, **sgd)


def _steps(model, master, opt, steps: int, grad: float = 0.5) -> torch.Tensor:
    """``steps`` SGD steps with a constant gradient (updates of 5e-5: below half FP16's spacing at 1, 2**-11),
    measuring the last. The weights after."""
    for step in range(steps):
        with torch.no_grad():
            for p in master.params:
                p.grad = torch.full_like(p, grad)
        with master.stepping(opt, measure=step == steps - 1):
            opt.step()
    return model.weight.detach().clone()


def test_each_kind_takes_the_updates_of_sgd_that_nearest_rounding_in_half_loses():
    """200 steps of -5e-5: FP32 keeps -0.01. Without master weights every step is lost. Kahan ends within one
    FP16 spacing (2**-11 below 1) of FP32's weights; stochastic rounding's mean weight within 5 standard
    deviations of it."""
    exact = 1 - 200 * 5e-5
    fp32, none, kahan, stochastic = (_steps(*_half_layer(kind), 200)
                                     for kind in ("fp32", "none", "kahan", "stochastic"))
    assert torch.equal(fp32, torch.full_like(fp32, exact))
    assert none.eq(1.0).all()
    assert (kahan.float() - exact).abs().max() <= 2**-11
    # each weight is a sum of 200 independent roundings, each of variance at most (2**-11)**2 / 4
    assert abs(stochastic.float().mean().item() - exact) < 5 * 2**-12 * math.sqrt(200 / 1000)


@pytest.mark.parametrize("kind", ["stochastic", "kahan"])
def test_the_working_copies_exist_only_during_the_step_widened_from_the_half_weights(kind):
    """What the optimizer steps with stochastic and kahan holds storage only inside ``stepping``, where it is the
    half weights widened (so nothing carries from one step to the next); between steps it holds none, so these
    kinds keep no FP32 copy of the weights. FP32 master weights hold theirs throughout."""
    model, master, opt = _half_layer(kind, momentum=0.9)
    held = lambda: sum(p.untyped_storage().nbytes() for p in master.params)  # noqa: E731
    assert held() == 0
    for step in range(3):
        for p in master.params:
            p.grad = torch.full_like(p, 0.5)
        with master.stepping(opt, measure=False):
            assert held() == 4 * sum(p.numel() for p in master.model_params)
            assert all(torch.equal(w, p.float()) for w, p in zip(master.params, master.model_params))
            opt.step()
        assert held() == 0
    _, fp32, _ = _half_layer("fp32")
    assert sum(p.untyped_storage().nbytes() for p in fp32.params) == 4 * sum(p.numel() for p in fp32.model_params)


def _rows(master: MasterWeights) -> tuple[float, float]:
    row = master.telemetry.to_row(master.pop_stats().tolist())
    assert list(row) == ["update_lost_frac", "decay_lost_frac", "update_lost_nearest_frac"]
    assert math.isnan(row["decay_lost_frac"])  # weight decay is measured apart only with none
    return row["update_lost_frac"], row["update_lost_nearest_frac"]


def test_stochastic_and_kahan_measure_what_they_lost_against_nearest_rounding():
    """Updates of 5e-5 at 1.0: rounding to nearest would lose every one. Stochastic rounding moves a weight
    with probability 5e-5 / 2**-11 (about 0.1), so about 0.9 of them are lost at a step; Kahan's first
    step moves no half weight but carries every update in the compensation, so none is lost."""
    model, stochastic, opt = _half_layer("stochastic")
    _steps(model, stochastic, opt, 1)
    lost, nearest = _rows(stochastic)
    assert nearest == 1.0 and 0.85 < lost < 0.95
    model, kahan, opt = _half_layer("kahan")
    _steps(model, kahan, opt, 1)
    assert _rows(kahan) == (0.0, 1.0)
    model, fp32, opt = _half_layer("fp32")
    _steps(model, fp32, opt, 1)
    assert fp32.pop_stats() is None  # nothing is lost to the model's precision


def _through_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kind", ["fp32", "none", "stochastic", "kahan"])
def test_the_state_of_each_kind_round_trips_and_goes_on_bit_identically(kind):
    """Weights, optimizer and :meth:`MasterWeights.state_dict` saved after 5 steps and loaded into a fresh
    copy made with another seed: the next 5 steps give the same weights bit for bit. The generator of
    stochastic rounding and Kahan's compensation are what the state adds to the model's weights."""
    model, master, opt = _half_layer(kind, momentum=0.9)
    _steps(model, master, opt, 5)
    saved = _through_bytes({"model": model.state_dict(), "master": master.state_dict(), "opt": opt.state_dict()})
    assert (saved["master"] is None) == (kind == "none")
    model2, master2, opt2 = _half_layer(kind, seed=7, momentum=0.9)
    model2.load_state_dict(saved["model"])
    if saved["master"] is not None:
        master2.load_state_dict(saved["master"])
    opt2.load_state_dict(saved["opt"])
    went_on = _steps(model, master, opt, 5)
    assert torch.equal(_steps(model2, master2, opt2, 5), went_on)
    if kind in ("stochastic", "kahan"):  # and without the state it would not
        model3, master3, opt3 = _half_layer(kind, seed=7, momentum=0.9)
        model3.load_state_dict(saved["model"])
        opt3.load_state_dict(saved["opt"])
        assert not torch.equal(_steps(model3, master3, opt3, 5), went_on)
