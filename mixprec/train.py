"""The training loop shared by all modes: seeding, epochs, evaluation, timing. No file I/O.

``train(cfg, splits)`` returns a :class:`RunResult`. ``on_epoch`` hands the caller the results so far
and a checkpoint to save after every epoch (and before the first, and on interruption); ``resume``
continues from such a checkpoint, and ``stop`` ends the run after the step in progress.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix
from tqdm.auto import tqdm

from . import device as dev
from . import distributed
from .cli import UsageError
from .config import RunConfig
from .data import CifarLoader, Splits
from .fp8 import COLUMNS as FP8_COLUMNS
from .memory import SavedTensorBytes, breakdown
from .models import build_model, count_macs, count_params
from .scaler import LossScaleCollapse
from .steps import Precision, setup_precision

SYNC_EVERY = 20  # steps between progress updates; each costs a host sync in baseline mode
WARMUP_STEPS = 20  # the first epoch's first steps (allocator, autotuning, compilation): not in images_per_s
EVAL_BATCH_SIZE = 500
LR_WARMUP_START = 0.1  # --warmup-epochs ramps the lr from lr * this to lr


class Diverged(Exception):
    """The training loss became inf/NaN with no loss scaler to absorb it."""


class Interrupted(Exception):
    """A stop was requested (SIGINT/SIGTERM). ``partial`` holds the interrupted epoch's progress."""

    def __init__(self, message: str, partial: dict | None = None):
        super().__init__(message)
        self.partial = partial


@dataclass
class RunResult:
    """Everything a run measured; ``results``/``run`` turn it into files."""

    status: str  # "completed", "failed" or "interrupted"
    error: str | None
    device: str
    amp_dtype: str | None
    half_compute: str | None
    params: int
    macs: int | None = None  # multiply-accumulates of one forward pass of one image (FlopCounterMode)
    notes: list[str] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    train_time_s: float = 0.0
    train_images: int = 0
    warmup_time_s: float = 0.0  # of train_time_s, spent in the first epoch's first WARMUP_STEPS steps
    warmup_images: int = 0
    skipped_steps: int = 0
    final_loss_scale: float | None = None
    peak_memory_bytes: int = 0
    memory: dict | None = None  # bytes by role on one real training step (memory.breakdown)
    tf32: bool = False  # whether FP32 convolutions ran as TF32 (CUDA, Ampere or newer)
    fp8: dict | None = None  # the FP8 formats and scaling recipe (Fp8Training.describe), for float8 runs
    world_size: int = 1  # processes training together (torchrun); time and memory are rank 0's
    test: dict | None = None  # accuracy, loss, per_class_accuracy, confusion_matrix


def check_world(cfg: RunConfig, world: int) -> None:
    """The options that depend on how many processes train together (torchrun's world size)."""
    if cfg.batch_size % (world * cfg.accumulate):
        raise UsageError(f"--batch-size {cfg.batch_size} does not split into {world} processes x --accumulate "
                         f"{cfg.accumulate} equal micro-batches; use a multiple of {world * cfg.accumulate}")
    if cfg.inject_overflow_rank is not None and cfg.inject_overflow_rank >= world:
        raise UsageError(f"--inject-overflow-rank {cfg.inject_overflow_rank}: there are only {world} process(es), "
                         f"ranks 0 to {world - 1}; start more with torchrun")


