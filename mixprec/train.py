"""The training loop shared by all modes: seeding, epochs, evaluation, timing. No file I/O.

``train(cfg, splits)`` returns a :class:`RunResult`; ``on_epoch`` is called with the rows so far
after every epoch, so that the caller can save them as it goes.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix
from tqdm.auto import tqdm

from . import device as dev
from .config import RunConfig
from .data import CifarLoader, Splits
from .models import build_model, count_params
from .scaler import LossScaleCollapse
from .steps import Precision, setup_precision

SYNC_EVERY = 20  # steps between progress updates; each costs a host sync in baseline mode
EVAL_BATCH_SIZE = 500


class Diverged(Exception):
    """The training loss became inf/NaN with no loss scaler to absorb it."""


@dataclass
class RunResult:
    """Everything a run measured; ``results``/``run`` turn it into files."""

    status: str  # "completed" or "failed"
    error: str | None
    device: str
    amp_dtype: str | None
    half_compute: str | None
    params: int
    notes: list[str] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    train_time_s: float = 0.0
    train_images: int = 0
    skipped_steps: int = 0
    final_loss_scale: float | None = None
    peak_memory_bytes: int = 0
    test: dict | None = None  # accuracy, loss, per_class_accuracy, confusion_matrix


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def make_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Stepped after every optimizer step that was taken, never after a skipped one (as Megatron and
    fairseq do, and GradScaler users cannot), with lengths given in epochs. ``step``: halve every 20
    epochs (Oreč 2021). ``cosine-restarts``: SGDR restarting after 10, then 20, 40... epochs."""
    sched = torch.optim.lr_scheduler
    if cfg.schedule == "step":
        return sched.StepLR(optimizer, step_size=20 * steps_per_epoch, gamma=0.5)
    if cfg.schedule == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps_per_epoch)
    return sched.CosineAnnealingWarmRestarts(optimizer, T_0=10 * steps_per_epoch, T_mult=2)


