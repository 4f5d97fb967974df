"""Overhead of mixprec's training loop: baseline mode's epoch as ``train`` runs it, against a bare loop.

Both variants train resnet20 (same architecture and initial weights) on CPU over the same
``CifarLoader`` batches of a fixed stratified subset of the real 45k training split (``--batches``
batches of ``--batch-size``; default 20 x 128 = 2,560 images), augmentation included:

* ``harness``: ``mixprec.train._train_epoch`` with the baseline ``Precision`` of
  ``setup_precision(RunConfig(mode="baseline", model="resnet20", ...))`` and its scheduler from
  ``make_scheduler``; the run's ``memory`` is given (a dict), so no step measures memory; ``stop=None``,
  ``partial=None``. Everything the loop does per step is timed: the lr log, the step, the
  scheduler, the loss and accuracy bookkeeping, the periodic host sync, the per-step rows.
* ``bare``: ``for x, y in loader: opt.zero_grad(set_to_none=True); F.cross_entropy(model(x), y)
  .backward(); opt.step()``, with the optimizer ``setup_precision`` builds for baseline mode (SGD lr
  0.1, momentum 0.9, weight decay 5e-4, no Nesterov: ``steps._sgd`` passes no ``nesterov``).

Each pass is one epoch of the subset; pass ``r`` of both variants serves the same batches
(``loader.set_epoch(r)``). One warm-up pass of each, then ``--rounds`` rounds of one pass each,
interleaved, and the medians. Target (issue: harness overhead): harness / bare images/s >= 0.97,
on the medians. The per-round ratios (same round, adjacent passes) are printed for context: they
show whether a miss is the harness or the machine drifting during the run.
Exits 1 when the target is missed, 2 when the data cannot be loaded.

    python experiments/bench_harness.py [--data ../shared/data/cifar10-jpeg.tar.gz] [--batches 20]
        [--batch-size 128] [--rounds 5] [--model resnet20] [--profile]

``--profile`` then profiles one more pass of each variant with cProfile and prints the functions
with the most own time to stderr (not part of the timed figures).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mixprec.cli import UsageError
from mixprec.config import RunConfig
from mixprec.data import CifarLoader, load_cifar10, make_splits
from mixprec.device import device_name
from mixprec.models import build_model
from mixprec.steps import setup_precision
from mixprec.train import Loop, RunResult, _train_epoch, make_scheduler

TARGET = 0.97
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 as load_cifar10 reads it (default: %(default)s)")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batches", type=int, default=20, help="batches per pass (the subset is batches x batch size)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="cProfile one extra pass of each variant (stderr)")
    args = p.parse_args()

    n_images = args.batches * args.batch_size
    try:
        cfg = RunConfig(mode="baseline", model=args.model, batch_size=args.batch_size, device="cpu", epochs=1)
        images, labels = make_splits(load_cifar10(args.data), subset=n_images).train
    except UsageError as e:  # DataError included: a missing or broken data path
        print(f"bench_harness: error: {e}", file=sys.stderr)
        return 2

    device = torch.device("cpu")
    torch.manual_seed(0)
    harness_model = build_model(args.model).to(device)
    bare_model = copy.deepcopy(harness_model)  # the same initial weights
    precision = setup_precision(cfg, harness_model, device)
    harness_loader = CifarLoader(images, labels, args.batch_size, train=True, device=device, seed=0)
    scheduler = make_scheduler(cfg, precision.optimizer, len(harness_loader))
    bare_loader = CifarLoader(images, labels, args.batch_size, train=True, device=device, seed=0)
    group = precision.optimizer.param_groups[0]
    bare_opt = torch.optim.SGD(bare_model.parameters(), lr=group["lr"], momentum=group["momentum"],
                               weight_decay=group["weight_decay"], nesterov=group["nesterov"])
    # memory not None: _train_epoch measures memory only when the run has no breakdown yet
    result = RunResult("completed", None, str(device), None, None, 0, memory={})
    loop = Loop(cfg, harness_model, precision, scheduler, harness_loader, device, result, scaled=False)

    def harness(epoch: int) -> None:
        result.steps += _train_epoch(loop, epoch, None).steps

    def bare(epoch: int) -> None:
        bare_model.train()
        bare_loader.set_epoch(epoch)
        for x, y in bare_loader:
            bare_opt.zero_grad(set_to_none=True)
            F.cross_entropy(bare_model(x), y).backward()
            bare_opt.step()

    variants = {"harness": harness, "bare": bare}
    load_start = os.getloadavg()[0]
    if load_start >= (os.cpu_count() or 1):
        print(f"warning: load average {load_start:.1f} on {os.cpu_count()} cores: other processes will skew the "
              "timings", file=sys.stderr)
    for fn in variants.values():
        fn(0)  # warm-up
    times = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn(r + 1)
            times[name].append(time.perf_counter() - t)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {v[-1]:.2f}s" for n, v in times.items()),
              file=sys.stderr)

    load_end = os.getloadavg()[0]
    if args.profile:
        for name, fn in variants.items():
            prof = cProfile.Profile()
            prof.runcall(fn, args.rounds + 1)
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
            print(f"--- cProfile of one {name} pass ---\n{out.getvalue()}", file=sys.stderr)

    images_per_pass = len(harness_loader) * args.batch_size
    rate = {n: images_per_pass / statistics.median(v) for n, v in times.items()}
    print(f"{args.model}, batch {args.batch_size}, {len(harness_loader)} batches ({images_per_pass} images) a pass, "
          f"{device_name(device)} ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds, load average {load_start:.1f} at start, "
          f"{load_end:.1f} at end")
    print(f"{'variant':<10}{'median s':>10}{'images/s':>10}   passes s")
    for n in variants:
        passes = " ".join(f"{s:.3f}" for s in times[n])
        print(f"{n:<10}{statistics.median(times[n]):>10.3f}{rate[n]:>10.1f}   {passes}")
    paired = [b / h for h, b in zip(times["harness"], times["bare"])]  # context only: the target is on the medians
    print("per round, harness/bare images/s: " + " ".join(f"{q:.3f}" for q in paired)
          + f" (median {statistics.median(paired):.3f}; the harness runs first in each round)")
    ratio = rate["harness"] / rate["bare"]
    ok = ratio >= TARGET
    print(f"SUMMARY harness/bare images/s: {ratio:.3f} (target >= {TARGET}): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
