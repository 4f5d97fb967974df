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

from . import checkpoint
from . import device as dev
from . import distributed, telemetry
from .cli import UsageError
from .config import RunConfig
from .data import CifarLoader, Splits
from .memory import SavedTensorBytes, breakdown
from .models import build_model, count_macs, count_params
from .scaler import LossScaleCollapse
from .steps import Precision, setup_precision

SYNC_EVERY = 20  # steps between progress updates; each costs a host sync in baseline mode
WARMUP_STEPS = 20  # at most this many of the first epoch's first steps (allocator, autotuning, compilation) are
# left out of images_per_s; warmup_steps_for() scales it down for short runs
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
    tables: dict[str, list[dict]] = field(default_factory=dict)  # telemetry tables (<table>.csv): {table: rows}
    train_time_s: float = 0.0
    train_images: int = 0
    warmup_time_s: float = 0.0  # of train_time_s, spent in the first epoch's first warmup_steps steps
    warmup_images: int = 0
    warmup_steps: int = 0  # the first epoch's steps left out of images_per_s (warmup_steps_for)
    skipped_steps: int = 0
    final_loss_scale: float | None = None
    peak_memory_bytes: int = 0
    memory: dict | None = None  # bytes by role on one real training step (memory.breakdown)
    tf32: bool = False  # whether FP32 convolutions ran as TF32 (CUDA, Ampere or newer)
    fp8: dict | None = None  # the FP8 formats and scaling recipe (Fp8Training.describe), for --fp8 runs
    loss_scaler: str | None = None  # GradScaler, or manual mode's dynamic, static or none; None without one
    world_size: int = 1  # processes training together (torchrun); time and memory are rank 0's
    test: dict | None = None  # accuracy, loss, per_class_accuracy, confusion_matrix


