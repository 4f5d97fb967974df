"""The fast-recipe options: cosine with linear warm-up, label smoothing, Nesterov momentum."""

import math

import pytest
import torch
import torch.nn.functional as F

from mixprec.cli import UsageError
from mixprec.config import RunConfig
from mixprec.steps import setup_precision
from mixprec.train import LR_WARMUP_START, make_scheduler
from tests.conftest import CPU, TinyNet, tiny_cfg, train_tiny

pytestmark = pytest.mark.usefixtures("tiny_models")

MODES = [("baseline", {}), ("amp", {}), ("manual", {})]


def _warmup_cosine(step, peak, warmup, total):
    """The closed form: linear from peak * LR_WARMUP_START to peak over `warmup` steps, then cosine to 0."""
    if step < warmup:
        return peak * (LR_WARMUP_START + (1 - LR_WARMUP_START) * step / warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def _lrs(cfg, steps_per_epoch, steps):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr, momentum=0.9)
    sched = make_scheduler(cfg, opt, steps_per_epoch)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs, opt, sched


@pytest.mark.parametrize("warmup_epochs,warmup_steps", [(1, 10), (0.5, 5), (2.5, 25)])
def test_warmup_cosine_follows_its_closed_form(warmup_epochs, warmup_steps):
    cfg = RunConfig(mode="baseline", epochs=4, lr=0.4, schedule="cosine", warmup_epochs=warmup_epochs)
    lrs, opt, _ = _lrs(cfg, steps_per_epoch=10, steps=40)
    assert lrs[0] == pytest.approx(0.4 * LR_WARMUP_START)  # the ramp starts at a tenth of the peak
    assert lrs[warmup_steps] == pytest.approx(0.4)  # the peak, reached after the warm-up
    assert max(lrs) == pytest.approx(0.4)
    for step, lr in enumerate(lrs):
        assert lr == pytest.approx(_warmup_cosine(step, 0.4, warmup_steps, 40), abs=1e-9), step
    assert all(a < b for a, b in zip(lrs[:warmup_steps], lrs[1:warmup_steps + 1]))  # rises...
    assert all(a > b for a, b in zip(lrs[warmup_steps:], lrs[warmup_steps + 1:]))  # ...then falls
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # 0 after the run's last step


def test_cosine_without_warmup_is_unchanged():
    lrs, _, sched = _lrs(RunConfig(mode="baseline", epochs=4, lr=0.4, schedule="cosine"), 10, 40)
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert lrs[0] == 0.4 and lrs[20] == pytest.approx(0.2)


def test_warmup_schedule_round_trips_its_state_dict():
    """Checkpoints save the scheduler's state: a resumed schedule continues where it stopped."""
    cfg = RunConfig(mode="baseline", epochs=4, lr=0.4, schedule="cosine", warmup_epochs=1)
    whole, _, _ = _lrs(cfg, 10, 40)
    first, opt, sched = _lrs(cfg, 10, 7)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr, momentum=0.9)
    sched2 = make_scheduler(cfg, opt2, 10)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    rest = []
    for _ in range(33):
        rest.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert first + rest == pytest.approx(whole)


def test_training_steps_record_the_warmup_schedule(tiny_cifar):
    result = train_tiny(tiny_cifar, mode="manual", schedule="cosine", warmup_epochs=1, epochs=2, lr=0.2)
    n = len(result.steps)
    per_epoch = n // 2
    lrs = [r["lr"] for r in result.steps]
    assert lrs == pytest.approx([_warmup_cosine(s, 0.2, per_epoch, n) for s in range(n)])


