import random

import pytest
import torch
from torch import nn

from mixprec.master import MasterWeights, half_with_fp32_norm_
from mixprec.scaler import DynamicLossScaler


def _half_net(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    master = MasterWeights(model)
    half_with_fp32_norm_(model)
    return model, master


def test_backs_off_on_overflow_and_grows_after_the_interval():
    s = DynamicLossScaler(init_scale=1024.0, growth_interval=3)
    s.update(True)
    assert s.get_scale() == 512.0
    s.update(False)
    s.update(False)
    assert s.get_scale() == 512.0
    s.update(False)
    assert s.get_scale() == 1024.0  # third clean step in a row
    s.update(False)
    s.update(True)  # an overflow resets the count of clean steps
    s.update(False)
    s.update(False)
    assert s.get_scale() == 512.0
    s.update(torch.tensor([0.0]))  # a found_inf tensor is accepted too
    assert s.get_scale() == 1024.0


@pytest.mark.parametrize("seed,interval,rate", [(0, 7, 0.08), (1, 3, 0.5), (2, 50, 0.01), (3, 2, 0.9)])
def test_trajectory_equals_grad_scaler_step_for_step(seed, interval, rate):
    rng = random.Random(seed)
    kw = dict(init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=interval)
    ours = DynamicLossScaler(**kw, min_scale=None, max_scale=None)
    ref = torch.amp.GradScaler("cpu", **kw)
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.0)
    for step in range(5000):
        overflow = rng.random() < rate
        p.grad = torch.tensor([float("inf") if overflow else 1.0])
        ref.scale(torch.ones(()))  # lazily creates the scale tensor
        ref.step(opt)
        ref.update()
        ours.update(overflow)
        assert ours.get_scale() == ref.get_scale(), f"diverged at step {step}"


def test_unscale_widens_then_divides_and_reports_inf():
    model, master = _half_net()
    s = DynamicLossScaler(init_scale=2.0**10)
    for p in master.model_params:
        p.grad = torch.full_like(p, 3.0)
    found_inf = s.unscale_(master.model_params, master.params)
    assert found_inf.item() == 0.0
    for m in master.params:
        assert m.grad.dtype == torch.float32
        assert torch.equal(m.grad, torch.full_like(m, 3.0 / 2**10))  # 3/1024 is below FP16's normal range
    s.update(found_inf)

    master.model_params[0].grad[0, 0] = float("nan")
    assert s.unscale_(master.model_params, master.params).item() == 1.0


def test_unscale_twice_in_one_step_is_an_error():
    model, master = _half_net()
    for p in master.model_params:
        p.grad = torch.zeros_like(p)
    s = DynamicLossScaler()
    s.unscale_(master.model_params, master.params)
    with pytest.raises(RuntimeError, match="already called"):
        s.unscale_(master.model_params, master.params)


def test_overflow_skips_the_step_and_leaves_master_weights_and_momentum_bit_identical():
    from mixprec.steps import manual_step
    from contextlib import nullcontext

    model, master = _half_net()
    opt = torch.optim.SGD(master.params, lr=0.1, momentum=0.9)
    scaler = DynamicLossScaler(init_scale=2.0**8)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    step = lambda: manual_step(model, opt, x, y, master=master, scaler=scaler, half_compute=nullcontext(),
                               dtype=torch.float16)
    assert not step().skipped  # a clean step creates the momentum buffers
    weights = [m.detach().clone() for m in master.params]
    momentum = [opt.state[m]["momentum_buffer"].clone() for m in master.params]
    half_weights = [p.detach().clone() for p in master.model_params]

    scaler._scale = 2.0**100  # far past FP16's 65504: the backward pass overflows
    out = step()
    assert out.skipped
    assert scaler.get_scale() == 2.0**99
    assert all(torch.equal(a, b) for a, b in zip(weights, master.params))
    assert all(torch.equal(a, opt.state[m]["momentum_buffer"]) for a, m in zip(momentum, master.params))
    assert all(torch.equal(a, b) for a, b in zip(half_weights, master.model_params))

    scaler._scale = 2.0**8
    assert not step().skipped
    assert not all(torch.equal(a, b) for a, b in zip(weights, master.params))


def test_master_weights_are_the_fp32_init_and_norm_layers_stay_fp32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))
    init = [p.detach().clone() for p in model.parameters()]
    master = MasterWeights(model)
    half_with_fp32_norm_(model)
    assert [p.dtype for p in model.parameters()] == [torch.float16] * 2 + [torch.float32] * 2 + [torch.float16] * 2
    assert model[1].running_var.dtype == torch.float32
    assert all(torch.equal(a, m) for a, m in zip(init, master.params))
    with torch.no_grad():
        master.params[0].add_(1e-4)  # an FP32 update; copy_to_model_ rounds it into the FP16 model
    master.copy_to_model_()
    assert torch.equal(model[0].weight, master.params[0].half())


@pytest.mark.filterwarnings("ignore:loss scale held at min_scale")
def test_state_dict_round_trip_continues_the_same_trajectory():
    rng = random.Random(1)
    a = DynamicLossScaler(init_scale=2.0**12, growth_interval=5, hysteresis=2, min_scale=2.0**-4, max_scale=2.0**14,
                          on_min_scale="skip")
    for _ in range(23):
        a.update(rng.random() < 0.2)
    b = DynamicLossScaler()
    b.load_state_dict(a.state_dict())
    for _ in range(200):
        flag = rng.random() < 0.4
        a.update(flag)
        b.update(flag)
        assert a.get_scale() == b.get_scale()