def warmup_steps_for(steps: int) -> int:
    """How many of the first epoch's ``steps`` steps are warm-up, left out of ``images_per_s``: WARMUP_STEPS,
    but at most a fifth of the epoch, and at least 1 when the epoch has 2 steps or more, so that every run
    keeps timed steps after it (a 15-step run leaves out 3; a 1-step run none).

    >>> [warmup_steps_for(n) for n in (1, 2, 9, 15, 100, 391)]
    [0, 1, 1, 3, 20, 20]
    """
    return 0 if steps < 2 else max(1, min(WARMUP_STEPS, steps // 5))


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
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module, loader: CifarLoader,
             labels: torch.Tensor, flip: bool = False):
    """Mean loss, accuracy, and the predictions of the split whose ``labels`` are given, through ``forward``, the
    mode's own forward precision (a :class:`~mixprec.steps.Precision`'s, or :func:`mixprec.steps.setup_inference`'s)
    of ``model``. ``flip``: the logits are the mean of each image's and its mirror image's (test-time
    augmentation). Under DDP ``loader`` holds this rank's shard, and the results are gathered."""
    model.eval()
    distributed.broadcast_buffers(model)  # every rank evaluates rank 0's BatchNorm statistics
    device = loader.labels.device
    loss_sum = torch.zeros((), device=device)
    preds = [torch.empty(0, dtype=torch.int64, device=device)]
    for images, y in tqdm(loader, desc="evaluating", unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True,
                          disable=None if distributed.is_main() else True):
        logits = forward(images).float()
        if flip:
            logits = (logits + forward(images.flip(3)).float()) / 2
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        preds.append(logits.argmax(1))
    preds = distributed.gather_rows(torch.cat(preds), len(labels)).cpu()
    loss_sum = distributed.sum_(loss_sum)
    return loss_sum.item() / len(labels), (preds == labels).float().mean().item(), preds


def scores(loss: float, accuracy: float, preds: torch.Tensor, labels: torch.Tensor, classes) -> dict:
    """What :func:`evaluate` found on a split, as ``summary.json`` records the test split's: ``accuracy``,
    ``loss``, the ``confusion_matrix`` (rows: true class), ``per_class_accuracy`` ({class: accuracy}) and every
    image's ``predictions`` (the run writes them as ``test_predictions.csv``)."""
    cm = confusion_matrix(labels.numpy(), preds.numpy(), labels=list(range(len(classes))))
    per_class = cm.diagonal() / np.maximum(cm.sum(axis=1), 1)
    return dict(accuracy=accuracy, loss=loss, confusion_matrix=cm.tolist(), predictions=preds.tolist(),
                per_class_accuracy={c: float(a) for c, a in zip(classes, per_class)})


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
class Loop:
    """What the epoch loop works on: the run's parts, set up once by :func:`train`, and its progress over the
    epochs. A checkpoint holds its state (:mod:`mixprec.checkpoint`)."""

    cfg: RunConfig
    model: torch.nn.Module
    precision: Precision
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: CifarLoader  # the training split (this rank's share of every batch)
    device: torch.device
    result: RunResult
    scaled: bool  # whether a loss scaler absorbs overflows (else an inf/NaN loss is divergence)
    stop: object = None  # a threading.Event: stop after the step in progress
    log: Callable[[str], None] = _quiet  # --log-every's progress lines go here
    best_val_acc: float = -1.0
    last_finite_loss: float = math.nan
    memory_settled: bool = False  # result.memory was measured on a step that was taken (not skipped)


@dataclass
class EpochProgress:
    """An epoch so far, one entry per step, kept on the device until the epoch ends. An interruption saves it
    (a checkpoint's ``partial_epoch``) and a resumed run goes on from it."""

    losses: torch.Tensor  # this rank's loss of each step (NaN where not yet taken)
    correct: torch.Tensor  # training predictions that were right
    lrs: list = field(default_factory=list)
    scales: list = field(default_factory=list)
    skips: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # step -> Precision.pop_stats() where it measured anything
    steps_done: int = 0
    seconds: float = 0.0  # training time before this stretch of the epoch (an interruption's)
    warmup_seconds: float = 0.0

    @classmethod
    def start(cls, steps: int, device: torch.device, partial: dict | None = None) -> EpochProgress:
        """A new epoch of ``steps`` steps, or the one that ``partial`` (:meth:`saved`) cut short."""
        if partial is None:
            return cls(torch.full((steps,), math.nan, device=device), torch.zeros((), dtype=torch.int64, device=device))
        # saved with the losses averaged over the ranks and the correct count summed: rank 0 carries the count
        return cls(partial["losses"].to(device), partial["correct"].to(device) * distributed.is_main(),
                   partial["lrs"], partial["scales"], partial["skips"], telemetry.restored(partial, device),
                   partial["steps_done"], partial["seconds"], partial.get("warmup_seconds", 0.0))

    def saved(self, steps_done: int, seconds: float, last_finite_loss: float) -> dict:
        """The checkpoint's ``partial_epoch``: the same over all ranks, on the CPU (a collective under DDP)."""
        return {"steps_done": steps_done, "losses": _mean_over_ranks(self.losses).cpu(),
                "correct": distributed.sum_(self.correct.clone()).cpu(), "lrs": self.lrs, "scales": self.scales,
                "skips": self.skips, "stats": telemetry.saved(self.stats),
                "warmup_seconds": self.warmup_seconds, "seconds": seconds, "last_finite_loss": last_finite_loss}

    def step_rows(self, losses: list[float], first_step: int, epoch: int,
                  precision: Precision) -> tuple[list[dict], dict[str, list[dict]]]:
        """``steps.csv``'s rows of the finished epoch, with the statistics columns that ``precision`` makes of
        what it measured (read off the device in one transfer: a host sync), and the rows of the tables of
        sources that write their own (``{table: rows}``, each row with its ``step``)."""
        measured = telemetry.to_host(self.stats)
        rows = [dict(step=first_step + i, epoch=epoch + 1, loss=loss, lr=lr, loss_scale=scale, skipped=skipped,
                     **precision.stats_row(measured.get(i, {})))
                for i, (loss, lr, scale, skipped) in enumerate(zip(losses, self.lrs, self.scales, self.skips))]
        tables: dict[str, list[dict]] = {}
        for i in sorted(measured):
            for table, table_rows in precision.table_rows(measured[i]).items():
                tables.setdefault(table, []).extend({"step": first_step + i, **row} for row in table_rows)
        return rows, tables


@dataclass
class EpochStats:
    loss: float  # mean over steps with a finite loss
    accuracy: float
    skipped_steps: int
    images: int
    steps: list[dict]  # one row per optimizer step, for steps.csv
    tables: dict[str, list[dict]]  # the rows of telemetry sources' own tables (<table>.csv), by table
    seconds_before: float  # training time this epoch had before an interruption (0 if none)
    warmup_seconds: float  # time of the first epoch's warm-up steps (0 in later epochs)
    warmup_images: int
    memory: dict | None  # bytes by role, measured on this process's first step that was not skipped


def _check_losses(loop: Loop, losses: torch.Tensor, epoch: int, last_finite_loss: float) -> float:
    """At a progress update: the last finite loss so far, or a :class:`Diverged` when an unscaled run's
    loss is inf/NaN. ``losses`` are the epoch's so far, the same on every rank."""
    finite = torch.isfinite(losses).cpu()  # host sync: progress and the divergence check
    if loop.scaled:
        distributed.check_same(loop.precision.loss_scale(), "the loss scale")
    if not loop.scaled and not finite.all():
        first = int((~finite).nonzero()[0])
        if first > 0:
            last_finite_loss = float(losses[first - 1])
        raise Diverged(f"training loss became {float(losses[first])} at epoch {epoch + 1}, step {first + 1} "
                       f"(last finite loss {last_finite_loss:.4g}); lower --lr")
    return float(losses[finite.nonzero()[-1]]) if finite.any() else last_finite_loss


def _log_progress(loop: Loop, p: EpochProgress, epoch: int, i: int, step: int, images: int, start: float) -> None:
    """``--log-every``'s line after the epoch's step ``i`` (the run's optimizer step ``step``): the mean finite
    loss of the last ``--log-every`` steps of this epoch (fewer at its start), the step's lr and loss scale, and
    the epoch's ``images`` per second since ``start``. Reading the losses is a host sync (a collective under DDP,
    where every rank logs at the same steps), on these steps only."""
    window = _mean_over_ranks(p.losses[max(0, i + 1 - loop.cfg.log_every): i + 1])
    finite = torch.isfinite(window)
    loss = float(window[finite].mean()) if bool(finite.any()) else math.nan  # host sync
    seconds = time.perf_counter() - start
    scale = p.scales[-1]
    loop.log(f"step {step} (epoch {epoch + 1}/{loop.cfg.epochs}, {i + 1}/{len(p.losses)})  loss {loss:.4f}  "
             f"lr {p.lrs[-1]:.4g}" + (f"  loss scale {scale:g}" if scale is not None else "")
             + (f"  {images / seconds:.0f} img/s" if seconds > 0 else ""))


def _train_epoch(loop: Loop, epoch: int, partial: dict | None) -> EpochStats:
    """One pass over the training split; ``partial`` continues an epoch that an interruption cut short.
    Until a step that was not skipped has measured a memory breakdown, every step measures one: a skipped
    step never reaches the optimizer, so its breakdown would show no optimizer state."""
    precision, loader, result = loop.precision, loop.loader, loop.result
    loop.model.train()
    n = len(loader)
    p = EpochProgress.start(n, loop.device, partial)
    last_finite_loss = loop.last_finite_loss if partial is None else partial["last_finite_loss"]
    begin, first_step, memory = p.steps_done, len(result.steps) + 1, result.memory
    warmup_steps = result.warmup_steps if epoch == 0 else 0
    loader.set_epoch(epoch, start_batch=begin)
    start = time.perf_counter()
    bar = tqdm(loader, total=n, initial=begin, desc=f"epoch {epoch + 1}/{loop.cfg.epochs}", unit="batch",
               leave=False, file=sys.stderr, dynamic_ncols=True, disable=None if distributed.is_main() else True)
    for i, (images, labels) in enumerate(bar, start=begin):
        p.lrs.append(precision.optimizer.param_groups[0]["lr"])
        measure_memory = not loop.memory_settled
        with SavedTensorBytes() if measure_memory else nullcontext() as saved:
            out = precision.step(images, labels)
        if measure_memory:
            memory = breakdown(loop.model, precision.master, precision.optimizer, saved.bytes)
            loop.memory_settled = not out.skipped
        if not out.skipped:
            loop.scheduler.step()
        p.losses[i] = out.loss
        p.correct += (out.logits.argmax(1) == labels).sum()
        p.scales.append(precision.loss_scale())
        p.skips.append(out.skipped)
        if stats := precision.pop_stats():
            p.stats[i] = stats  # stays on the device: read once, at the end of the epoch
        if i + 1 == warmup_steps:
            dev.synchronize(loop.device)
            p.warmup_seconds = p.seconds + time.perf_counter() - start
        if _stop_requested(loop.stop, i, n):  # the step is finished: save the epoch so far
            dev.synchronize(loop.device)
            so_far = p.saved(i + 1, p.seconds + time.perf_counter() - start, last_finite_loss)
            raise Interrupted(f"interrupted at epoch {epoch + 1}, step {i + 1} of {n}", so_far)
        if (i + 1) % SYNC_EVERY == 0 or i + 1 == n:  # every rank decides on the same numbers
            last_finite_loss = _check_losses(loop, _mean_over_ranks(p.losses[: i + 1]), epoch, last_finite_loss)
            bar.set_postfix(loss=f"{last_finite_loss:.3f}",
                            img_s=f"{(i + 1 - begin) * loader.batch_size / (time.perf_counter() - start):.0f}")
        if loop.cfg.log_every and (first_step + i) % loop.cfg.log_every == 0:
            _log_progress(loop, p, epoch, i, first_step + i, (i + 1 - begin) * loader.batch_size, start)
    losses, correct = _mean_over_ranks(p.losses), distributed.sum_(p.correct)
    finite = torch.isfinite(losses)
    mean_loss = float(losses[finite].mean()) if bool(finite.any()) else math.nan
    images = n * loader.batch_size
    loop.last_finite_loss = last_finite_loss
    return EpochStats(mean_loss, int(correct) / images, sum(p.skips), images,
                      *p.step_rows(losses.tolist(), first_step, epoch, precision), p.seconds, p.warmup_seconds,
                      warmup_steps * loader.batch_size, memory)


def setup_device(cfg: RunConfig) -> torch.device:
    """This process's device, in the torchrun group when there is one, with the options that depend on the
    group's size checked: once per run, before any data is read."""
    device = distributed.init(dev.resolve_device(cfg.device))  # this rank's, under torchrun
    check_world(cfg, distributed.world_size())
    return device


def _build(cfg: RunConfig, splits: Splits, device: torch.device, resume: dict | None, stop,
           log: Callable[[str], None]) -> tuple[Loop, list]:
    """The run's parts, seeded: the loop over the training split, and the validation and test loaders."""
    world = distributed.world_size()
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
                               pad=cfg.crop_padding, memory_format=memory_format, rank=distributed.rank(), world_size=world)
    # evaluation: each rank its contiguous shard of the split, gathered in evaluate()
    eval_loaders = [
        CifarLoader(images[distributed.shard(len(labels))], labels[distributed.shard(len(labels))], EVAL_BATCH_SIZE,
                    train=False, device=device, memory_format=memory_format)
        for images, labels in (splits.val, splits.test)]
    scheduler = make_scheduler(cfg, precision.optimizer, len(train_loader))
    result = RunResult("completed", None, str(device), precision.amp_dtype, precision.half_compute, params, macs,
                       notes=precision.notes, tf32=tf32, world_size=world,
                       fp8=precision.fp8.describe() if precision.fp8 is not None else None,
                       loss_scaler=precision.loss_scaler, warmup_steps=warmup_steps_for(len(train_loader)))
    loop = Loop(cfg, model, precision, scheduler, train_loader, device, result,
                scaled=precision.loss_scale() is not None, stop=stop, log=log)
    return loop, eval_loaders


