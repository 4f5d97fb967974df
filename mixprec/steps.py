"""The three training steps under study, side by side, and the one-time set-up of each precision.

Precision is decided once, before the loop (as in nanoGPT): :func:`setup_precision` turns the
FP32 model into what a mode trains, builds the optimizer over the right parameters, and returns
a :class:`Precision` whose ``step`` is one of the three functions below with its state bound. The
training loop never asks which mode it runs.

Host syncs per step: baseline none; amp two (GradScaler's ``step`` reads found_inf, and the scale
is read after ``update`` to tell a skipped step); manual one (``bool(found_inf)``).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .cli import UsageError
from .config import RunConfig, loss_scaler_kind, warn_if_slow
from .fp8 import Fp8Recipe, Fp8Telemetry, Fp8Training
from .halfops import EmulatedAutocast, emulated_half_compute
from .layerstats import LayerGradientTelemetry
from .master import LostUpdateTelemetry, MasterWeights, half_with_fp32_norm_
from .scaler import DynamicLossScaler, GradientTelemetry
from .telemetry import Telemetry


class StepOut(NamedTuple):
    loss: torch.Tensor  # FP32 scalar, detached; inf/NaN on a step the scaler skipped
    logits: torch.Tensor  # detached, for the whole batch
    skipped: bool  # True if the optimizer step was skipped for an overflow


# Each step takes one batch (this rank's share of it under DDP), splits it into `accumulate`
# micro-batches whose gradients add up, and takes (at most) one optimizer step. `clip` clips the
# gradient norm of the true gradients; `label_smoothing` smooths the targets of the training loss.
# Under DistributedDataParallel the backward pass of the last micro-batch also averages the
# gradients over the ranks, in the model's own precision.


def micro_batches(model, images, labels, accumulate):
    """``(x, y)`` for each of ``accumulate`` micro-batches; under DDP all but the last run in ``no_sync``,
    so that the gradients are all-reduced once, after they have all been added up."""
    chunks = list(zip(images.chunk(accumulate), labels.chunk(accumulate)))
    no_sync = getattr(model, "no_sync", None)  # DistributedDataParallel's; a plain module has none
    for i, chunk in enumerate(chunks):
        with no_sync() if no_sync is not None and i < len(chunks) - 1 else nullcontext():
            yield chunk  # the caller's forward and backward run inside the context


def baseline_step(model, optimizer, images, labels, *, accumulate=1, clip=None, label_smoothing=0.0) -> StepOut:
    optimizer.zero_grad(set_to_none=True)
    logits, loss = [], 0.0
    for x, y in micro_batches(model, images, labels, accumulate):
        out = model(x)
        micro_loss = F.cross_entropy(out, y, label_smoothing=label_smoothing) / accumulate
        micro_loss.backward()
        logits.append(out.detach())
        loss += micro_loss.detach()
    if clip:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return StepOut(loss, torch.cat(logits), False)


def amp_step(model, optimizer, images, labels, *, autocast, scaler: torch.amp.GradScaler, accumulate=1,
             clip=None, label_smoothing=0.0) -> StepOut:
    optimizer.zero_grad(set_to_none=True)
    logits, loss = [], 0.0
    for x, y in micro_batches(model, images, labels, accumulate):
        with autocast:  # convs and linears in FP16 (tensor cores, or emulated on a CPU), cross_entropy in FP32
            out = model(x)
            micro_loss = F.cross_entropy(out, y, label_smoothing=label_smoothing) / accumulate
        scaler.scale(micro_loss).backward()
        logits.append(out.detach())
        loss += micro_loss.detach().float()
    if clip:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(optimizer)  # host sync: reads found_inf, skips optimizer.step() on overflow
    scale = scaler.get_scale()
    scaler.update()
    skipped = scaler.get_scale() < scale  # host sync: GradScaler tells a skip only by backing off
    return StepOut(loss, torch.cat(logits), skipped)


def manual_step(model, optimizer, images, labels, *, master: MasterWeights, scaler: DynamicLossScaler,
                half_compute: AbstractContextManager, dtype: torch.dtype, accumulate=1, clip=None,
                label_smoothing=0.0) -> StepOut:
    model.zero_grad(set_to_none=True)
    logits, loss = [], 0.0
    for x, y in micro_batches(model, images, labels, accumulate):
        with half_compute:  # native FP16 kernels, or tensor-core arithmetic emulated on a CPU (FP8 operands in float8)
            out = model(x.to(dtype))
        micro_loss = F.cross_entropy(out.float(), y, label_smoothing=label_smoothing) / accumulate  # softmax in FP32
        scaler.scale(micro_loss).backward()  # FP16 grads of loss * scale: small ones lifted out of underflow
        logits.append(out.detach().float())
        loss += micro_loss.detach()
    found_inf = scaler.unscale_(master.model_params, master.params)  # into FP32 master grads, / scale
    distributed.any_overflow_(found_inf)  # under DDP: one rank's overflow skips the step on every rank
    skipped = bool(found_inf)  # host sync: the one per step
    if not skipped:
        if clip:
            nn.utils.clip_grad_norm_(master.params, clip)  # the unscaled master gradients
        with master.stepping(optimizer, scaler.telemetry_due()):  # after: into the model, as --master-weights says
            optimizer.step()  # on the FP32 master weights (or working copies; the half weights with none)
    scaler.update(skipped)
    return StepOut(loss, torch.cat(logits), skipped)


class OverflowInjector:
    """Wraps a loss scaler so that the scaled loss is inf at the given optimizer steps (1-based).

    Fault injection for ``--inject-overflow``: the backward pass then yields inf/NaN gradients,
    exactly as a real overflow does, and the step under study has to skip. Steps are counted by
    the wrapped scaler's ``update`` calls, so accumulated micro-batches share their step's fate."""

    def __init__(self, scaler, steps: tuple[int, ...]):
        self._scaler = scaler
        self._steps = set(steps)
        self._step = 1

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        scaled = self._scaler.scale(loss)
        return scaled * math.inf if self._step in self._steps else scaled

    def update(self, *args, **kwargs):
        self._scaler.update(*args, **kwargs)
        self._step += 1

    def __getattr__(self, name):
        return getattr(self._scaler, name)


# Every run's steps.csv has these sources' columns, in this order, NaN where its mode measures none, so
# that the runs of every mode share one table. A source a Precision adds beyond them appends its own.
TELEMETRY = (GradientTelemetry, Fp8Telemetry, LostUpdateTelemetry)


@dataclass
class Precision:
    """A mode, ready to train: ``step(images, labels)``, ``forward(images)`` for evaluation, the
    optimizer, and what was resolved (recorded in the summary).

    ``telemetry`` lists the sources of the per-step statistics this mode measures (see
    :mod:`mixprec.telemetry`); the training loop reaches them only through :meth:`pop_stats` and
    :meth:`stats_row`, so a new statistic is a source appended here, where the mode is set up."""

    step: Callable[[torch.Tensor, torch.Tensor], StepOut]
    forward: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    loss_scale: Callable[[], float | None]
    amp_dtype: str | None = None
    half_compute: str | None = None
    master: MasterWeights | None = None
    scaler: DynamicLossScaler | torch.amp.GradScaler | None = None
    notes: list[str] = field(default_factory=list)  # caveats recorded in the summary
    description: str = "FP32"  # for the run's first log line
    fp8: Fp8Training | None = None  # manual mode with --fp8
    loss_scaler: str | None = None  # which ran: GradScaler, dynamic, static, none (manual's), or None (no scaler)
    telemetry: list[Telemetry] = field(default_factory=list)  # in steps.csv's order, after TELEMETRY's

    def pop_stats(self) -> dict[str, torch.Tensor]:
        """What the sources measured at the last step, ``{source key: device tensor}``; empty on a step
        that measured nothing. Nothing waits for the device: the loop keeps the tensors there until the
        epoch ends, and reads them all at once (:func:`mixprec.telemetry.to_host`)."""
        return {source.key: stats for source in self.telemetry if (stats := source.pop()) is not None}

    def stats_row(self, measured: dict[str, list[float]]) -> dict[str, float]:
        """``steps.csv``'s statistics columns of one step, from the host values of what :meth:`pop_stats`
        gave then: every column of :data:`TELEMETRY` and of this mode's sources, NaN where nothing was measured."""
        row = {}
        for source in (*TELEMETRY, *self.telemetry):
            row.update(source.unmeasured())
        for source in self.telemetry:
            if source.key in measured and source.table is None:
                row.update(source.to_row(measured[source.key]))
        return row

    def table_rows(self, measured: dict[str, list[float]]) -> dict[str, list[dict]]:
        """``{table: rows}`` of one step, from the sources that write a table of their own (none measured: {})."""
        return {source.table: source.to_rows(measured[source.key]) for source in self.telemetry
                if source.table is not None and source.key in measured}


