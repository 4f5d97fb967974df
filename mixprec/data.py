"""CIFAR-10: decode once into a cached ``.npz``, split 45k/5k/10k, and serve batches from one tensor.

Two on-disk formats are accepted, both as torchvision and the shared data copy lay them out:

* the pickled batches ``cifar-10-batches-py/`` (what ``torchvision.datasets.CIFAR10`` downloads);
* an image-folder tree ``train/<class>/*``, ``test/<class>/*``, or a ``.tar``/``.tar.gz`` of one.

Decoding 60,000 JPEGs takes ~20 s on one core, so the decoded uint8 arrays are cached under
``$MIXPREC_DATA`` (default ``~/.cache/mixprec/cifar10``) in ``cache/``, keyed by the source's
path, size and modification time.

:class:`CifarLoader` follows airbench: the whole split lives on the training device as one
uint8 tensor, and the standard augmentation (4-pixel zero-pad random crop, horizontal flip) is
one batched gather instead of per-image PIL transforms.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from tqdm.auto import tqdm

from .cli import UsageError

# Per-channel statistics of the CIFAR-10 training set (the usual constants, e.g. kuangliu/pytorch-cifar).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
VAL_FRACTION = 0.1  # 5,000 of 50,000, as in the seed thesis
SPLIT_SEED = 0  # the validation split and the subsets never depend on the run's --seed
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm")
_PICKLE_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


class DataError(UsageError):
    """The data path is missing, empty, corrupt or of an unknown layout."""


@dataclass
class CIFAR10Arrays:
    """CIFAR-10 as tensors: uint8 images ``N x 3 x 32 x 32`` and int64 labels, train and test."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]


def default_data_dir() -> Path:
    """``$MIXPREC_DATA``, else ``~/.cache/mixprec/cifar10``."""
    return Path(os.environ.get("MIXPREC_DATA") or Path.home() / ".cache" / "mixprec" / "cifar10")


def load_cifar10(path: str | os.PathLike | None = None) -> CIFAR10Arrays:
    """Load CIFAR-10 from ``path`` (see the module docstring for the formats), via the cache.

    With ``path=None`` the default data directory is used, and if it holds no CIFAR-10,
    torchvision downloads the pickled batches into it.

    Example::

        data = load_cifar10("../shared/data/cifar10-jpeg.tar.gz")
        data.train_images.shape  # torch.Size([50000, 3, 32, 32]), dtype uint8
    """
    if path is None:
        path = default_data_dir()
        if _layout(path) is None:
            _download(path)
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data path {path} does not exist; pass --data with a cifar-10-batches-py "
                        "directory or a train/test image folder (or a .tar.gz of one)")
    cache = _cache_file(path)
    if cache.exists():
        try:
            with np.load(cache) as z:
                return CIFAR10Arrays(*(torch.from_numpy(z[k]) for k in
                                       ("train_images", "train_labels", "test_images", "test_labels")),
                                     classes=tuple(str(c) for c in z["classes"]))
        except (OSError, KeyError, ValueError, zlib.error, EOFError):
            pass  # a cache from an older version or a crashed writer: decode again
    arrays = _decode(path)
    _write_cache(arrays, cache)
    return arrays


def _layout(path: Path) -> str | None:
    if path.is_file():
        return "tar" if path.name.endswith((".tar", ".tar.gz", ".tgz")) else None
    if not path.is_dir():
        return None
    if (path / "cifar-10-batches-py").is_dir():
        return "pickle-parent"
    if (path / "batches.meta").exists() or any((path / b).exists() for b in _PICKLE_TRAIN):
        return "pickle"
    if (path / "train").is_dir() and (path / "test").is_dir():
        return "folder"
    return None


def _decode(path: Path) -> CIFAR10Arrays:
    layout = _layout(path)
    if layout == "tar":
        return _decode_tar(path)
    if layout == "pickle-parent":
        return _decode_pickles(path / "cifar-10-batches-py")
    if layout == "pickle":
        return _decode_pickles(path)
    if layout == "folder":
        return _decode_folder(path)
    if path.is_dir() and not any(path.iterdir()):
        raise DataError(f"data directory {path} is empty; put cifar-10-batches-py/ or train/ and test/ "
                        "image folders in it, or pass --data with the right path")
    raise DataError(f"{path} holds no CIFAR-10: expected cifar-10-batches-py/, train/<class>/ and "
                    "test/<class>/ folders, or a .tar/.tar.gz of those")


