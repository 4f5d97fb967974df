"""Activation memory: bytes saved for backward by one training-mode forward, per precision, per model.

For each model (``build_model``: torchvision's ResNets with the CIFAR stem) and each variant, one
forward in train mode with autograd on, through the variant's ``Precision.forward`` from
``setup_precision``, counted by ``mixprec.memory.SavedTensorBytes`` (each storage once):

* ``baseline``: FP32.
* ``manual``: ``RunConfig(mode="manual", half_compute="emulated")``: FP16 model, FP32 BatchNorm,
  emulated tensor-core arithmetic.
* ``amp-fp16``: ``RunConfig(mode="amp", amp_dtype="float16")``: ``torch.autocast("cpu", float16)``
  on the FP32 model (PyTorch's FP16 CPU kernels: slow, ~1 GMAC/s, a few seconds for resnet50 at
  batch 8).
* ``amp-bf16``: the same with bfloat16, for context.

Saved bytes grow linearly with the batch, from a constant: the weights that convolutions and linears
save (``--batch-size 8`` by default). Target (issue: activation memory): manual / baseline <= 0.52
for every model (physical limit 0.50). amp / baseline is reported, not targeted, and explained: the
same forward is run again and broken down by the dtype of each saved storage, by the module whose
forward saved it first (the innermost module running then: a leaf such as Conv2d, BatchNorm2d, ReLU,
Linear is one op; a block's own code would show as the block), and by what it is: the ``model's own
weight`` (a parameter or buffer of the model, alive anyway), a ``cast of a weight`` or a ``cast of
an activation`` (a ``_to_copy`` that autograd tracks, as autocast makes), an ``activation`` (any
other op's output), or a ``no-grad tensor`` (the input image or its cast, BatchNorm's batch
statistics). The table's ``not weights`` column is the saved bytes less the model's own weights:
the memory that the forward allocates and keeps for backward only. The breakdown's total is
asserted to equal the figure.
Exits 1 when the target is missed.

    python experiments/bench_activations.py [--models resnet18,resnet50] [--batch-size 8] [--breakdown amp-fp16]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import defaultdict
from functools import partial

import torch
from torch import nn

from mixprec.config import RunConfig
from mixprec.device import device_name
from mixprec.memory import SavedTensorBytes, saved_tensor_bytes
from mixprec.models import build_model
from mixprec.steps import setup_precision

TARGET = 0.52
VARIANTS = {
    "baseline": {"mode": "baseline"},
    "manual": {"mode": "manual", "half_compute": "emulated"},
    "amp-fp16": {"mode": "amp", "amp_dtype": "float16"},
    "amp-bf16": {"mode": "amp", "amp_dtype": "bfloat16"},
}
MiB = 2**20
OWN = "model's own weight"


class SavedBytesByOrigin(SavedTensorBytes):
    """``SavedTensorBytes`` (the same count, ``.bytes``) that also files each storage, when first saved,
    under (dtype, saving module, kind) in ``.by``; the module stack is kept by hooks on ``model``."""

    def __init__(self, model: nn.Module):
        self.stack: list[str] = []
        self.by: dict[tuple[str, str, str], int] = defaultdict(int)
        self.own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self._module_hooks = []
        for m in model.modules():
            self._module_hooks += [m.register_forward_pre_hook(self._enter), m.register_forward_hook(self._leave)]

    def _enter(self, module: nn.Module, args) -> None:
        self.stack.append(type(module).__name__)

    def _leave(self, module: nn.Module, args, output) -> None:  # returns None: the output stays as it is
        self.stack.pop()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._storages:  # the first saver gets it, as the count keeps it once
            where = self.stack[-1] if self.stack else "outside the model"
            self.by[(str(t.dtype).removeprefix("torch."), where, self._kind(t))] += storage.nbytes()
        return super()._pack(t)

    def _kind(self, t: torch.Tensor) -> str:
        if t.untyped_storage().data_ptr() in self.own:
            return OWN
        fn = t.grad_fn
        if fn is None:
            return "no-grad tensor"
        if type(fn).__name__.startswith("ToCopyBackward"):
            source = fn.next_functions[0][0] if fn.next_functions else None
            return "cast of a weight" if type(source).__name__ == "AccumulateGrad" else "cast of an activation"
        return "activation"

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        for h in self._module_hooks:
            h.remove()

    def extra(self) -> int:
        """Saved bytes in storages that are not the model's own parameters and buffers: memory held for
        backward only."""
        return sum(n for (_, _, kind), n in self.by.items() if kind != OWN)


def setup(model_name: str, variant: str) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = build_model(model_name)
    with warnings.catch_warnings():  # amp float16 on CPU warns that it is slow: we know, and want it here
        warnings.simplefilter("ignore")
        prec = setup_precision(RunConfig(model=model_name, **VARIANTS[variant]), model, torch.device("cpu"))
    model.train()
    return model, prec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,resnet50", help="comma-separated (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--breakdown", default="amp-fp16,manual,baseline",
                   help="variants whose breakdown is printed, comma-separated (default: %(default)s; 'none')")
    args = p.parse_args()
    models = args.models.split(",")
    show = [] if args.breakdown == "none" else args.breakdown.split(",")

    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32)
    saved: dict[tuple[str, str], int] = {}
    extra: dict[tuple[str, str], int] = {}
    by: dict[tuple[str, str], dict] = {}
    for m in models:
        for v in VARIANTS:
            model, prec = setup(m, v)
            assert model.training and torch.is_grad_enabled()
            t = time.perf_counter()
            saved[m, v] = saved_tensor_bytes(partial(prec.forward, x))  # the figure
            seconds = time.perf_counter() - t
            with SavedBytesByOrigin(model) as counted:  # the same forward again, broken down
                out = prec.forward(x)
            assert out.requires_grad, f"{m} {v}: the forward built no graph"
            del out
            assert counted.bytes == saved[m, v] == sum(counted.by.values()), (counted.bytes, saved[m, v])
            by[m, v], extra[m, v] = dict(counted.by), counted.extra()
            print(f"{m} {v}: {saved[m, v] / MiB:.2f} MiB saved, forward {seconds:.1f}s", file=sys.stderr)

    print(f"batch {args.batch_size}, 3x32x32, train mode, {device_name(torch.device('cpu'))} "
          f"({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("saved: bytes saved for backward (saved_tensor_bytes); not weights: of those, the storages that are not "
          "the model's own parameters or buffers")
    print(f"{'model':<10}{'variant':<10}{'saved MiB':>11}{'vs FP32':>9}{'not weights MiB':>17}{'vs FP32':>9}")
    for m in models:
        for v in VARIANTS:
            print(f"{m:<10}{v:<10}{saved[m, v] / MiB:>11.2f}{saved[m, v] / saved[m, 'baseline']:>9.3f}"
                  f"{extra[m, v] / MiB:>17.2f}{extra[m, v] / extra[m, 'baseline']:>9.3f}")

    for v in show:
        for m in models:
            rows = sorted(by[m, v].items(), key=lambda kv: -kv[1])
            total = saved[m, v]
            print(f"\n{m} {v}: {total / MiB:.2f} MiB saved ({total / saved[m, 'baseline']:.3f} of FP32), "
                  "by dtype, saving module and kind")
            print(f"  {'dtype':<10}{'saved by':<20}{'kind':<24}{'MiB':>9}{'share':>8}")
            for (dtype, where, kind), n in rows:
                print(f"  {dtype:<10}{where:<20}{kind:<24}{n / MiB:>9.2f}{n / total:>8.1%}")
            dtypes = defaultdict(int)
            for (dtype, _, _), n in rows:
                dtypes[dtype] += n
            print("  by dtype: " + ", ".join(f"{d} {n / MiB:.2f} MiB ({n / total:.1%})"
                                             for d, n in sorted(dtypes.items(), key=lambda kv: -kv[1])))

    ratios = {m: saved[m, "manual"] / saved[m, "baseline"] for m in models}
    amp = {m: saved[m, "amp-fp16"] / saved[m, "baseline"] for m in models}
    amp_extra = {m: extra[m, "amp-fp16"] / extra[m, "baseline"] for m in models}
    ok = all(r <= TARGET for r in ratios.values())
    print("\nSUMMARY manual/baseline saved bytes: " + ", ".join(f"{m} {r:.4f}" for m, r in ratios.items())
          + f" (target <= {TARGET}); amp-fp16/baseline (not targeted) " + ", ".join(
              f"{m} {amp[m]:.3f} ({amp_extra[m]:.3f} not counting the model's own weights)" for m in models)
          + f": {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
