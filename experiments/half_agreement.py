"""Native against emulated half-precision arithmetic, per layer type: how far apart the two are.

For each layer type (dense 3x3 convolution, strided 3x3, depthwise 3x3, 1x1 convolution, linear,
batched matmul) it runs the forward and backward passes twice on the same FP16 operands: with
PyTorch's own FP16 kernels (cuDNN/cuBLAS tensor cores on a GPU, the naive fallback on a CPU) and
with mixprec's emulation (FP32 kernels on the FP16 operands, results rounded to FP16). It prints a
Markdown table of the normwise relative difference of the output and of each gradient, in units of
FP16's unit roundoff u = 2^-11: a few u means the emulation computes what the hardware computes, up
to the order of its sums. Exits 1 if any difference exceeds --max-u.

    python experiments/half_agreement.py [--device cuda] [--max-u 8]
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from mixprec.halfops import emulated_half_compute

U16 = 2.0**-11

LAYERS = {  # name: (make operands (FP32), the function of them)
    "conv 3x3": (lambda g: (torch.randn(8, 32, 16, 16, generator=g), torch.randn(64, 32, 3, 3, generator=g) / 17),
                 lambda x, w: F.conv2d(x, w, padding=1)),
    "conv 3x3 stride 2": (lambda g: (torch.randn(8, 32, 16, 16, generator=g),
                                     torch.randn(64, 32, 3, 3, generator=g) / 17),
                          lambda x, w: F.conv2d(x, w, stride=2, padding=1)),
    "depthwise 3x3": (lambda g: (torch.randn(8, 32, 16, 16, generator=g), torch.randn(32, 1, 3, 3, generator=g) / 3),
                      lambda x, w: F.conv2d(x, w, padding=1, groups=32)),
    "conv 1x1": (lambda g: (torch.randn(8, 64, 8, 8, generator=g), torch.randn(128, 64, 1, 1, generator=g) / 8),
                 lambda x, w: F.conv2d(x, w)),
    "linear": (lambda g: (torch.randn(128, 512, generator=g), torch.randn(10, 512, generator=g) / 23),
               lambda x, w: F.linear(x, w)),
    "batched matmul": (lambda g: (torch.randn(4, 64, 96, generator=g), torch.randn(4, 96, 32, generator=g) / 10),
                       lambda a, b: torch.bmm(a, b)),
}


def _run(fn, operands, grad_out, emulated: bool):
    leaves = [t.detach().clone().requires_grad_() for t in operands]
    with emulated_half_compute() if emulated else nullcontext():
        out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return [out, *grads]


def agreement(device: torch.device) -> list[dict]:
    """One row per layer type: the relative differences (in u) of output, input gradient, weight gradient."""
    rows = []
    for name, (make, fn) in LAYERS.items():
        g = torch.Generator().manual_seed(0)
        operands = [t.to(device).half() for t in make(g)]
        out_shape = fn(*[t.float() for t in operands]).shape
        grad_out = torch.randn(out_shape, generator=g).to(device).half()
        native = _run(fn, operands, grad_out, emulated=False)
        emulated = _run(fn, operands, grad_out, emulated=True)
        assert all(t.dtype == torch.float16 for t in native + emulated)
        diff = [((a.float() - b.float()).norm() / b.float().norm()).item() / U16 for a, b in zip(native, emulated)]
        rows.append(dict(layer=name, output=diff[0], input_grad=diff[1], weight_grad=diff[2]))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-u", type=float, default=8.0, help="largest difference accepted, in units of u")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = agreement(device)
    from mixprec.device import device_name

    name = device_name(device)
    print(f"Native FP16 kernels against emulated tensor-core arithmetic on {name}, torch {torch.__version__}: "
          "normwise relative difference in units of u = 2^-11\n")
    print("| layer | output | input gradient | weight gradient |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['output']:.2f} | {r['input_grad']:.2f} | {r['weight_grad']:.2f} |")
    worst = max(max(r["output"], r["input_grad"], r["weight_grad"]) for r in rows)
    ok = worst <= args.max_u
    print(f"\nworst {worst:.2f}u (accepted up to {args.max_u:g}u): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