def _quiet(msg: str) -> None:
    """The log of ranks other than 0: rank 0 speaks for all."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def make_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Stepped after every optimizer step that was taken, never after a skipped one (as Megatron and
    fairseq do, and GradScaler users cannot), with lengths given in epochs. ``step``: halve every 20
    epochs (Oreč 2021). ``cosine``: anneal to 0 over the run, after ``--warmup-epochs`` of linear warm-up
    from ``lr * LR_WARMUP_START`` if given. ``cosine-restarts``: SGDR restarting after 10, then 20, 40... epochs."""
    sched = torch.optim.lr_scheduler
    if cfg.schedule == "step":
        return sched.StepLR(optimizer, step_size=20 * steps_per_epoch, gamma=0.5)
    if cfg.schedule == "cosine" and cfg.warmup_epochs:
        total = cfg.epochs * steps_per_epoch
        warmup = min(max(1, round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
        return sched.SequentialLR(optimizer, [
            sched.LinearLR(optimizer, start_factor=LR_WARMUP_START, total_iters=warmup),
            sched.CosineAnnealingLR(optimizer, T_max=total - warmup)], milestones=[warmup])
    if cfg.schedule == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps_per_epoch)
    return sched.CosineAnnealingWarmRestarts(optimizer, T_0=10 * steps_per_epoch, T_mult=2)


@torch.no_grad()
def evaluate(precision: Precision, model: torch.nn.Module, loader: CifarLoader, labels: torch.Tensor,
             flip: bool = False):
    """Mean loss, accuracy, and the predictions of the split whose ``labels`` are given, using the mode's
    own forward precision. ``flip``: the logits are the mean of each image's and its mirror image's
    (test-time augmentation). Under DDP ``loader`` holds this rank's shard, and the results are gathered."""
    model.eval()
    distributed.broadcast_buffers(model)  # every rank evaluates rank 0's BatchNorm statistics
    device = loader.labels.device
    loss_sum = torch.zeros((), device=device)
    preds = [torch.empty(0, dtype=torch.int64, device=device)]
    for images, y in loader:
        logits = precision.forward(images).float()
        if flip:
            logits = (logits + precision.forward(images.flip(3)).float()) / 2
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        preds.append(logits.argmax(1))
    preds = distributed.gather_rows(torch.cat(preds), len(labels)).cpu()
    loss_sum = distributed.sum_(loss_sum)
    return loss_sum.item() / len(labels), (preds == labels).float().mean().item(), preds


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` averaged over the ranks (each rank's losses are the means over its equal share of the batch)."""
    return distributed.sum_(t.clone()) / distributed.world_size() if distributed.world_size() > 1 else t


def _stop_requested(stop, i: int, n: int) -> bool:
    """Whether to stop after step ``i``: at once for one process; under DDP every rank decides together, at
    the progress updates (a collective), so that no rank waits in an all-reduce the others left."""
    if stop is None:
        return False
    if distributed.world_size() == 1:
        return stop.is_set()
    return ((i + 1) % SYNC_EVERY == 0 or i + 1 == n) and distributed.any_rank(stop.is_set())


@dataclass
class EpochStats:
    loss: float  # mean over steps with a finite loss
    accuracy: float
    skipped_steps: int
    images: int
    last_finite_loss: float
    steps: list[dict]  # one row per optimizer step, for steps.csv
    seconds_before: float  # training time this epoch had before an interruption (0 if none)
    warmup_seconds: float  # time of the first epoch's first WARMUP_STEPS steps (0 in later epochs)
    warmup_images: int
    memory: dict  # bytes by role, measured on this process's first step


def _train_epoch(precision: Precision, scheduler, model, loader: CifarLoader, epoch: int, first_step: int,
                 cfg: RunConfig, scaled: bool, last_finite_loss: float, stop, partial: dict | None,
                 memory: dict | None) -> EpochStats:
    """One pass over ``loader``; ``partial`` continues an epoch that an interruption cut short.
    Without a ``memory`` breakdown yet, the first step measures one."""
    model.train()
    n = len(loader)
    device = loader.labels.device
    if partial is None:
        losses = torch.full((n,), math.nan, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        lrs, scales, skips, grad_stats, begin, seconds_before, warmup_seconds = [], [], [], {}, 0, 0.0, 0.0
        fp8_stats = {}
    else:
        # saved with the losses averaged over the ranks and the correct count summed: rank 0 carries the count
        losses, correct = partial["losses"].to(device), partial["correct"].to(device) * distributed.is_main()
        lrs, scales, skips = partial["lrs"], partial["scales"], partial["skips"]
        grad_stats = {int(k): v.to(device) for k, v in partial["grad_stats"].items()}
        fp8_stats = {int(k): v.to(device) for k, v in partial.get("fp8_stats", {}).items()}
        begin, seconds_before, last_finite_loss = partial["steps_done"], partial["seconds"], partial["last_finite_loss"]
        warmup_seconds = partial.get("warmup_seconds", 0.0)
    warmup_steps = min(WARMUP_STEPS, n) if epoch == 0 else 0
    loader.set_epoch(epoch, start_batch=begin)
    start = time.perf_counter()
    bar = tqdm(loader, total=n, initial=begin, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
               file=sys.stderr, dynamic_ncols=True, disable=None if distributed.is_main() else True)
    for i, (images, labels) in enumerate(bar, start=begin):
        lrs.append(precision.optimizer.param_groups[0]["lr"])
        with SavedTensorBytes() if memory is None else nullcontext() as saved:
            out = precision.step(images, labels)
        if memory is None:
            memory = breakdown(model, precision.master, precision.optimizer, saved.bytes)
        if not out.skipped:
            scheduler.step()
        losses[i] = out.loss
        correct += (out.logits.argmax(1) == labels).sum()
        scales.append(precision.loss_scale())
        skips.append(out.skipped)
        if (stats := precision.pop_stats()) is not None:
            grad_stats[i] = stats  # stays on the device: read once, at the end of the epoch
        if (stats := precision.pop_fp8_stats()) is not None:
            fp8_stats[i] = stats  # likewise
        if i + 1 == warmup_steps:
            dev.synchronize(device)
            warmup_seconds = seconds_before + time.perf_counter() - start
        if _stop_requested(stop, i, n):  # the step is finished: save the epoch so far
            dev.synchronize(device)
            partial = {"steps_done": i + 1, "losses": _mean_over_ranks(losses).cpu(),
                       "correct": distributed.sum_(correct.clone()).cpu(), "lrs": lrs,
                       "scales": scales, "skips": skips, "grad_stats": {k: v.cpu() for k, v in grad_stats.items()},
                       "fp8_stats": {k: v.cpu() for k, v in fp8_stats.items()},
                       "warmup_seconds": warmup_seconds, "seconds": seconds_before + time.perf_counter() - start,
                       "last_finite_loss": last_finite_loss}
            raise Interrupted(f"interrupted at epoch {epoch + 1}, step {i + 1} of {n}", partial)
        if (i + 1) % SYNC_EVERY == 0 or i + 1 == n:
            seen = _mean_over_ranks(losses[: i + 1])  # every rank decides on the same numbers
            finite = torch.isfinite(seen).cpu()  # host sync: progress and the divergence check
            if scaled:
                distributed.check_same(precision.loss_scale(), "the loss scale")
            if not scaled and not finite.all():
                first = int((~finite).nonzero()[0])
                if first > 0:
                    last_finite_loss = float(seen[first - 1])
                raise Diverged(f"training loss became {float(seen[first])} at epoch {epoch + 1}, step {first + 1} "
                               f"(last finite loss {last_finite_loss:.4g}); lower --lr")
            if finite.any():
                last_finite_loss = float(seen[finite.nonzero()[-1]])
            bar.set_postfix(loss=f"{last_finite_loss:.3f}",
                            img_s=f"{(i + 1 - begin) * loader.batch_size / (time.perf_counter() - start):.0f}")
    losses, correct = _mean_over_ranks(losses), distributed.sum_(correct)
    finite = torch.isfinite(losses)
    mean_loss = float(losses[finite].mean()) if bool(finite.any()) else math.nan
    images = n * loader.batch_size
    measured = dict(zip(grad_stats, torch.stack(list(grad_stats.values())).tolist())) if grad_stats else {}
    fp8_measured = dict(zip(fp8_stats, torch.stack(list(fp8_stats.values())).tolist())) if fp8_stats else {}
    rows = []
    for i, (loss, lr, scale, skipped) in enumerate(zip(losses.tolist(), lrs, scales, skips)):
        largest, zeros, underflow, elements = measured.get(i, (math.nan,) * 3 + (1.0,))
        rows.append(dict(step=first_step + i, epoch=epoch + 1, loss=loss, lr=lr, loss_scale=scale, skipped=skipped,
                         grad_max_abs=largest, grad_zero_frac=zeros / elements,
                         grad_underflow_frac=underflow / elements,
                         **dict(zip(FP8_COLUMNS, fp8_measured.get(i, (math.nan,) * len(FP8_COLUMNS))))))
    return EpochStats(mean_loss, int(correct) / images, sum(skips), images, last_finite_loss, rows, seconds_before,
                      warmup_seconds, warmup_steps * loader.batch_size, memory)


def _numpy_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
            "cached_gaussian": cached}


def _set_numpy_state(state: dict) -> None:
    np.random.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached_gaussian"]))


def train(cfg: RunConfig, splits: Splits, *, on_epoch: Callable[[RunResult, dict, bool], None] | None = None,
          log: Callable[[str], None] = print, resume: dict | None = None, stop=None) -> RunResult:
    """Train ``cfg.model`` in ``cfg.mode`` on ``splits`` and evaluate it on the test split.

    With the same seed, every mode starts from the same FP32 weights and sees the same batches.

    ``on_epoch(result, checkpoint, improved)`` is called before the first epoch and after every epoch
    with the state to save (``checkpoint``: everything :func:`train` needs to go on, for ``resume``)
    and whether the validation accuracy improved. ``stop`` (a ``threading.Event``) ends the run as
    ``interrupted`` after the current step."""
    device = distributed.init(dev.resolve_device(cfg.device))  # this rank's, under torchrun
    world = distributed.world_size()
    check_world(cfg, world)
    if not distributed.is_main():
        log = _quiet
    tf32 = dev.configure(device, cfg.deterministic, cfg.tf32)
    seed_everything(cfg.seed)
    # the one place that decides the memory format: the model's weights here, the batches in the loaders
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    # a resumed run's weights come from its checkpoint: no need for ImageNet's (or the network)
    model = build_model(cfg.model, num_classes=len(splits.classes), pretrained=cfg.pretrained and resume is None)
    model = model.to(device, memory_format=memory_format)
    params = count_params(model)
    macs = count_macs(model, image_size=splits.train[0].shape[-1])  # on a meta copy of the FP32 model
    precision = setup_precision(cfg, model, device)
    train_loader = CifarLoader(*splits.train, cfg.batch_size, train=True, device=device, seed=cfg.seed,
                               memory_format=memory_format, rank=distributed.rank(), world_size=world)
    # evaluation: each rank its contiguous shard of the split, gathered in evaluate()
    val_loader, test_loader = (
        CifarLoader(images[distributed.shard(len(labels))], labels[distributed.shard(len(labels))], EVAL_BATCH_SIZE,
                    train=False, device=device, memory_format=memory_format)
        for images, labels in (splits.val, splits.test))
    scheduler = make_scheduler(cfg, precision.optimizer, len(train_loader))
    result = RunResult("completed", None, str(device), precision.amp_dtype, precision.half_compute, params, macs,
                       notes=precision.notes, tf32=tf32, world_size=world,
                       fp8=precision.fp8.describe() if precision.fp8 is not None else None)
    scaled = precision.loss_scale() is not None
    start_epoch, best_val_acc, last_finite_loss = 0, -1.0, math.nan
    if resume is not None:
        model.load_state_dict(resume["model"])
        if resume["master"] is not None:
            precision.master.load_state_dict(resume["master"])
        precision.optimizer.load_state_dict(resume["optimizer"])
        if resume["scaler"] is not None:
            precision.scaler.load_state_dict(resume["scaler"])
        if resume.get("fp8") is not None:
            precision.fp8.load_state_dict(resume["fp8"])
        scheduler.load_state_dict(resume["scheduler"])
        dev.set_rng_states(device, resume["rng"])
        _set_numpy_state(resume["numpy_rng"])
        random.setstate(resume["python_rng"])
        progress = resume["progress"]
        for key in ("epochs", "steps", "train_time_s", "train_images", "warmup_time_s", "warmup_images",
                    "skipped_steps"):
            setattr(result, key, progress.get(key, 0))
        start_epoch, best_val_acc, last_finite_loss = resume["epoch"], progress["best_val_acc"], \
            progress["last_finite_loss"]
        # the loader's position is (epoch, batch): epoch e's order and augmentation come from seed + e

    def checkpoint(epochs_done: int, partial_epoch: dict | None = None) -> dict:
        return {
            "epoch": epochs_done,
            "partial_epoch": partial_epoch,  # the next epoch's progress when an interruption cut it short
            "model": model.state_dict(),
            "master": precision.master.state_dict() if precision.master and precision.master.enabled else None,
            "optimizer": precision.optimizer.state_dict(),
            "scaler": precision.scaler.state_dict() if precision.scaler is not None else None,
            "fp8": precision.fp8.state_dict() if precision.fp8 is not None else None,  # amax histories, scales
            "scheduler": scheduler.state_dict(),
            "rng": dev.rng_states(device), "numpy_rng": _numpy_state(), "python_rng": random.getstate(),
            "progress": {"epochs": result.epochs, "steps": result.steps, "train_time_s": result.train_time_s,
                         "train_images": result.train_images, "warmup_time_s": result.warmup_time_s,
                         "warmup_images": result.warmup_images, "skipped_steps": result.skipped_steps,
                         "best_val_acc": best_val_acc, "last_finite_loss": last_finite_loss},
        }

    log(f"{cfg.model} ({params / 1e6:.2f}M params, {macs / 1e9:.3f} GMAC per image"
        + (", ImageNet weights" if cfg.pretrained else "") + (", channels_last" if cfg.channels_last else "")
        + f"), mode {cfg.mode}: {precision.description}; "
        f"device {device} ({dev.device_name(device)})"
        + (f" x {world} processes ({cfg.batch_size // world} images each per step)" if world > 1 else "")
        + f"; {len(splits.train[1])} train / "
        f"{len(splits.val[1])} val / {len(splits.test[1])} test images"
        + (f"; resuming after epoch {start_epoch}" if resume is not None else ""))
    if on_epoch and resume is None:
        on_epoch(result, checkpoint(0), False)  # so that an interruption in epoch 1 has a checkpoint too

    dev.reset_peak_memory(device)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if stop is not None and distributed.any_rank(stop.is_set()):
                raise Interrupted(f"interrupted before epoch {epoch + 1}; --resume continues there")
            partial = resume.get("partial_epoch") if resume is not None and epoch == start_epoch else None
            with dev.Timer(device) as t:
                stats = _train_epoch(precision, scheduler, model, train_loader, epoch, len(result.steps) + 1, cfg,
                                     scaled, last_finite_loss, stop, partial, result.memory)
            result.memory = stats.memory
            seconds = stats.seconds_before + t.seconds
            last_finite_loss = stats.last_finite_loss
            result.steps += stats.steps
            result.train_time_s += seconds
            result.train_images += stats.images
            result.warmup_time_s += stats.warmup_seconds
            result.warmup_images += stats.warmup_images
            result.skipped_steps += stats.skipped_steps
            val_loss, val_acc, _ = evaluate(precision, model, val_loader, splits.val[1], cfg.test_time_flip)
            lr = stats.steps[0]["lr"]  # at the epoch's first step, also when it was resumed part-way
            row = dict(epoch=epoch + 1, train_loss=stats.loss, train_acc=stats.accuracy, val_loss=val_loss,
                       val_acc=val_acc, lr=lr, epoch_time_s=seconds, loss_scale=precision.loss_scale(),
                       skipped_steps=stats.skipped_steps)
            result.epochs.append(row)
            log(f"epoch {epoch + 1}/{cfg.epochs}  train loss {stats.loss:.4f} acc {stats.accuracy:.4f}  "
                f"val loss {val_loss:.4f} acc {val_acc:.4f}  lr {lr:.4g}  {seconds:.1f}s "
                f"({stats.images / seconds:.0f} img/s)"
                + (f"  loss scale {row['loss_scale']:g}, {stats.skipped_steps} skipped" if scaled else ""))
            improved = val_acc > best_val_acc
            best_val_acc = max(best_val_acc, val_acc)
            if on_epoch:
                on_epoch(result, checkpoint(epoch + 1), improved)
        if stop is not None and distributed.any_rank(stop.is_set()):
            raise Interrupted("interrupted before the test evaluation; --resume runs it")
    except (Diverged, LossScaleCollapse) as e:
        result.status, result.error = "failed", str(e)
    except Interrupted as e:
        result.status, result.error = "interrupted", str(e)
        if on_epoch and e.partial is not None:  # the model has moved on since the epoch's start: save it
            on_epoch(result, checkpoint(epoch, e.partial), False)
    result.peak_memory_bytes = dev.peak_memory_bytes(device)
    result.final_loss_scale = precision.loss_scale()
    if result.status == "completed":
        test_loss, test_acc, preds = evaluate(precision, model, test_loader, splits.test[1], cfg.test_time_flip)
        labels = splits.test[1].numpy()
        cm = confusion_matrix(labels, preds.numpy(), labels=list(range(len(splits.classes))))
        per_class = cm.diagonal() / np.maximum(cm.sum(axis=1), 1)
        result.test = dict(accuracy=test_acc, loss=test_loss, confusion_matrix=cm.tolist(),
                           per_class_accuracy={c: float(a) for c, a in zip(splits.classes, per_class)})
    return result