@pytest.mark.parametrize("mode,extra", MODES)
def test_label_smoothing_is_the_training_loss(mode, extra):
    """The step's loss is cross-entropy with smoothed targets on the step's own logits."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    model = TinyNet()
    with torch.no_grad():
        model.fc.weight.mul_(30)  # confident logits, far from uniform, where smoothing matters
    p = setup_precision(tiny_cfg(mode=mode, label_smoothing=0.3, **extra), model, CPU)
    out = p.step(x, y)
    logits = out.logits.float()
    assert out.loss.item() == pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.3).item(), rel=1e-4)
    assert out.loss.item() != pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-2)


@pytest.mark.parametrize("mode,extra", MODES)
def test_nesterov_reaches_the_optimizer(mode, extra):
    for nesterov in (False, True):
        p = setup_precision(tiny_cfg(mode=mode, nesterov=nesterov, **extra), TinyNet(), CPU)
        assert all(g["nesterov"] is nesterov for g in p.optimizer.param_groups)


@pytest.mark.parametrize("kw,message", [
    (dict(label_smoothing=1.0), r"--label-smoothing must be in \[0, 1\), got 1.0"),
    (dict(label_smoothing=-0.1), r"--label-smoothing must be in \[0, 1\)"),
    (dict(label_smoothing=math.nan), r"--label-smoothing must be in \[0, 1\)"),
    (dict(schedule="cosine", warmup_epochs=-1), "--warmup-epochs must be at least 0 and less than --epochs 3"),
    (dict(schedule="cosine", warmup_epochs=3), "--warmup-epochs must be at least 0 and less than --epochs 3"),
    (dict(schedule="step", warmup_epochs=1), "add --schedule cosine"),
    (dict(nesterov=True, momentum=0.0), "--nesterov needs momentum"),
])
def test_bad_recipe_values_are_refused(kw, message):
    with pytest.raises(UsageError, match=message) as e:
        tiny_cfg(epochs=3, **kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("mode,extra", MODES)
def test_test_time_flip_averages_the_logits_of_the_mirror_images(mode, extra):
    from mixprec.data import CifarLoader
    from mixprec.train import evaluate

    torch.manual_seed(0)
    model = TinyNet()
    p = setup_precision(tiny_cfg(mode=mode, **extra), model, CPU)
    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 10, (20,))
    loader = CifarLoader(images, labels, batch_size=8, train=False, device=CPU)
    model.eval()
    with torch.no_grad():
        batches = [x for x, _ in loader]
        plain = torch.cat([p.forward(x).float() for x in batches])
        mirrored = torch.cat([p.forward(x.flip(3)).float() for x in batches])
        assert not torch.allclose(plain, mirrored)  # the net is not mirror-invariant: the test can fail
        for flip, logits in ((False, plain), (True, (plain + mirrored) / 2)):
            loss, acc, preds = evaluate(p.forward, model, loader, labels, flip=flip)
            assert torch.equal(preds, logits.argmax(1))
            assert loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
            assert acc == pytest.approx((logits.argmax(1) == labels).float().mean().item())


def test_test_time_flip_is_off_by_default_and_a_flag():
    from mixprec.config import parse_args

    assert RunConfig(mode="baseline").test_time_flip is False
    assert parse_args(["--mode", "baseline", "--test-time-flip"]).test_time_flip is True


def test_crop_padding_is_an_option_checked_and_used_by_the_training_loader(monkeypatch, tiny_cifar):
    from mixprec import train as train_module
    from mixprec.config import parse_args

    assert RunConfig(mode="baseline").crop_padding == 4 and parse_args(["--mode", "baseline"]).crop_padding == 4
    assert parse_args(["--mode", "baseline", "--crop-padding", "2"]).crop_padding == 2
    for bad in (-1, 1.5, True):
        with pytest.raises(UsageError, match="--crop-padding must be a non-negative integer"):
            RunConfig(mode="baseline", crop_padding=bad)
    pads = []
    original = train_module.CifarLoader

    def spy(*args, **kw):
        loader = original(*args, **kw)
        pads.append((loader.train, loader.pad))
        return loader

    monkeypatch.setattr(train_module, "CifarLoader", spy)
    train_tiny(tiny_cifar, mode="baseline", crop_padding=2)
    assert (True, 2) in pads and (True, 4) not in pads