def test_hysteresis_tolerates_overflows_until_the_scale_grows():
    s = DynamicLossScaler(init_scale=1024.0, growth_interval=2, hysteresis=3)
    s.update(True)
    s.update(True)
    assert s.get_scale() == 1024.0  # two overflows tolerated
    s.update(True)
    assert s.get_scale() == 512.0  # the third backs off
    s.update(True)
    assert s.get_scale() == 256.0  # and every further one, until the scale grows again
    s.update(False)
    s.update(False)
    assert s.get_scale() == 512.0  # grown: the tolerance refills
    s.update(True)
    s.update(True)
    assert s.get_scale() == 512.0


def test_max_scale_caps_growth():
    s = DynamicLossScaler(init_scale=2.0**23, growth_interval=1, growth_factor=4.0)
    s.update(False)
    assert s.get_scale() == 2.0**24
    s.update(False)
    assert s.get_scale() == 2.0**24


def test_min_scale_raise_ends_the_run_with_a_clear_message():
    from mixprec.scaler import LossScaleCollapse

    s = DynamicLossScaler(init_scale=4.0, min_scale=2.0)
    s.update(True)
    assert s.get_scale() == 2.0
    with pytest.raises(LossScaleCollapse, match="min_scale=2.*lower --lr"):
        s.update(True)


def test_min_scale_skip_holds_the_floor_and_warns():
    s = DynamicLossScaler(init_scale=4.0, min_scale=2.0, on_min_scale="skip")
    s.update(True)
    with pytest.warns(UserWarning, match="held at min_scale=2"):
        s.update(True)
    for _ in range(5):
        s.update(True)
    assert s.get_scale() == 2.0


def test_static_scale_never_changes():
    s = DynamicLossScaler(init_scale=128.0, dynamic=False, growth_interval=1)
    for flag in (True, False, False, True):
        s.update(flag)
    assert s.get_scale() == 128.0


def test_telemetry_counts_on_known_gradients():
    p = nn.Parameter(torch.zeros(6, dtype=torch.float16))
    m = nn.Parameter(torch.zeros(6))
    scale = 2.0**10
    true = torch.tensor([0.0, 2.0**-40, 2.0**-20, 2.0**-15, 2.0**-5, -3.0])
    p.grad = (true * scale).half()  # 2**-40 * 2**10 is below FP16's smallest subnormal 2**-24: zero
    s = DynamicLossScaler(init_scale=scale, telemetry_every=2)
    s.unscale_([p], [m])
    largest, zeros, underflow, elements = s.pop_stats().tolist()
    assert largest == 3.0 and elements == 6
    assert zeros == 2  # the true zero and 2**-40, lost even at scale 2**10
    assert underflow == 2  # 2**-20 and 2**-15: nonzero below FP16's smallest normal 2**-14
    assert s.pop_stats() is None  # popped
    s.update(False)
    s.unscale_([p], [m])
    assert s.pop_stats() is None  # step 2 of every 2: not measured


def _count_host_syncs(fn):
    """Count the calls that copy a tensor's value to the host: item, bool, tolist, float, int, numpy."""
    from torch.overrides import TorchFunctionMode

    names = {"item", "__bool__", "tolist", "__float__", "__int__", "numpy", "cpu"}
    calls = []

    class Counter(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in names:
                calls.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return calls


def test_manual_step_syncs_with_the_host_once():
    from contextlib import nullcontext

    from mixprec.steps import manual_step

    model, master = _half_net()
    opt = torch.optim.SGD(master.params, lr=0.1)
    scaler = DynamicLossScaler()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for _ in range(2):
        calls = _count_host_syncs(lambda: manual_step(model, opt, x, y, master=master, scaler=scaler,
                                                      half_compute=nullcontext(), dtype=torch.float16))
        assert calls == ["__bool__"]


@pytest.mark.parametrize("kwargs", [dict(init_scale=0.0), dict(init_scale=float("inf")), dict(growth_factor=1.0),
                                    dict(backoff_factor=1.0), dict(growth_interval=0), dict(hysteresis=0),
                                    dict(on_min_scale="ignore"), dict(init_scale=2.0**30)])
def test_bad_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError):
        DynamicLossScaler(**kwargs)


def test_telemetry_without_master_weights_counts_in_place_fp16():
    p = nn.Parameter(torch.zeros(5, dtype=torch.float16))
    p.grad = torch.tensor([0.0, 2.0**-20, 2.0**-10, 1.0, 3072.0]).half()  # scaled by 2**10
    s = DynamicLossScaler(init_scale=2.0**10, telemetry_every=1)
    assert s.unscale_([p], [p]).item() == 0.0
    assert p.grad.tolist() == [0.0, 0.0, 2.0**-20, 2.0**-10, 3.0]  # 2**-30 is flushed by the FP16 unscale
    largest, zeros, underflow, elements = s.pop_stats().tolist()
    assert (largest, zeros, underflow, elements) == (3.0, 1, 1, 5)  # only 2**-20 is left in the subnormal range