@torch.no_grad()
def evaluate(precision: Precision, model: torch.nn.Module, loader: CifarLoader):
    """Mean loss, accuracy, and the predictions, using the mode's own forward precision."""
    model.eval()
    loss_sum = torch.zeros((), device=loader.labels.device)
    preds = []
    for images, labels in loader:
        logits = precision.forward(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        preds.append(logits.argmax(1))
    preds = torch.cat(preds)
    n = len(loader.labels)
    return loss_sum.item() / n, (preds == loader.labels).float().mean().item(), preds.cpu()


@dataclass
class EpochStats:
    loss: float  # mean over steps with a finite loss
    accuracy: float
    skipped_steps: int
    images: int
    last_finite_loss: float
    steps: list[dict]  # one row per optimizer step, for steps.csv


def _train_epoch(precision: Precision, scheduler, model, loader: CifarLoader, epoch: int, first_step: int,
                 cfg: RunConfig, scaled: bool, last_finite_loss: float) -> EpochStats:
    model.train()
    n = len(loader)
    losses = torch.full((n,), math.nan, device=loader.labels.device)
    correct = torch.zeros((), dtype=torch.int64, device=loader.labels.device)
    lrs, scales, skips, grad_stats = [], [], [], {}
    start = time.perf_counter()
    bar = tqdm(loader, total=n, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
               file=sys.stderr, dynamic_ncols=True, disable=None)
    for i, (images, labels) in enumerate(bar):
        lrs.append(precision.optimizer.param_groups[0]["lr"])
        out = precision.step(images, labels)
        if not out.skipped:
            scheduler.step()
        losses[i] = out.loss
        correct += (out.logits.argmax(1) == labels).sum()
        scales.append(precision.loss_scale())
        skips.append(out.skipped)
        if (stats := precision.pop_stats()) is not None:
            grad_stats[i] = stats  # stays on the device: read once, at the end of the epoch
        if (i + 1) % SYNC_EVERY == 0 or i + 1 == n:
            seen = losses[: i + 1]
            finite = torch.isfinite(seen).cpu()  # host sync: progress and the divergence check
            if not scaled and not finite.all():
                first = int((~finite).nonzero()[0])
                if first > 0:
                    last_finite_loss = float(seen[first - 1])
                raise Diverged(f"training loss became {float(seen[first])} at epoch {epoch + 1}, step {first + 1} "
                               f"(last finite loss {last_finite_loss:.4g}); lower --lr")
            if finite.any():
                last_finite_loss = float(seen[finite.nonzero()[-1]])
            bar.set_postfix(loss=f"{last_finite_loss:.3f}",
                            img_s=f"{(i + 1) * loader.batch_size / (time.perf_counter() - start):.0f}")
    finite = torch.isfinite(losses)
    mean_loss = float(losses[finite].mean()) if bool(finite.any()) else math.nan
    images = n * loader.batch_size
    measured = dict(zip(grad_stats, torch.stack(list(grad_stats.values())).tolist())) if grad_stats else {}
    rows = []
    for i, (loss, lr, scale, skipped) in enumerate(zip(losses.tolist(), lrs, scales, skips)):
        largest, zeros, underflow, elements = measured.get(i, (math.nan,) * 3 + (1.0,))
        rows.append(dict(step=first_step + i, epoch=epoch + 1, loss=loss, lr=lr, loss_scale=scale, skipped=skipped,
                         grad_max_abs=largest, grad_zero_frac=zeros / elements,
                         grad_underflow_frac=underflow / elements))
    return EpochStats(mean_loss, int(correct) / images, sum(skips), images, last_finite_loss, rows)


def train(cfg: RunConfig, splits: Splits, *, on_epoch: Callable[[RunResult], None] | None = None,
          log: Callable[[str], None] = print) -> RunResult:
    """Train ``cfg.model`` in ``cfg.mode`` on ``splits`` and evaluate it on the test split.

    With the same seed, every mode starts from the same FP32 weights and sees the same batches."""
    device = dev.resolve_device(cfg.device)
    dev.configure(device)
    seed_everything(cfg.seed)
    model = build_model(cfg.model, num_classes=len(splits.classes)).to(device)
    params = count_params(model)
    precision = setup_precision(cfg, model, device)
    train_loader = CifarLoader(*splits.train, cfg.batch_size, train=True, device=device, seed=cfg.seed)
    scheduler = make_scheduler(cfg, precision.optimizer, len(train_loader))
    val_loader = CifarLoader(*splits.val, EVAL_BATCH_SIZE, train=False, device=device)
    test_loader = CifarLoader(*splits.test, EVAL_BATCH_SIZE, train=False, device=device)
    result = RunResult("completed", None, str(device), precision.amp_dtype, precision.half_compute, params,
                       notes=precision.notes)
    log(f"{cfg.model} ({params / 1e6:.2f}M params), mode {cfg.mode}: {precision.describe()}; "
        f"device {device} ({dev.device_name(device)}); {len(splits.train[1])} train / "
        f"{len(splits.val[1])} val / {len(splits.test[1])} test images")

    scaled = precision.loss_scale() is not None
    last_finite_loss = math.nan
    dev.reset_peak_memory(device)
    try:
        for epoch in range(cfg.epochs):
            lr = precision.optimizer.param_groups[0]["lr"]
            with dev.Timer(device) as t:
                stats = _train_epoch(precision, scheduler, model, train_loader, epoch, len(result.steps) + 1, cfg,
                                     scaled, last_finite_loss)
            last_finite_loss = stats.last_finite_loss
            result.steps += stats.steps
            result.train_time_s += t.seconds
            result.train_images += stats.images
            result.skipped_steps += stats.skipped_steps
            val_loss, val_acc, _ = evaluate(precision, model, val_loader)
            row = dict(epoch=epoch + 1, train_loss=stats.loss, train_acc=stats.accuracy, val_loss=val_loss,
                       val_acc=val_acc, lr=lr, epoch_time_s=t.seconds, loss_scale=precision.loss_scale(),
                       skipped_steps=stats.skipped_steps)
            result.epochs.append(row)
            log(f"epoch {epoch + 1}/{cfg.epochs}  train loss {stats.loss:.4f} acc {stats.accuracy:.4f}  "
                f"val loss {val_loss:.4f} acc {val_acc:.4f}  lr {lr:.4g}  {t.seconds:.1f}s "
                f"({stats.images / t.seconds:.0f} img/s)"
                + (f"  loss scale {row['loss_scale']:g}, {stats.skipped_steps} skipped" if scaled else ""))
            if on_epoch:
                on_epoch(result)
    except (Diverged, LossScaleCollapse) as e:
        result.status, result.error = "failed", str(e)
    result.peak_memory_bytes = dev.peak_memory_bytes(device)
    result.final_loss_scale = precision.loss_scale()
    if result.status == "completed":
        test_loss, test_acc, preds = evaluate(precision, model, test_loader)
        labels = splits.test[1].numpy()
        cm = confusion_matrix(labels, preds.numpy(), labels=list(range(len(splits.classes))))
        per_class = cm.diagonal() / np.maximum(cm.sum(axis=1), 1)
        result.test = dict(accuracy=test_acc, loss=test_loss, confusion_matrix=cm.tolist(),
                           per_class_accuracy={c: float(a) for c, a in zip(splits.classes, per_class)})
    return result
