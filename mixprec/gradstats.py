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


def capture_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """One FP32 forward/backward pass of cross-entropy on ``(x, y)``; returns the activation and the
    weight gradients (see the module docstring for which tensors), each flattened into one tensor."""
    captured = []

    def on_forward(module, inputs, output):
        # a copy, so that nothing autograd later does to its gradient buffers can change what was recorded
        output.register_hook(lambda g: captured.append(g.detach().flatten().clone()))

    handles = [m.register_forward_hook(on_forward) for m in model.modules() if _captured(m)]
    try:
        nn.functional.cross_entropy(model(x), y).backward()
    finally:
        for h in handles:
            h.remove()
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


def build_parser() -> argparse.ArgumentParser:
    """The command line; a bad option is one line on stderr and exit code 2, as in ``mixprec.run``."""
    from .models import MODELS

    p = OneLineParser(prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Histogram one batch's activation and weight gradients in log2 against "
                       "FP16's range, at loss scale 1 and --scale (Micikevicius et al. 2018, Fig. 3); "
                       "write gradstats-<model>.png, .csv and -fractions.csv into --out.")
    p.add_argument("--model", default="resnet20", choices=tuple(MODELS), help="architecture, freshly initialised")
    p.add_argument("--data", default=None, help="CIFAR-10, as mixprec.run's --data takes it; None: $MIXPREC_DATA, "
                   "else ~/.cache/mixprec/cifar10")
    p.add_argument("--batch-size", type=int, default=128, help="images in the one measured training batch")
    p.add_argument("--seed", type=int, default=0, help="seed for the initial weights, batch and augmentation")
    p.add_argument("--scale", type=float, default=65536.0,
                   help="loss scale to evaluate; 65536 = 2^16 is GradScaler's initial scale")
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
    out = Path(args.out)
    try:  # before the data is decoded, so a bad --out fails in a second
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --out directory {out} ({e.strerror}); pass a writable one") from None
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
