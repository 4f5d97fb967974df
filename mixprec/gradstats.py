"""``python -m mixprec.gradstats``: where one batch's gradients fall in FP16's range, with and without loss scaling.

Measures, for real, the figure behind loss scaling (Micikevicius et al. 2018, *Mixed Precision
Training*, Fig. 3): a histogram of log2 gradient magnitudes with FP16's range marked, and the same
gradients shifted by the loss scale. One FP32 forward/backward pass of cross-entropy on the first
augmented training batch, through a freshly initialised model in train mode, captures:

* weight gradients: ``.grad`` of every parameter (convolution and linear weights, the linear bias,
  BatchNorm weights and biases);
* activation gradients: the gradient of the loss w.r.t. the output of every call of every leaf module
  that owns parameters or is an activation function (``torch.nn.modules.activation``): for the
  ResNets, every Conv2d, BatchNorm2d, ReLU and Linear (whose output gradient is the logits'). A
  module called twice (BasicBlock's one ReLU) contributes once per call. Outputs of parameter-free
  layers that are not activations (pooling, Identity, the residual sum) are not captured. A tensor hook
  registered before an in-place change (in-place ReLU, the residual ``+=``) receives the gradient
  w.r.t. the value before the change, so each captured gradient belongs to its module's own output.

FP16 thresholds on ``|g * scale|``: below 2^-24 (the smallest subnormal) counts as becoming 0,
[2^-24, 2^-14) as subnormal, above 65504 as inf. Round-to-nearest actually moves the half-ulp
bands [2^-25, 2^-24) up to 2^-24 and (65504, 65520) down to 65504; the thresholds are the range's
edges, as in the paper's figure.

Writes ``gradstats-<model>.csv`` (histogram), ``gradstats-<model>-fractions.csv`` and
``gradstats-<model>.png`` into ``--out``.

``--models A B ...`` instead surveys several models (:func:`survey_model`): for each, the gradients of one
batch of ``--batch-size`` real training images, at initialisation and again after ``--steps`` FP32 SGD steps,
summed up layer by layer without keeping them (a log2 histogram of 1/8 binade per layer). It writes
``survey.csv`` (per model, point and kind: the shares that underflow FP16 at scale 1, the smallest scale that
lifts 99.9% of the nonzero gradients into FP16's normal range, the largest that does not overflow),
``survey-layers.csv`` (every layer's shares and scale), ``survey.md`` (the tables, with the five layers
most at risk per model) and ``survey.png``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .cli import OneLineParser, UsageError
from .config import add_device_option
from .scaler import FP16_MAX
from .scaler import FP16_SMALLEST_NORMAL as FP16_MIN_NORMAL
from .scaler import FP16_SMALLEST_SUBNORMAL as FP16_MIN_SUBNORMAL

PROG = "python -m mixprec.gradstats"
KINDS = ("activation", "weight")
FRACTIONS = ("zero", "underflow_to_zero", "subnormal", "overflow")


def fp16_fractions(values: torch.Tensor, scale: float) -> dict:
    """Fractions of all elements of ``values`` (FP32 gradients) that are exactly zero already, or that,
    once multiplied by ``scale``, are nonzero but become 0 in FP16, land in FP16's subnormals, or
    overflow to inf; plus ``elements``, the element count. The product is taken in FP32, as a loss
    scaler takes it."""
    values = values.detach().flatten()
    mag, zero = values.abs() * scale, values == 0
    masks = {"zero": zero,
             "underflow_to_zero": ~zero & (mag < FP16_MIN_SUBNORMAL),
             "subnormal": (mag >= FP16_MIN_SUBNORMAL) & (mag < FP16_MIN_NORMAL),
             "overflow": mag > FP16_MAX}
    n = mag.numel()
    return {"elements": n, **{k: torch.count_nonzero(m).item() / n for k, m in masks.items()}}


def log2_edges(*values: torch.Tensor) -> np.ndarray:
    """Integer bin edges spanning log2|g| of every nonzero element of ``values``, and at least -40..20."""
    lo, hi = -40, 20
    for v in values:
        mag = v.abs()[v != 0]
        if mag.numel():
            lo = min(lo, math.floor(math.log2(mag.min().item())))
            hi = max(hi, math.floor(math.log2(mag.max().item())) + 1)
    return np.arange(lo, hi + 1)


def log2_histogram(values: torch.Tensor, edges: np.ndarray) -> np.ndarray:
    """Counts of log2|g| over the nonzero elements of ``values`` in the unit-wide bins ``[k, k+1)``
    between consecutive integer ``edges``, as int64 (float counts lose exactness past 2^24)."""
    logs = values[values != 0].abs().log2().cpu().numpy()
    return np.histogram(logs, bins=len(edges) - 1, range=(edges[0], edges[-1]))[0]


def _captured(module: nn.Module) -> bool:
    leaf = next(module.children(), None) is None
    return leaf and (next(module.parameters(recurse=False), None) is not None
                     or type(module).__module__ == nn.modules.activation.__name__)


def backward_with_output_hooks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, on_grad) -> None:
    """One FP32 forward/backward pass of cross-entropy on ``(x, y)`` from zeroed gradients, calling
    ``on_grad(name, g)`` with the gradient of every captured module's output (see the module docstring), under
    the module's name, as backward reaches it; the parameters' gradients are left in ``.grad``."""
    names = {m: name for name, m in model.named_modules()}

    def on_forward(module, inputs, output):
        output.register_hook(lambda g: on_grad(names[module], g))

    handles = [m.register_forward_hook(on_forward) for m in model.modules() if _captured(m)]
    model.zero_grad(set_to_none=True)
    try:
        nn.functional.cross_entropy(model(x), y).backward()
    finally:
        for h in handles:
            h.remove()


def capture_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """One FP32 forward/backward pass of cross-entropy on ``(x, y)``; returns the activation and the
    weight gradients (see the module docstring for which tensors), each flattened into one tensor."""
    captured = []
    # a copy, so that nothing autograd later does to its gradient buffers can change what was recorded
    backward_with_output_hooks(model, x, y, lambda name, g: captured.append(g.detach().flatten().clone()))
    weights = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return {"activation": torch.cat(captured), "weight": torch.cat(weights)}


def _scale_label(scale: float) -> str:
    return f"$2^{{{math.log2(scale):.0f}}}$" if scale != 1 and math.log2(scale).is_integer() else f"{scale:g}"


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"  # significant digits, so a small nonzero share does not print as 0.00%


def plot(edges: np.ndarray, counts: dict, fractions, model: str, batch_size: int, scale: float):
    """The two-panel figure (activation, weight gradients): FP32 histogram, the same shifted by
    ``scale``, FP16's range marked, and the fractions lost to FP16 at scale 1 and at ``scale``."""
    from matplotlib.figure import Figure

    label, shift, top = _scale_label(scale), math.log2(scale), math.log2(FP16_MAX)
    fig = Figure(figsize=(10, 8), dpi=150, layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    lo, hi = min(edges[0], edges[0] + shift), max(edges[-1], edges[-1] + shift)  # a scale < 1 shifts left
    for ax, kind in zip(axes, KINDS):
        rows = fractions[fractions.kind == kind]
        elements = rows.elements.iloc[0]
        ax.axvspan(lo, -24, color="0.85", label="becomes 0 in FP16")
        ax.axvspan(top, hi, color="mistyrose", label="overflows to inf in FP16")
        ax.stairs(counts[kind], edges, fill=True, color="tab:blue", alpha=0.6, label="FP32 gradients (scale 1)")
        ax.stairs(counts[kind], edges + shift, color="tab:orange", linewidth=1.8,
                  label=f"multiplied by the loss scale {label}")
        for x, style, what in ((-24, "--", "smallest FP16 subnormal $2^{-24}$"),
                               (-14, ":", "smallest FP16 normal $2^{-14}$"),
                               (top, "-.", "FP16 max 65504 ($2^{15.999}$)")):
            ax.axvline(x, color="k", linestyle=style, linewidth=1, label=what)
        ax.set_yscale("log")
        ax.set_ylim(0.5, counts[kind].max() * 100)  # headroom above the peak for the text box
        ax.set_xlim(lo, hi)
        ax.set_ylabel("elements per bin")
        ax.set_title(f"{kind} gradients: {elements:,} elements, {rows.zero.iloc[0]:.1%} exactly zero in FP32",
                     fontsize=10)
        ax.text(0.99, 0.95, "\n".join(
            f"in FP16 at scale {_scale_label(r.scale)}: {_percent(r.underflow_to_zero)} become 0, "
            f"{_percent(r.subnormal)} subnormal, {_percent(r.overflow)} overflow" for r in rows.itertuples()),
            transform=ax.transAxes, ha="right", va="top", fontsize=8,
            bbox=dict(boxstyle="round", facecolor="white", alpha=0.9))
    axes[-1].set_xlabel("log2 |gradient|")
    fig.suptitle(f"{model}: gradient magnitudes vs the FP16 range (at initialisation, one FP32 "
                 f"batch of {batch_size} CIFAR-10 images)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=8)
    return fig


# --models: the survey. Each layer's gradients are summed up as they arrive (a model's activation gradients at
# batch 128 can outgrow the memory), into a log2 histogram fine enough for scales (1/8 binade) and wide enough
# for any gradient FP16 could hold or lose; the rare magnitudes outside it count in its end bins.
BINS_PER_BINADE = 8
LOG2_LOW, LOG2_HIGH = -80, 24
N_BINS = (LOG2_HIGH - LOG2_LOW) * BINS_PER_BINADE
LIFTED = 0.999  # the smallest scale lifts this share of the nonzero gradients into FP16's normal range
AT_RISK = 5  # layers listed per model and point


def _bin(log2_value: float) -> int:
    return (log2_value - LOG2_LOW) * BINS_PER_BINADE


class LayerSums:
    """Per (layer, kind): elements, zeros, the largest |g| and a log2 histogram of the nonzero |g|."""

    def __init__(self):
        self.sums: dict[tuple[str, str], dict] = {}

    @torch.no_grad()
    def add(self, layer: str, kind: str, g: torch.Tensor) -> None:
        mag = g.detach().abs().float().flatten()
        nonzero = mag[mag > 0]
        # in float64: a float32 log2 rounds values just below a power of 2 onto it, and so into the bin above
        bins = ((nonzero.double().log2() - LOG2_LOW) * BINS_PER_BINADE).floor_().clamp_(0, N_BINS - 1).long()
        entry = self.sums.setdefault((layer, kind), {"elements": 0, "zeros": 0, "max_abs": 0.0,
                                                     "hist": torch.zeros(N_BINS, dtype=torch.int64)})
        entry["elements"] += mag.numel()
        entry["zeros"] += mag.numel() - nonzero.numel()
        entry["max_abs"] = max(entry["max_abs"], float(mag.max()) if mag.numel() else 0.0)
        entry["hist"] += torch.bincount(bins, minlength=N_BINS).cpu()


def layer_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> LayerSums:
    """One FP32 forward/backward pass of cross-entropy on ``(x, y)``, summed up per layer: the gradient of every
    captured module's output (``activation``, under the module's name; see the module docstring) and of every
    parameter (``weight``, under the parameter's name)."""
    sums = LayerSums()
    backward_with_output_hooks(model, x, y, lambda name, g: sums.add(name, "activation", g))
    for name, p in model.named_parameters():
        if p.grad is not None:
            sums.add(name, "weight", p.grad)
    return sums


def fp16_view(elements: int, zeros: int, max_abs: float, hist: torch.Tensor) -> dict:
    """What FP16 makes of gradients summed up as :class:`LayerSums` does: the shares of all elements that are
    zero, that are nonzero and become 0 at scale 1, and that are subnormal there; the share of the nonzero ones
    below FP16's normal range; the smallest scale (log2) that lifts :data:`LIFTED` of the nonzero ones into the
    normal range (from the histogram: exact to 1/8 binade, rounded up), the largest (log2) that keeps the
    largest below 65504, and the window between them."""
    nonzero = int(hist.sum())
    underflow = int(hist[: int(_bin(-24))].sum())
    below_normal = int(hist[: int(_bin(-14))].sum())
    if nonzero:
        first = int(torch.searchsorted(hist.cumsum(0), (1 - LIFTED) * nonzero, right=False))
        min_scale_log2 = -14 - (LOG2_LOW + first / BINS_PER_BINADE)  # lifts that bin's lower edge to 2^-14
    else:
        min_scale_log2 = math.nan
    max_scale_log2 = math.log2(FP16_MAX / max_abs) if max_abs > 0 else math.inf
    return {"elements": elements, "zero_frac": zeros / elements, "underflow_frac": underflow / elements,
            "subnormal_frac": (below_normal - underflow) / elements,
            "below_normal_of_nonzero": below_normal / nonzero if nonzero else math.nan,
            "min_scale_log2": min_scale_log2, "max_scale_log2": max_scale_log2,
            "window_binades": max_scale_log2 - min_scale_log2, "max_abs": max_abs}


def summarize(sums: LayerSums) -> tuple[list[dict], list[dict]]:
    """Per kind (``activation``, ``weight`` and ``all``: both) and per layer, :func:`fp16_view`'s figures."""
    totals = []
    for kind in (*KINDS, "all"):
        entries = [e for (_, k), e in sums.sums.items() if kind in (k, "all")]
        totals.append({"kind": kind, **fp16_view(sum(e["elements"] for e in entries), sum(e["zeros"] for e in entries),
                                                 max(e["max_abs"] for e in entries), sum(e["hist"] for e in entries))})
    layers = [{"layer": layer, "kind": kind, **fp16_view(e["elements"], e["zeros"], e["max_abs"], e["hist"])}
              for (layer, kind), e in sums.sums.items()]
    return totals, layers


def survey_model(name: str, splits, device: torch.device, *, batch_size: int, steps: int, train_batch_size: int,
                 lr: float, seed: int) -> tuple[list[dict], list[dict]]:
    """``name`` freshly built (seed ``seed``), measured on one augmented training batch of ``batch_size`` at
    initialisation, then trained ``steps`` FP32 SGD steps (batches of ``train_batch_size``, Nesterov momentum
    0.9, weight decay 5e-4, constant ``lr``) and measured again on the same batch: the rows of
    :func:`summarize`, with ``model`` and ``point``."""
    from tqdm.auto import tqdm

    from .data import CifarLoader
    from .models import build_model

    torch.manual_seed(seed)
    model = build_model(name).to(device).train()
    x, y = next(iter(CifarLoader(*splits.train, batch_size, train=True, device=device, seed=seed)))
    totals, layers = [], []

    def measure(point: str):
        t, per_layer = summarize(layer_sums(model, x, y))
        totals.extend({"model": name, "point": point, **row} for row in t)
        layers.extend({"model": name, "point": point, **row} for row in per_layer)

    measure("init")
    if steps:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        loader = CifarLoader(*splits.train, train_batch_size, train=True, device=device, seed=seed + 1)
        done, epoch = 0, 0
        with tqdm(total=steps, desc=f"{name}: training", unit="step", leave=False, file=sys.stderr) as bar:
            while done < steps:
                loader.set_epoch(epoch)
                for images, labels in loader:
                    opt.zero_grad(set_to_none=True)
                    loss = nn.functional.cross_entropy(model(images), labels)
                    loss.backward()
                    opt.step()
                    done += 1
                    bar.update()
                    if done == steps:
                        break
                epoch += 1
        if not math.isfinite(loss.item()):
            raise UsageError(f"{name} diverged in the survey's training (loss {loss.item()}); lower --lr")
        measure(f"after {steps} steps")
    return totals, layers


def at_risk(layers: pd.DataFrame, n: int = AT_RISK) -> pd.DataFrame:
    """Per model and point, the ``n`` layers whose gradients need the largest scale to stay in FP16's normal
    range (then: the largest share of nonzero gradients below it at scale 1)."""
    group = {key: i for i, key in enumerate(dict.fromkeys(zip(layers.model, layers.point)))}  # in survey order
    ranked = layers.assign(group=[group[key] for key in zip(layers.model, layers.point)]).sort_values(
        ["group", "min_scale_log2", "below_normal_of_nonzero"], ascending=[True, False, False], kind="stable")
    return ranked.groupby("group", sort=False).head(n).drop(columns="group")


def survey_figure(totals: pd.DataFrame, batch_size: int):
    """Left: the share of nonzero activation and weight gradients that FP16 at scale 1 flushes to 0 (dark) or
    makes subnormal (light), per model and point. Right: the window of workable loss scales (all gradients):
    from the smallest that keeps 99.9% of them normal to the largest that does not overflow, with GradScaler's
    initial 2^16."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    models, points = list(dict.fromkeys(totals.model)), list(dict.fromkeys(totals.point))
    fig = Figure(figsize=(max(10, 1.4 * len(models) + 4), 8.5), dpi=150, layout="constrained")
    ax_share, ax_window = fig.subplots(2, 1)
    bars = [(kind, point) for kind in KINDS for point in points]
    width = 0.8 / len(bars)
    colours = {("activation", 0): "tab:blue", ("activation", 1): "tab:cyan", ("weight", 0): "tab:orange",
               ("weight", 1): "tab:olive"}
    for j, (kind, point) in enumerate(bars):
        rows = totals[(totals.kind == kind) & (totals.point == point)].set_index("model").reindex(models)
        nonzero = 1 - rows.zero_frac
        under, sub = 100 * rows.underflow_frac / nonzero, 100 * rows.subnormal_frac / nonzero
        xs = np.arange(len(models)) + (j - (len(bars) - 1) / 2) * width
        colour = colours[kind, points.index(point) % 2]
        ax_share.bar(xs, under, width, color=colour)
        ax_share.bar(xs, sub, width, bottom=under, color=colour, alpha=0.35)
    ax_share.set_xticks(np.arange(len(models)), models, rotation=20, fontsize=8)
    ax_share.set_ylabel("% of nonzero gradients")
    ax_share.set_ylim(0, 100)
    ax_share.set_title(f"In FP16 at scale 1: become 0 (solid) or subnormal (pale); one batch of {batch_size}",
                       fontsize=10)
    handles = [Patch(color=colours[kind, points.index(point) % 2], label=f"{kind} gradients, {point}")
               for kind, point in bars]
    ax_share.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for j, point in enumerate(points):
        rows = totals[(totals.kind == "all") & (totals.point == point)].set_index("model").reindex(models)
        xs = np.arange(len(models)) + (j - (len(points) - 1) / 2) * 0.3
        closed = rows.max_scale_log2 < rows.min_scale_log2  # no single scale does both
        ax_window.vlines(xs, rows.min_scale_log2, rows.max_scale_log2, lw=5, alpha=0.6,
                         colors=[("tab:red" if c else f"C{j}") for c in closed])
        ax_window.scatter(xs, rows.min_scale_log2, marker="^", color=f"C{j}", zorder=3,
                          label=f"{point}: smallest scale keeping {LIFTED:.1%} of nonzero gradients normal")
        ax_window.scatter(xs, rows.max_scale_log2, marker="v", color=f"C{j}", edgecolor="k", zorder=3,
                          label=f"{point}: largest scale without overflow")
    ax_window.axhline(16, color="k", ls="--", lw=1, label="GradScaler's initial scale $2^{16}$")
    ax_window.axhline(0, color="0.5", ls=":", lw=1, label="no scaling ($2^0$)")
    ax_window.set_xticks(np.arange(len(models)), models, rotation=20, fontsize=8)
    ax_window.set_ylabel("log2 loss scale")
    ax_window.set_title("Window of loss scales, all gradients (red: the bounds cross)", fontsize=10, loc="left")
    ax_window.grid(axis="y", alpha=0.3)
    ax_window.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def survey_markdown(totals: pd.DataFrame, risky: pd.DataFrame, args: argparse.Namespace) -> str:
    """survey.md: how it was measured, the per-model table and the layers most at risk."""
    def pct(v):
        return _percent(v)

    lines = ["# FP16 gradient numerics survey", "",
             f"Generated by `{PROG} --models {' '.join(args.models)} --batch-size {args.batch_size} --steps "
             f"{args.steps} --train-batch-size {args.train_batch_size} --lr {args.lr:g} --seed {args.seed}`. One "
             f"augmented batch of {args.batch_size} training images, FP32 forward and backward, measured at "
             f"initialisation and after {args.steps} FP32 SGD steps (batches of {args.train_batch_size}). "
             "Shares are of all elements; the scales are powers of 2 as log2: the smallest keeps "
             f"{LIFTED:.1%} of the nonzero gradients at or above FP16's smallest normal 2^-14 (to 1/8 binade, "
             "rounded up), the largest keeps the largest gradient at or below 65504.", "",
             "| model | point | gradients | elements | zero | become 0 in FP16 at scale 1 | subnormal at scale 1 "
             "| smallest scale (log2) | largest scale (log2) | window (binades) |", "|---" * 10 + "|"]
    for r in totals.itertuples():
        lines.append(f"| {r.model} | {r.point} | {r.kind} | {r.elements:,} | {pct(r.zero_frac)} | "
                     f"{pct(r.underflow_frac)} | {pct(r.subnormal_frac)} | {r.min_scale_log2:.2f} | "
                     f"{r.max_scale_log2:.2f} | {r.window_binades:.2f} |")
    lines += ["", f"## The {AT_RISK} layers most at risk per model and point", "",
              "Ranked by the scale their own gradients need (then by the share of nonzero ones below FP16's "
              "normal range at scale 1). `activation` is the gradient w.r.t. the module's output, `weight` a "
              "parameter's gradient.", "",
              "| model | point | layer | gradients | below normal at scale 1 (of nonzero) | become 0 at scale 1 | "
              "scale needed (log2) |", "|---" * 7 + "|"]
    for r in risky.itertuples():
        lines.append(f"| {r.model} | {r.point} | `{r.layer}` | {r.kind} | {pct(r.below_normal_of_nonzero)} | "
                     f"{pct(r.underflow_frac)} | {r.min_scale_log2:.2f} |")
    return "\n".join(lines) + "\n"


def _survey(args: argparse.Namespace, out: Path) -> int:
    import pandas as pd

    from .data import load_cifar10, make_splits
    from .device import resolve_device
    from .results import write_csv, write_figure, write_text

    device = resolve_device(args.device)
    splits = make_splits(load_cifar10(args.data))
    totals, layers = [], []
    for name in args.models:
        t, per_layer = survey_model(name, splits, device, batch_size=args.batch_size, steps=args.steps,
                                    train_batch_size=args.train_batch_size, lr=args.lr, seed=args.seed)
        totals += t
        layers += per_layer
        done = pd.DataFrame(t)
        print(done[done.kind == "all"][["model", "point", "underflow_frac", "subnormal_frac", "min_scale_log2",
                                        "max_scale_log2"]].to_string(index=False, header=name == args.models[0]),
              flush=True)
    totals, layers = pd.DataFrame(totals), pd.DataFrame(layers)
    risky = at_risk(layers)
    paths = [out / name for name in ("survey.csv", "survey-layers.csv", "survey.md", "survey.png")]
    try:
        write_csv(paths[0], totals)
        write_csv(paths[1], layers)
        write_text(paths[2], survey_markdown(totals, risky, args))
        write_figure(paths[3], survey_figure(totals, args.batch_size))
    except OSError as e:
        raise UsageError(f"cannot write into --out directory {out} ({e.strerror}); pass a writable one") from None
    print("wrote", *paths, sep="\n  ")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line; a bad option is one line on stderr and exit code 2, as in ``mixprec.run``."""
    from .models import MODELS

    p = OneLineParser(prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Histogram one batch's activation and weight gradients in log2 against "
                       "FP16's range, at loss scale 1 and --scale (Micikevicius et al. 2018, Fig. 3); "
                       "write gradstats-<model>.png, .csv and -fractions.csv into --out.")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", default="resnet20", choices=tuple(MODELS),
                       help="architecture, freshly initialised: one batch's histogram figure")
    which.add_argument("--models", nargs="+", choices=tuple(MODELS), metavar="MODEL",
                       help="survey these models instead, at initialisation and after --steps (survey.csv, "
                       "survey-layers.csv, survey.md, survey.png)")
    p.add_argument("--data", default=None, help="CIFAR-10, as mixprec.run's --data takes it; None: $MIXPREC_DATA, "
                   "else ~/.cache/mixprec/cifar10")
    p.add_argument("--batch-size", type=int, default=128, help="images in the one measured training batch")
    p.add_argument("--seed", type=int, default=0, help="seed for the initial weights, batch and augmentation")
    p.add_argument("--scale", type=float, default=65536.0,
                   help="loss scale to evaluate; 65536 = 2^16 is GradScaler's initial scale")
    p.add_argument("--steps", type=int, default=200, help="--models: FP32 SGD steps before the second measurement")
    p.add_argument("--train-batch-size", type=int, default=32, help="--models: images per training step")
    p.add_argument("--lr", type=float, default=0.02, help="--models: the training steps' constant learning rate")
    add_device_option(p)
    p.add_argument("--out", default="results/gradstats", help="output directory, created if missing")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``): 0 when the outputs are written, 2 on
    bad input (options, data, device, output directory), with the reason as one line on stderr."""
    try:
        return _run(build_parser().parse_args(argv))
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.batch_size <= 0:
        raise UsageError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {args.seed}")
    if not (math.isfinite(args.scale) and args.scale > 0):
        raise UsageError(f"--scale must be a positive finite number, got {args.scale}")
    if args.steps < 0 or args.train_batch_size <= 0:
        raise UsageError("--steps must be 0 or more and --train-batch-size positive, got "
                         f"{args.steps} and {args.train_batch_size}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    out = Path(args.out)
    try:  # before the data is decoded, so a bad --out fails in a second
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --out directory {out} ({e.strerror}); pass a writable one") from None
    if args.models:
        return _survey(args, out)
    # imported after parsing, so that --help and a mistyped option answer fast
    import pandas as pd

    from .data import CifarLoader, load_cifar10, make_splits
    from .device import resolve_device
    from .models import build_model
    from .results import write_csv, write_figure

    device = resolve_device(args.device)
    splits = make_splits(load_cifar10(args.data))
    torch.manual_seed(args.seed)
    model = build_model(args.model).to(device).train()
    x, y = next(iter(CifarLoader(*splits.train, args.batch_size, train=True, device=device, seed=args.seed)))
    grads = {k: g.cpu() for k, g in capture_gradients(model, x, y).items()}

    fractions = pd.DataFrame([{"kind": k, "scale": s, **fp16_fractions(grads[k], s)}
                              for k in KINDS for s in dict.fromkeys((1.0, args.scale))])
    edges = log2_edges(*grads.values())  # shared, so the two panels' bins line up
    counts = {k: log2_histogram(grads[k], edges) for k in KINDS}
    hist = pd.concat(pd.DataFrame({"kind": k, "log2_low": edges[:-1], "log2_high": edges[1:],
                                   "count": counts[k]}) for k in KINDS)
    fig = plot(edges, counts, fractions, args.model, args.batch_size, args.scale)

    paths = [out / f"gradstats-{args.model}{suffix}" for suffix in (".csv", "-fractions.csv", ".png")]
    try:
        write_csv(paths[0], hist)
        write_csv(paths[1], fractions)
        write_figure(paths[2], fig)
    except OSError as e:
        raise UsageError(f"cannot write into --out directory {out} ({e.strerror}); pass a writable one") from None
    shown = fractions.assign(**{c: fractions[c].map("{:.4%}".format) for c in FRACTIONS})
    print(shown.to_string(index=False))
    print("wrote", *paths, sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
