"""What the tests share: data (a tiny synthetic CIFAR-10 in every format, the real copy when there is one), and
tiny models that train in seconds, with helpers to configure and train them.

A test module that trains the tiny models asks for them with ``pytestmark = pytest.mark.usefixtures("tiny_models")``
(or takes the fixture) and imports the helpers: ``from tests.conftest import CPU, TinyNet, tiny_cfg, train_tiny``.
"""

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CPU = torch.device("cpu")


class TinyNet(nn.Module):
    """conv -> BN -> ReLU -> pool -> linear: the smallest model with every kind of layer a step treats apart."""

    def __init__(self, num_classes=10, batchnorm=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8) if batchnorm else nn.Identity()
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ThreeLayerNet(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> pool -> linear: only the middle conv is FP8 by default."""

    def __init__(self, num_classes=10, pretrained=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.mid = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.stem(x)))
        x = torch.relu(self.bn2(self.mid(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


TINY_MODELS = {"tiny": TinyNet, "three": ThreeLayerNet}


@pytest.fixture
def tiny_models(monkeypatch):
    """The :data:`TINY_MODELS` as mixprec models, by name (``--model tiny``), for this test only."""
    from mixprec import models

    for name, build in TINY_MODELS.items():
        monkeypatch.setitem(models.MODELS, name, build)


def tiny_cfg(**kw):
    """A :class:`~mixprec.config.RunConfig` of the tiny model on the CPU, manual mode unless ``mode`` says
    otherwise (needs the ``tiny_models`` fixture)."""
    from mixprec.config import RunConfig

    kw.setdefault("mode", "manual")
    return RunConfig(model="tiny", device="cpu", **kw)


def train_tiny(tiny_cifar, **kw):
    """``mixprec.train.train`` of :func:`tiny_cfg` on the tiny CIFAR-10: one epoch of batches of 16 unless asked
    otherwise, silent. Returns the :class:`~mixprec.train.RunResult`."""
    from mixprec.data import load_cifar10, make_splits
    from mixprec.train import train

    splits = make_splits(load_cifar10(tiny_cifar["pickles"]))
    kw.setdefault("epochs", 1)
    kw.setdefault("batch_size", 16)
    return train(tiny_cfg(**kw), splits, log=lambda msg: None)


def train_keeping_checkpoint(cfg, splits, **kw):
    """``mixprec.train.train`` of ``cfg``, silent, and the last checkpoint it handed ``on_epoch``, through bytes as
    a checkpoint file is (so that only what torch.save keeps survives)."""
    import io

    from mixprec.train import train

    saved = {}

    def on_epoch(result, state, improved):
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        saved["checkpoint"] = torch.load(buf, weights_only=True)

    return train(cfg, splits, on_epoch=on_epoch, log=lambda msg: None, **kw), saved["checkpoint"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch, request):
    """Synthetic-data tests cache into their own tmp dir; real-data tests share the user's cache."""
    if "real_data" not in request.fixturenames:
        monkeypatch.setenv("MIXPREC_DATA", str(tmp_path / "data_home"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared CIFAR-10 copy not found at {SHARED_DATA}")
    return SHARED_DATA


def _random_split(rng, per_class):
    labels = np.repeat(np.arange(10), per_class)
    rng.shuffle(labels)
    images = rng.integers(0, 256, size=(len(labels), 3, 32, 32), dtype=np.uint8)
    return images, labels


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory):
    """The same random images in all three formats: pickled batches, image folder (PNG), and tar.gz.

    Train: 5 batches of 4 images per class (200); test: 4 per class (40)."""
    root = tmp_path_factory.mktemp("tiny_cifar")
    rng = np.random.default_rng(0)
    train = [_random_split(rng, 4) for _ in range(5)]
    test = _random_split(rng, 4)

    pickles = root / "pickles" / "cifar-10-batches-py"
    pickles.mkdir(parents=True)
    for i, (x, y) in enumerate(train, 1):
        with open(pickles / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": x.reshape(len(x), -1), b"labels": y.tolist()}, f)
    with open(pickles / "test_batch", "wb") as f:
        pickle.dump({b"data": test[0].reshape(len(test[0]), -1), b"labels": test[1].tolist()}, f)
    with open(pickles / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES]}, f)

    folder = root / "folder"
    for split, parts in (("train", train), ("test", [test])):
        n = 0
        for x, y in parts:  # file names keep the pickles' order within each class
            for img, label in zip(x, y):
                d = folder / split / CLASSES[label]
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img.transpose(1, 2, 0)).save(d / f"{n:05d}.png")
                n += 1

    archive = root / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "train", arcname="cifar10/train")
        tar.add(folder / "test", arcname="cifar10/test")
    return {"pickles": root / "pickles", "folder": folder, "tar": archive}