def _with_injection(scaler, cfg: RunConfig):
    """``scaler``, wrapped to overflow at ``--inject-overflow``'s steps on every rank, or on
    ``--inject-overflow-rank`` only; ``scaler`` itself when nothing is injected here."""
    here = cfg.inject_overflow_rank is None or cfg.inject_overflow_rank == distributed.rank()
    return OverflowInjector(scaler, cfg.inject_overflow) if cfg.inject_overflow and here else scaler


def _sgd(params, cfg: RunConfig) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov)


def resolve_amp_dtype(name: str) -> torch.dtype:
    """``auto`` is float16 on every device: autocast plus GradScaler, PyTorch's FP16 recipe and the reference
    manual mode is compared with (on a CPU with emulated tensor-core arithmetic, see :func:`amp_context`)."""
    return torch.float16 if name == "auto" else getattr(torch, name)


def resolve_half_compute(name: str, device: torch.device) -> str:
    """``auto`` is native on CUDA (tensor cores) and emulated elsewhere (no fast half-precision units)."""
    if name == "auto":
        return "native" if device.type == "cuda" else "emulated"
    return name


def half_compute_context(how: str) -> AbstractContextManager:
    """The context manual mode's forward and backward run in: ``emulated`` tensor-core arithmetic or ``native``."""
    return emulated_half_compute() if how == "emulated" else nullcontext()


