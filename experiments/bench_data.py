"""mixprec's CifarLoader against a torchvision CIFAR10-style DataLoader: training images per second.

One full epoch of the 45,000-image training split (``make_splits``) through each pipeline, both
with the standard augmentation (4-pixel zero-pad random crop, horizontal flip) and normalization,
on CPU, batch 128, every batch consumed (``x.sum()``):

* ``CifarLoader``: mixprec's loader (``train=True``): the split is one uint8 tensor, and crop, flip
  and normalization are batched tensor ops in the main process.
* ``torchvision``: a Dataset that returns ``PIL.Image.fromarray(HWC uint8)`` per index exactly as
  ``torchvision.datasets.CIFAR10.__getitem__`` does, with ``Compose([RandomCrop(32, padding=4),
  RandomHorizontalFlip(), ToTensor(), Normalize(mean, std)])`` (CifarLoader's mean and std), in a
  ``DataLoader(batch_size=128, shuffle=True, num_workers=2)``. Its epoch includes starting the
  two workers, as every epoch does without ``persistent_workers``.

The two run alternately, ``--rounds`` epochs each in one process, and the median epoch of each is
reported. CifarLoader drops the last partial batch (44,928 images a pass), the DataLoader does
not (45,000): images/s counts the images each actually served. Target (issue: data pipeline):
CifarLoader / torchvision images/s >= 10. Exits 1 when the target is missed, 2 when the data
cannot be loaded.

    python experiments/bench_data.py [--data ../shared/data/cifar10-jpeg.tar.gz] [--rounds 3]
        [--batch-size 128] [--workers 2] [--images 45000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from mixprec.cli import UsageError
from mixprec.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CifarLoader,
    load_cifar10,
    make_splits,
)
from mixprec.device import device_name

TARGET = 10.0
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


class CIFAR10Like(torch.utils.data.Dataset):
    """``torchvision.datasets.CIFAR10`` without the files: ``data`` is N x 32 x 32 x 3 uint8 (HWC, a transposed
    view of the N x 3 x 32 x 32 array, as torchvision keeps it), ``targets`` a list of ints, and
    ``__getitem__`` is torchvision's own."""

    def __init__(self, images_nchw: torch.Tensor, labels: torch.Tensor, transform=None):
        self.data = images_nchw.numpy().transpose((0, 2, 3, 1))  # convert to HWC
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        img, target = self.data[index], self.targets[index]
        # doing this so that it is consistent with all other datasets to return a PIL Image
        img = Image.fromarray(img)
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def epoch(loader) -> tuple[float, int]:
    """Seconds for one pass over ``loader`` with every batch touched, and the images served."""
    t = time.perf_counter()
    n, total = 0, torch.zeros(())
    for x, y in loader:
        total += x.sum()
        n += len(y)
    float(total)
    return time.perf_counter() - t, n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 as load_cifar10 reads it (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="epochs of each pipeline, alternating")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="DataLoader num_workers")
    p.add_argument("--images", type=int, default=None, help="a stratified subset of the 45k train split (quick runs)")
    args = p.parse_args()

    try:
        train = make_splits(load_cifar10(args.data), subset=args.images).train
    except UsageError as e:  # DataError included: a missing or broken data path
        print(f"bench_data: error: {e}", file=sys.stderr)
        return 2

    import torchvision
    from torchvision import transforms as T

    images, labels = train
    ours = CifarLoader(images, labels, args.batch_size, train=True, device="cpu", seed=0)
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    theirs = torch.utils.data.DataLoader(CIFAR10Like(images, labels, transform), batch_size=args.batch_size,
                                         shuffle=True, num_workers=args.workers)
    loaders = {"CifarLoader": ours, "torchvision": theirs}
    load_start = os.getloadavg()[0]
    if load_start >= (os.cpu_count() or 1):
        print(f"warning: load average {load_start:.1f} on {os.cpu_count()} cores: other processes will skew the "
              "timings", file=sys.stderr)

    times = {name: [] for name in loaders}
    served = {}
    for r in range(args.rounds):
        for name, loader in loaders.items():
            seconds, served[name] = epoch(loader)
            times[name].append(seconds)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {v[-1]:.2f}s" for n, v in times.items()),
              file=sys.stderr)

    rate = {n: served[n] / statistics.median(v) for n, v in times.items()}
    print(f"{len(labels)} train images, batch {args.batch_size}, {device_name(torch.device('cpu'))} "
          f"({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, {torch.get_num_threads()} threads, {args.workers} DataLoader workers, "
          f"median of {args.rounds} epochs, load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print(f"{'pipeline':<14}{'images':>8}{'median s':>10}{'images/s':>11}   epochs s")
    for n in loaders:
        print(f"{n:<14}{served[n]:>8}{statistics.median(times[n]):>10.2f}{rate[n]:>11.0f}   "
              + " ".join(f"{s:.2f}" for s in times[n]))
    ratio = rate["CifarLoader"] / rate["torchvision"]
    ok = ratio >= TARGET
    print(f"SUMMARY CifarLoader/torchvision images/s: {ratio:.1f}x (target >= {TARGET:g}x): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