def train(cfg: RunConfig, splits: Splits, *, on_epoch: Callable[[RunResult, dict, bool], None] | None = None,
          log: Callable[[str], None] = print, resume: dict | None = None, stop=None,
          device: torch.device | None = None) -> RunResult:
    """Train ``cfg.model`` in ``cfg.mode`` on ``splits`` and evaluate it on the test split.

    With the same seed, every mode starts from the same FP32 weights and sees the same batches.

    ``on_epoch(result, checkpoint, improved)`` is called before the first epoch and after every epoch
    with the state to save (``checkpoint``: everything :func:`train` needs to go on, for ``resume``)
    and whether the validation accuracy improved. ``stop`` (a ``threading.Event``) ends the run as
    ``interrupted`` after the current step. ``device`` is :func:`setup_device`'s, when the caller set it up."""
    device = setup_device(cfg) if device is None else device
    world = distributed.world_size()
    if not distributed.is_main():
        log = _quiet
    loop, (val_loader, test_loader) = _build(cfg, splits, device, resume, stop, log)
    result, precision, model = loop.result, loop.precision, loop.model
    # the loader's position is (epoch, batch): epoch e's order and augmentation come from seed + e
    start_epoch = checkpoint.restore(loop, resume) if resume is not None else 0

    log(f"{cfg.model} ({result.params / 1e6:.2f}M params, {result.macs / 1e9:.3f} GMAC per image"
        + (", ImageNet weights" if cfg.pretrained else "") + (", channels_last" if cfg.channels_last else "")
        + f"), mode {cfg.mode}: {precision.description}; "
        f"device {device} ({dev.device_name(device)})"
        + (f" x {world} processes ({cfg.batch_size // world} images each per step)" if world > 1 else "")
        + f"; {len(splits.train[1])} train / "
        f"{len(splits.val[1])} val / {len(splits.test[1])} test images"
        + (f"; resuming {checkpoint.position(resume, cfg.epochs)}" if resume is not None else ""))
    if on_epoch and resume is None:
        on_epoch(result, checkpoint.save(loop, 0), False)  # so that an interruption in epoch 1 has a checkpoint too

    dev.reset_peak_memory(device)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if stop is not None and distributed.any_rank(stop.is_set()):
                raise Interrupted(f"interrupted before epoch {epoch + 1}; --resume continues there")
            partial = resume.get("partial_epoch") if resume is not None and epoch == start_epoch else None
            with dev.Timer(device) as t:
                stats = _train_epoch(loop, epoch, partial)
            result.memory = stats.memory
            seconds = stats.seconds_before + t.seconds
            result.steps += stats.steps
            for table, rows in stats.tables.items():
                result.tables.setdefault(table, []).extend(rows)
            result.train_time_s += seconds
            result.train_images += stats.images
            result.warmup_time_s += stats.warmup_seconds
            result.warmup_images += stats.warmup_images
            result.skipped_steps += stats.skipped_steps
            val_loss, val_acc, _ = evaluate(precision.forward, model, val_loader, splits.val[1], cfg.test_time_flip)
            lr = stats.steps[0]["lr"]  # at the epoch's first step, also when it was resumed part-way
            row = dict(epoch=epoch + 1, train_loss=stats.loss, train_acc=stats.accuracy, val_loss=val_loss,
                       val_acc=val_acc, lr=lr, epoch_time_s=seconds, loss_scale=precision.loss_scale(),
                       skipped_steps=stats.skipped_steps)
            result.epochs.append(row)
            log(f"epoch {epoch + 1}/{cfg.epochs}  train loss {stats.loss:.4f} acc {stats.accuracy:.4f}  "
                f"val loss {val_loss:.4f} acc {val_acc:.4f}  lr {lr:.4g}  {seconds:.1f}s "
                f"({stats.images / seconds:.0f} img/s)"
                + (f"  loss scale {row['loss_scale']:g}, {stats.skipped_steps} skipped" if loop.scaled else ""))
            improved = val_acc > loop.best_val_acc
            loop.best_val_acc = max(loop.best_val_acc, val_acc)
            if on_epoch:
                on_epoch(result, checkpoint.save(loop, epoch + 1), improved)
        if stop is not None and distributed.any_rank(stop.is_set()):
            raise Interrupted("interrupted before the test evaluation; --resume runs it")
    except (Diverged, LossScaleCollapse) as e:
        result.status, result.error = "failed", str(e)
    except Interrupted as e:
        result.status, result.error = "interrupted", str(e)
        if on_epoch and e.partial is not None:  # the model has moved on since the epoch's start: save it
            on_epoch(result, checkpoint.save(loop, epoch, e.partial), False)
    result.peak_memory_bytes = dev.peak_memory_bytes(device)
    result.final_loss_scale = precision.loss_scale()
    if result.status == "completed":
        test = evaluate(precision.forward, model, test_loader, splits.test[1], cfg.test_time_flip)
        result.test = scores(*test, splits.test[1], splits.classes)
    return result