def amp_context(device: torch.device, dtype: torch.dtype, how: str) -> AbstractContextManager:
    """amp mode's forward context: ``torch.autocast``, with its convolutions, linears and matmuls computed as
    emulated tensor-core arithmetic (the same layer as manual mode's) when ``how`` is ``emulated``."""
    if how == "emulated":
        return EmulatedAutocast(device.type, dtype)
    return torch.autocast(device.type, dtype=dtype)


def eval_forward(net: nn.Module, context: AbstractContextManager,
                 dtype: torch.dtype | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``forward(images)``: FP32 logits of ``net`` run under ``context`` (autocast, or the half compute), with
    the images cast to ``dtype`` first if given (manual mode's half model). Evaluation and bench_infer use it."""
    def forward(images: torch.Tensor) -> torch.Tensor:
        with context:
            return net(images if dtype is None else images.to(dtype)).float()

    return forward


def make_loss_scaler(cfg: RunConfig) -> DynamicLossScaler:
    """The manual mode's scaler for ``--loss-scale`` dynamic / none / a static number."""
    if cfg.loss_scale == "dynamic":
        return DynamicLossScaler(on_min_scale=cfg.on_min_scale, telemetry_every=cfg.telemetry_every)
    static = 1.0 if cfg.loss_scale == "none" else float(cfg.loss_scale)
    return DynamicLossScaler(init_scale=static, dynamic=False, telemetry_every=cfg.telemetry_every)


def setup_fp8(cfg: RunConfig, model: nn.Module, device: torch.device, scaler: DynamicLossScaler) -> Fp8Training:
    """The FP8 layers of the (already FP16) ``model`` for ``--fp8``; they measure their telemetry at the
    steps the loss scaler measures the gradients'."""
    recipe = Fp8Recipe(cfg.fp8, cfg.fp8_amax_history, cfg.fp8_margin, cfg.fp8_all_layers)
    try:
        return Fp8Training(model, recipe, device, measuring=scaler.telemetry_due)
    except ValueError as e:
        raise UsageError(f"--fp8 with {cfg.model}: {e}") from None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# Each mode's forward pass, as resolved for the device: shared by its training set-up and its inference.

def _autocast(cfg: RunConfig, device: torch.device) -> tuple[AbstractContextManager, torch.dtype, str]:
    """amp mode's forward context, its dtype, and how its half arithmetic runs."""
    dtype = resolve_amp_dtype(cfg.amp_dtype)
    how = resolve_half_compute(cfg.half_compute, device)
    return amp_context(device, dtype, how), dtype, how


def _half(cfg: RunConfig, device: torch.device) -> tuple[torch.dtype, str]:
    """manual mode's half dtype (the model's) and how its arithmetic runs (FP8 computes, emulated, on FP16)."""
    if cfg.fp8 != "off":
        return torch.float16, "emulated"
    return getattr(torch, cfg.manual_dtype), resolve_half_compute(cfg.half_compute, device)


def _baseline(cfg: RunConfig, model: nn.Module, net: nn.Module, device: torch.device, options: dict) -> Precision:
    opt = _sgd(model.parameters(), cfg)
    return Precision(step=partial(baseline_step, distributed.wrap(net, device), opt, **options), forward=net,
                     optimizer=opt, loss_scale=lambda: None)


def _amp(cfg: RunConfig, model: nn.Module, net: nn.Module, device: torch.device, options: dict) -> Precision:
    autocast, dtype, how = _autocast(cfg, device)
    warn_if_slow(how, _name(dtype), device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # BF16 needs no scaling
    opt = _sgd(model.parameters(), cfg)
    arithmetic = {"emulated": ", emulated tensor-core arithmetic", "native": ""}[how]
    scaling = f"GradScaler from {scaler.get_scale():g}" if scaler.is_enabled() else "no loss scaler"
    return Precision(step=partial(amp_step, distributed.wrap(net, device), opt, autocast=autocast,
                                  scaler=_with_injection(scaler, cfg), **options),
                     forward=eval_forward(net, autocast), optimizer=opt,
                     loss_scale=lambda: scaler.get_scale() if scaler.is_enabled() else None, amp_dtype=_name(dtype),
                     half_compute=how, scaler=scaler, loss_scaler=loss_scaler_kind("amp", _name(dtype), cfg.loss_scale),
                     description=f"torch.autocast({_name(dtype)}){arithmetic}, {scaling}")


def _manual(cfg: RunConfig, model: nn.Module, net: nn.Module, device: torch.device, options: dict) -> Precision:
    dtype, how = _half(cfg, device)
    warn_if_slow(how, _name(dtype), device.type)
    master = MasterWeights(model, cfg.master_weights, seed=cfg.seed)  # from the FP32 weights, before rounding
    half_with_fp32_norm_(model, dtype, fp32_norm=not cfg.fp16_batchnorm)
    opt = _sgd(master.params, cfg)
    scaler = make_loss_scaler(cfg)
    fp8 = setup_fp8(cfg, model, device, scaler) if cfg.fp8 != "off" else None
    half_compute = fp8.compute() if fp8 is not None else half_compute_context(how)
    notes = []
    if dtype == torch.bfloat16 and cfg.loss_scale != "none":
        notes.append("bfloat16 has FP32's exponent range, so loss scaling is unnecessary; the scaler ran "
                     "anyway (--loss-scale none drops it)")
    norm = "FP16" if cfg.fp16_batchnorm else "FP32"
    arithmetic = {"emulated": "emulated tensor-core arithmetic (half operands, FP32 accumulation)",
                  "native": "native half kernels"}[how]
    if fp8 is not None:
        arithmetic = (f"emulated FP8 tensor-core arithmetic (E4M3 forward, E5M2 gradients, {cfg.fp8} "
                      f"per-tensor scaling, FP32 accumulation; FP16: {', '.join(fp8.fp16_layers) or 'none'})")
    scaling = {"dynamic": "dynamic loss scale from {:g}", "none": "no loss scaling (scale {:g})"}.get(
        cfg.loss_scale, "static loss scale {:g}").format(scaler.get_scale())
    step = partial(manual_step, distributed.wrap(net, device), opt, master=master, scaler=_with_injection(scaler, cfg),
                   dtype=dtype, half_compute=half_compute, **options)
    telemetry = [scaler.telemetry, *([fp8.telemetry] if fp8 is not None else []), master.telemetry]
    return Precision(step=step, forward=eval_forward(net, half_compute, dtype), optimizer=opt,
                     loss_scale=scaler.get_scale, half_compute=how, master=master, scaler=scaler, fp8=fp8, notes=notes,
                     telemetry=telemetry, loss_scaler=loss_scaler_kind("manual", None, cfg.loss_scale),
                     description=f"{cfg.manual_dtype} model, {norm} BatchNorm, {master.describe()}, {arithmetic}, "
                                 f"{scaling}")


PRECISIONS = {"baseline": _baseline, "amp": _amp, "manual": _manual}  # mode -> its training set-up


def setup_precision(cfg: RunConfig, model: nn.Module, device: torch.device) -> Precision:
    """Prepare ``model`` (FP32, on ``device``) for ``cfg.mode`` and build its optimizer.

    With ``cfg.compile`` the steps call ``torch.compile(model)``, which shares ``model``'s parameters
    (so master weights, optimizer and checkpoints still work on ``model`` itself). Manual mode converts
    ``model`` in place before the first (compiling) call. Under torchrun the steps train it wrapped in
    ``DistributedDataParallel`` (made after that conversion, so it all-reduces the half gradients);
    evaluation runs it unwrapped, each rank on its shard."""
    options = dict(accumulate=cfg.accumulate, clip=cfg.clip_grad_norm, label_smoothing=cfg.label_smoothing)
    net = torch.compile(model) if cfg.compile else model  # evaluates; trains, in DDP when there are several ranks
    precision = PRECISIONS[cfg.mode](cfg, model, net, device, options)
    if cfg.layer_stats_every is not None:  # any mode: hooks on the layers, on the steps it measures
        layers = LayerGradientTelemetry(model, cfg.layer_stats_every, precision.loss_scale)
        precision.step = layers.wrap(precision.step)
        precision.telemetry.append(layers)
    return precision


def _amp_inference(cfg: RunConfig, model: nn.Module, device: torch.device):
    autocast, dtype, how = _autocast(cfg, device)
    return eval_forward(model, autocast), f"autocast {_name(dtype)}", how


def _manual_inference(cfg: RunConfig, model: nn.Module, device: torch.device):
    dtype, how = _half(cfg, device)
    half_with_fp32_norm_(model, dtype, fp32_norm=not cfg.fp16_batchnorm)
    return eval_forward(model, half_compute_context(how), dtype), _name(dtype), how


INFERENCE = {"baseline": lambda cfg, model, device: (model, "float32", None), "amp": _amp_inference,
             "manual": _manual_inference}  # mode -> its forward pass alone, without training's state


def setup_inference(cfg: RunConfig, model: nn.Module, device: torch.device) -> tuple[Callable, str, str | None]:
    """``model`` (FP32, on ``device``) ready to infer in ``cfg.mode``, in the precision its training evaluates
    in: ``(forward, dtype, half_compute)``, where ``forward(x)`` takes an FP32 batch and returns FP32 logits,
    ``dtype`` names the precision (``float32``, ``autocast float16``, ``float16``...), and ``half_compute`` is
    None for FP32. Manual mode casts ``model`` in place; there are no master weights, optimizer or scaler."""
    return INFERENCE[cfg.mode](cfg, model, device)
