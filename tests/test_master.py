"""The no-master-weights telemetry: updates and weight decay lost to rounding in half-precision weights."""

import torch
from torch import nn

from mixprec.master import MasterWeights, lost_updates
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
    for enabled, measure, expected in ((True, True, False), (False, False, False), (False, True, True)):
        master = MasterWeights(model, enabled=enabled)
        opt = torch.optim.SGD(master.params, lr=0.1, weight_decay=5e-4)
        for p in master.params:
            p.grad = torch.full_like(p, 1e-5)
        with master.watching(opt, measure):
            opt.step()
        stats = master.pop_stats()
        assert (stats is not None) == expected
        if expected:
            assert stats.tolist()[1] == sum(p.numel() for p in master.params)  # every weight had an update
            assert master.pop_stats() is None  # popped once


def test_no_master_weights_runs_measure_lost_updates_in_steps_csv_rows(tiny_cifar, tiny_models):
    rows = train_tiny(tiny_cifar, mode="manual", master_weights=False, lr=0.1, weight_decay=5e-4,
                      telemetry_every=2).steps
    measured = [r for r in rows if r["decay_lost_frac"] == r["decay_lost_frac"]]  # not NaN
    assert [r["step"] for r in measured] == [s for s in range(1, len(rows) + 1) if (s - 1) % 2 == 0]
    # lr * wd = 5e-5 < 2^-12: every weight's decay rounds away, as predicted
    assert all(r["decay_lost_frac"] == 1.0 for r in measured)
    assert all(0 <= r["update_lost_frac"] <= 1 for r in measured)
    with_masters = train_tiny(tiny_cifar, mode="manual", lr=0.1, weight_decay=5e-4).steps
    assert all(r["update_lost_frac"] != r["update_lost_frac"] for r in with_masters)  # NaN: nothing lost
