import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


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
