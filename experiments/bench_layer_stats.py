"""What ``--layer-stats-every`` costs: a training step that measures every layer's gradients, against one that
does not, side by side in one process.

For each model and mode, two ``Precision`` objects from ``setup_precision`` train copies of the same model on
the same random batch (``--batch-size``, CIFAR-sized): ``plain`` (no layer statistics) and ``measured``
(``layer_stats_every=1``: hooks on every Conv2d, Linear and BatchNorm layer, their statistics computed, and
``pop_stats()`` read to the host each step, as the epoch's end would). After ``--warmup`` steps of each, the
two alternate for ``--rounds`` rounds of one step each, and the medians are compared.

The per-step figure is the cost of a step that measures; a run pays it on one step in N, so the run's cost
is about (measured / plain - 1) / N, printed for N = 1, 10, 25, 50 and 100. No target: the option is off by
default, and this says what turning it on costs.

    python experiments/bench_layer_stats.py [--models resnet20,efficientnet_b0] [--modes manual,baseline]
        [--batch-size 64] [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from mixprec.config import RunConfig
from mixprec.device import device_name
from mixprec.models import MODELS, build_model
from mixprec.steps import setup_precision
from mixprec.telemetry import to_host

CADENCES = (1, 10, 25, 50, 100)


def _timed_step(precision, x, y) -> float:
    start = time.perf_counter()
    precision.step(x, y)
    stats = precision.pop_stats()
    if stats:
        to_host({0: stats})  # the host read the epoch's end does, here once per step
    return time.perf_counter() - start


def bench(model_name: str, mode: str, batch_size: int, rounds: int, warmup: int) -> tuple[float, float]:
    """Median seconds of a plain and of a measured step of ``model_name`` in ``mode``."""
    device = torch.device("cpu")
    torch.manual_seed(0)
    base = build_model(model_name)
    variants = {}
    for name, every in (("plain", None), ("measured", 1)):
        cfg = RunConfig(mode=mode, model=model_name, device="cpu", batch_size=batch_size, layer_stats_every=every)
        variants[name] = setup_precision(cfg, copy.deepcopy(base), device)
    x, y = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))
    times = {name: [] for name in variants}
    for r in range(warmup + rounds):
        for name, precision in variants.items():
            t = _timed_step(precision, x, y)
            if r >= warmup:
                times[name].append(t)
    return statistics.median(times["plain"]), statistics.median(times["measured"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20,efficientnet_b0")
    p.add_argument("--modes", default="manual,baseline")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    models, modes = args.models.split(","), args.modes.split(",")
    for m in models:
        if m not in MODELS:
            print(f"bench_layer_stats: error: unknown model {m!r}; pick from {', '.join(MODELS)}", file=sys.stderr)
            return 2
    print(f"{device_name(torch.device('cpu'))}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"batch {args.batch_size}, median of {args.rounds} interleaved rounds")
    print(f"{'model':<18}{'mode':<10}{'plain s':>9}{'measured s':>11}{'ratio':>7}  "
          + "  ".join(f"cost/1 in {n}" for n in CADENCES))
    for model_name in models:
        for mode in modes:
            plain, measured = bench(model_name, mode, args.batch_size, args.rounds, args.warmup)
            extra = measured / plain - 1
            print(f"{model_name:<18}{mode:<10}{plain:>9.3f}{measured:>11.3f}{measured / plain:>7.2f}  "
                  + "  ".join(f"{extra / n:>11.1%}" for n in CADENCES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