def _decode_pickles(folder: Path) -> CIFAR10Arrays:
    def read(name):
        f = folder / name
        if not f.exists():
            raise DataError(f"{f} is missing; re-extract cifar-10-python.tar.gz, or delete {folder} "
                            "to download it again")
        try:
            with open(f, "rb") as fh:
                return pickle.load(fh, encoding="bytes")
        except (pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
            raise DataError(f"{f} is corrupt ({type(e).__name__}); re-extract cifar-10-python.tar.gz") from None

    def images_labels(names):
        batches = [read(n) for n in names]
        x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
        y = np.concatenate([b[b"labels"] for b in batches])
        return torch.from_numpy(x.astype(np.uint8)), torch.from_numpy(y.astype(np.int64))

    classes = tuple(n.decode() for n in read("batches.meta")[b"label_names"])
    return CIFAR10Arrays(*images_labels(_PICKLE_TRAIN), *images_labels(("test_batch",)), classes=classes)


def _decode_image(data: bytes, name: str, source: Path) -> np.ndarray:
    """One image file's bytes as a 3x32x32 uint8 array; a :class:`DataError` naming the file (``name``: a tar
    member, or a path in a folder, of ``source``) and the fix when it is not a readable 32x32 image."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        # PIL's message names the in-memory stream (<_io.BytesIO object at 0x...>), which says nothing
        reason = ("not an image format PIL can identify" if isinstance(e, UnidentifiedImageError) else
                  re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e)).strip() or type(e).__name__)
        where = f"{name} in {source}" if source.is_file() else name
        fix = "copy the archive again" if source.is_file() else "replace or delete that file, or copy the data again"
        raise DataError(f"cannot decode image {where} ({reason}): the file is corrupt; {fix}") from None
    if img.shape != (32, 32, 3):
        raise DataError(f"image {name} is {img.shape[1]}x{img.shape[0]}, not 32x32: this is not CIFAR-10")
    return img.transpose(2, 0, 1)


def _assemble(files: dict[tuple[str, str], list[tuple[str, object]]], read, source: Path) -> CIFAR10Arrays:
    """Build arrays from ``{(split, class): [(name, handle), ...]}``, class order = sorted names."""
    classes = tuple(sorted({c for s, c in files if s == "train"}))
    test_classes = tuple(sorted({c for s, c in files if s == "test"}))
    if not classes or classes != test_classes:
        raise DataError(f"{source}: train/ and test/ must hold the same class folders, found "
                        f"{list(classes)} and {list(test_classes)}")
    total = sum(len(v) for v in files.values())
    out = {}
    with tqdm(total=total, desc=f"decoding {source.name}", unit="img", leave=False, disable=None) as bar:
        for split in ("train", "test"):
            images, labels = [], []
            for label, cls in enumerate(classes):
                for name, handle in sorted(files[(split, cls)], key=lambda t: t[0]):
                    images.append(_decode_image(read(handle), name, source))
                    labels.append(label)
                    bar.update()
            out[split] = torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)
    return CIFAR10Arrays(*out["train"], *out["test"], classes=classes)


def _split_class(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """('x', 'train', 'cat', '1.jpg') -> ('train', 'cat') for image files under train/ or test/."""
    if len(parts) >= 3 and parts[-3] in ("train", "test") and parts[-1].lower().endswith(IMAGE_SUFFIXES):
        return parts[-3], parts[-2]
    return None


def _decode_folder(root: Path) -> CIFAR10Arrays:
    files: dict = {}
    for split in ("train", "test"):
        for f in (root / split).glob("*/*"):
            key = _split_class(f.relative_to(root).parts)
            if key:
                files.setdefault(key, []).append((str(f), f))
    return _assemble(files, lambda f: f.read_bytes(), root)


def _decode_tar(path: Path) -> CIFAR10Arrays:
    try:
        with tarfile.open(path, "r|*") as tar:  # one streaming pass: gzip cannot seek back cheaply
            files: dict = {}
            for m in tar:
                key = _split_class(PurePosixPath(m.name).parts) if m.isfile() else None
                if key:
                    files.setdefault(key, []).append((m.name, tar.extractfile(m).read()))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"cannot read archive {path} ({type(e).__name__}: {e}); it is truncated or "
                        "corrupt, copy it again") from None
    return _assemble(files, lambda data: data, path)


def _cache_file(path: Path) -> Path:
    path = path.resolve()
    st = path.stat()
    stamp = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    if path.is_dir():  # a folder's own mtime misses edits deeper down; include its children's
        stamp += "|" + "|".join(f"{c.name}:{c.stat().st_mtime_ns}" for c in sorted(path.iterdir()))
    key = hashlib.sha1(stamp.encode()).hexdigest()[:16]
    return default_data_dir() / "cache" / f"{path.name}-{key}.npz"


def _write_cache(arrays: CIFAR10Arrays, cache: Path) -> None:
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, train_images=arrays.train_images.numpy(), train_labels=arrays.train_labels.numpy(),
                     test_images=arrays.test_images.numpy(), test_labels=arrays.test_labels.numpy(),
                     classes=np.array(arrays.classes))
        os.replace(tmp, cache)
    except OSError as e:  # a read-only home only costs the decode next time
        tmp.unlink(missing_ok=True)
        tqdm.write(f"warning: cannot cache decoded CIFAR-10 at {cache} ({e}); it will be decoded again")


def _download(root: Path) -> None:
    import torchvision

    try:
        root.mkdir(parents=True, exist_ok=True)
        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"CIFAR-10 is not in {root} and downloading it failed ({reason}); put "
                        f"cifar-10-batches-py/ (or train/ and test/ image folders) in {root}, set "
                        "$MIXPREC_DATA, or pass --data PATH") from None


# ---------------------------------------------------------------------------------------------
# splits


def stratified_subset(labels: torch.Tensor, n: int, seed: int = SPLIT_SEED) -> torch.Tensor:
    """Indices of ``n`` of ``labels`` with the class proportions kept, in their original order."""
    from sklearn.model_selection import train_test_split

    total = len(labels)
    if n > total:
        raise UsageError(f"asked for {n} images but only {total} are available; use a smaller number")
    if n == total:
        return torch.arange(total)
    classes = len(torch.unique(labels))
    if n < classes:
        raise UsageError(f"a stratified subset needs at least one image per class ({classes}), got {n}")
    idx, _ = train_test_split(np.arange(total), train_size=n, stratify=labels.numpy(), random_state=seed)
    return torch.from_numpy(np.sort(idx))


@dataclass
class Splits:
    """Train / validation / test tensors (uint8 images, int64 labels) and the class names."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    classes: tuple[str, ...]


def make_splits(data: CIFAR10Arrays, subset: int | None = None, test_subset: int | None = None) -> Splits:
    """The seed thesis's 45k/5k/10k split; the validation split is stratified with a fixed seed.

    ``subset`` keeps a stratified ``subset`` of the 45k training images. ``test_subset`` keeps
    stratified subsets of at most that many images of the validation split and of the test set
    (quick runs only: evaluating 15,000 images can cost more than a short training run)."""
    n_val = round(VAL_FRACTION * len(data.train_labels))
    val_idx = stratified_subset(data.train_labels, n_val)
    train_mask = torch.ones(len(data.train_labels), dtype=torch.bool)
    train_mask[val_idx] = False
    train = data.train_images[train_mask], data.train_labels[train_mask]
    val = data.train_images[val_idx], data.train_labels[val_idx]
    test = data.test_images, data.test_labels
    if subset is not None:
        train = _subset(train, subset, "--subset", "training split")
    if test_subset is not None:
        test = _subset(test, test_subset, "--test-subset", "test set")
        val = _subset(val, min(test_subset, len(val[1])), "--test-subset", "validation split")
    return Splits(train, val, test, data.classes)


def _subset(split: tuple[torch.Tensor, torch.Tensor], n: int, option: str, what: str):
    images, labels = split
    if n > len(labels):
        raise UsageError(f"{option} {n} is larger than the {len(labels)}-image {what}; use at most {len(labels)}")
    keep = stratified_subset(labels, n)
    return images[keep], labels[keep]


# ---------------------------------------------------------------------------------------------
# loader


def random_crop_flip(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``pad``, take a random same-size crop, and flip half the images horizontally.

    The crop is one gather of each image's window from a view of all windows, and the flip one
    ``torch.where``, on the whole batch. The random numbers come from
    a CPU generator so a seed gives the same augmentation on every device."""
    return _crop_flip(images, pad, _draw_crop_flip(len(images), pad, generator))


def _draw_crop_flip(batch: int, pad: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    dy = torch.randint(0, 2 * pad + 1, (batch, 1), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (batch, 1), generator=generator)
    flip = torch.rand(batch, 1, generator=generator) < 0.5
    return dy, dx, flip


def _crop_flip(images: torch.Tensor, pad: int, draws: tuple[torch.Tensor, ...]) -> torch.Tensor:
    b, c, h, w = images.shape
    dev = images.device
    dy, dx, flip = (t.to(dev).view(b) for t in draws)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # a view: b x c x (2 pad + 1) x (2 pad + 1) x h x w
    crops = windows[torch.arange(b, device=dev), :, dy, dx]  # one gather of whole rows: b x c x h x w
    return torch.where(flip.view(b, 1, 1, 1), crops.flip(3), crops)


class CifarLoader:
    """Batches of one split, kept whole on ``device`` as a uint8 tensor.

    ``train=True`` shuffles in a seeded order, applies :func:`random_crop_flip` and drops the last
    partial batch (BatchNorm cannot train on a batch of one); ``train=False`` serves the split in
    order, whole. Batches are normalized float32 ``B x 3 x 32 x 32`` with int64 labels, laid out in
    ``memory_format``.

    As with ``DistributedSampler``, epoch ``e`` draws its order and augmentation from
    ``seed + e``; the epoch advances by one at every pass, or is set with :meth:`set_epoch`, which can
    also start the next pass part-way (a resumed run), with the same batches as an unbroken pass.

    Data-parallel training (``world_size`` > 1): every rank draws the same global batches of
    ``batch_size`` and their augmentation, and yields its ``rank``-th contiguous slice of
    ``batch_size / world_size`` images, so the ranks' shards of an epoch are disjoint and together
    are exactly the single-process epoch.

    Example::

        loader = CifarLoader(images, labels, batch_size=128, train=True, device="cpu", seed=0)
        for x, y in loader:
            ...
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, train: bool,
                 device: torch.device | str, seed: int = 0,
                 mean: tuple[float, ...] = CIFAR10_MEAN, std: tuple[float, ...] = CIFAR10_STD, pad: int = 4,
                 memory_format: torch.memory_format = torch.contiguous_format, rank: int = 0, world_size: int = 1):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 N x C x H x W, got {images.dtype} {tuple(images.shape)}")
        if train and len(images) < batch_size:
            raise UsageError(f"the training split has {len(images)} images, fewer than one batch of "
                             f"{batch_size}; lower --batch-size or raise --subset")
        if train and batch_size % world_size:
            raise UsageError(f"--batch-size {batch_size} (the global batch) does not split evenly over "
                             f"{world_size} processes; use a multiple of {world_size}")
        self.shard = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.train, self.seed, self.pad = batch_size, train, seed, pad
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.memory_format = memory_format  # torch.channels_last for --channels-last
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next pass epoch ``epoch``, starting at its batch ``start_batch``."""
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        n = len(self.labels)
        start, self.start_batch = self.start_batch, 0
        if self.train:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).to(self.labels.device)
            self.epoch += 1
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            if self.train:
                idx = order[sl]
                draws = _draw_crop_flip(len(idx), self.pad, g)  # drawn for skipped batches too
                if i < start:
                    continue
                idx, draws = idx[self.shard], tuple(d[self.shard] for d in draws)  # this rank's slice
                x, y = _crop_flip(self.images[idx], self.pad, draws), self.labels[idx]
            elif i < start:
                continue
            else:
                x, y = self.images[sl], self.labels[sl]
            yield ((x.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format), y
