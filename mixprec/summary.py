"""``python -m mixprec.summary --model M``: a model's layers, with output shape, parameters and MACs.

Like torchinfo's summary, from PyTorch alone: the forward pass runs once on a meta-device copy of the
model (shapes only, so any ``--image-size`` costs nothing), forward hooks record each layer's output
shape, and ``torch.utils.flop_counter.FlopCounterMode`` attributes the multiply-accumulates (half its
FLOPs, convolutions and matrix products) to the modules that ran them.

Example::

    python -m mixprec.summary --model resnet18 --depth 2
    python -m mixprec.summary --list    # every model, as the README's table
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd
import torch
from torch import nn

OUTSIDE = "(outside these layers)"


def _shape(out) -> str:
    if isinstance(out, torch.Tensor):
        return " x ".join(map(str, out.shape))
    if isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
        return ", ".join(_shape(o) for o in out)
    return type(out).__name__


def layer_table(model: nn.Module, image_size: int = 32, depth: int = 3) -> pd.DataFrame:
    """One row per module ``depth`` levels down (or per leaf above that level), in the order they first
    ran, with columns ``layer``, ``type``, ``output_shape``, ``params`` and ``macs`` for one image; a
    last row holds what the selected modules leave out (parameters or MACs of their parents' own code),
    if anything. The rows' ``params`` and ``macs`` add up to :func:`~mixprec.models.count_params` and
    :func:`~mixprec.models.count_macs`.

    Example::

        table = layer_table(build_model("resnet20"), depth=1)
        table.macs.sum()  # 40_813_184
    """
    from torch.utils.flop_counter import FlopCounterMode

    from .models import count_params, meta_copy

    net = meta_copy(model).eval()
    root = type(net).__name__
    selected = {}

    def select(prefix: str, module: nn.Module, level: int):
        for name, child in module.named_children():
            name = f"{prefix}{name}"
            # a layer with weights of its own (timm's BatchNormAct2d) is one row, its activation inside it
            if level == depth or not any(child.children()) or next(child.parameters(recurse=False), None) is not None:
                selected[name] = child
            else:
                select(f"{name}.", child, level + 1)

    select("", net, 1)
    shapes, order = {}, []

    def record(name):
        def hook(module, args, out):
            if name not in shapes:
                order.append(name)
            shapes[name] = _shape(out)  # a module called twice (a shared ReLU) shows its last call
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in selected.items()]
    try:
        with torch.no_grad(), FlopCounterMode(display=False, depth=None) as counter:
            net(torch.empty(1, 3, image_size, image_size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    flops = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    rows = [(name, type(selected[name]).__name__, shapes[name], count_params(selected[name]),
             flops.get(f"{root}.{name}", 0) // 2) for name in order]
    rows += [(name, type(m).__name__, "(not called)", count_params(m), 0)
             for name, m in selected.items() if name not in shapes and count_params(m)]
    params_left = count_params(net) - sum(r[3] for r in rows)
    macs_left = counter.get_total_flops() // 2 - sum(r[4] for r in rows)
    if params_left or macs_left:
        rows.append((OUTSIDE, "", "", params_left, macs_left))
    return pd.DataFrame(rows, columns=["layer", "type", "output_shape", "params", "macs"])


def format_table(table: pd.DataFrame, title: str) -> str:
    """The table as aligned text with a totals line (parameters with separators, MACs in millions)."""
    shown = table.assign(params=table.params.map("{:,}".format), macs=(table.macs / 1e6).map("{:,.2f}".format))
    shown = shown.rename(columns={"output_shape": "output shape", "macs": "MMACs"})
    left = {c: f"{{:<{max(len(c), shown[c].str.len().max())}}}".format for c in ("layer", "type", "output shape")}
    text = shown.to_string(index=False, justify="left", formatters=left)
    width = max(len(line) for line in text.splitlines())
    total = f"total: {table.params.sum():,} parameters, {table.macs.sum() / 1e9:.4f} GMACs"
    return "\n".join([title, "=" * width, text, "-" * width, total])


def model_list(image_size: int = 32) -> str:
    """Every model as a Markdown table row: source, CIFAR adaptation, parameters and MACs (10 classes)."""
    from .models import MODELS, adaptations, build_model, count_macs, count_params, source

    lines = [f"| `--model` | built from | adaptation to 32x32 | parameters | GMACs ({image_size}x{image_size}) |",
             "|---|---|---|---|---|"]
    for name, adaptation in adaptations().items():
        with torch.device("meta"):
            model = build_model(name)
        lines.append(f"| `{name}` | {source(name)} | {adaptation} | {count_params(model) / 1e6:.2f}M | "
                     f"{count_macs(model, image_size) / 1e9:.3f} |")
    assert len(lines) == len(MODELS) + 2
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .cli import OneLineParser, UsageError
    from .models import MODELS, build_model

    p = OneLineParser(prog="python -m mixprec.summary",
                       description="A model's layers with output shape, parameters and MACs for one image, and "
                       "totals (MACs: torch.utils.flop_counter's FLOPs / 2, counted on the meta device).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", choices=tuple(MODELS), help="architecture, as --model of mixprec.run")
    what.add_argument("--list", action="store_true",
                      help="instead, every model's source, adaptation, parameters and MACs, as a Markdown table")
    p.add_argument("--image-size", type=int, default=32, help="square input side in pixels (one image)")
    p.add_argument("--depth", type=int, default=3,
                   help="how many module levels down the rows go (1: the top-level blocks)")
    p.add_argument("--num-classes", type=int, default=10, help="classifier outputs")
    args = p.parse_args(argv)
    if args.image_size <= 0 or args.depth <= 0 or args.num_classes <= 0:
        p.error("--image-size, --depth and --num-classes must be positive")
    if args.list:
        print(model_list(args.image_size))
        return 0
    try:
        with torch.device("meta"):  # shapes only: no initialisation, no memory
            model = build_model(args.model, args.num_classes)
        table = layer_table(model, args.image_size, args.depth)
    except UsageError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if args.image_size == 32:  # every model takes 32x32: a bug, with its traceback
            raise
        print(f"{p.prog}: error: {args.model} cannot take a {args.image_size}x{args.image_size} image: "
              f"{str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(format_table(table, f"{args.model}, one {args.image_size}x{args.image_size} image, {args.num_classes} "
                              "classes (MACs: torch.utils.flop_counter, FLOPs / 2)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
