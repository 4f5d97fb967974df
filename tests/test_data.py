import gzip
import shutil
import tarfile

import pytest
import torch
from PIL import Image

from mixprec import data as data_mod
from mixprec.cli import UsageError
from mixprec.data import CifarLoader, DataError, load_cifar10, make_splits, random_crop_flip


def _per_class(arrays, split):
    x, y = getattr(arrays, f"{split}_images"), getattr(arrays, f"{split}_labels")
    return [x[y == c] for c in range(10)]


def test_formats_decode_to_the_same_images(tiny_cifar):
    pickled = load_cifar10(tiny_cifar["pickles"])
    assert pickled.train_images.shape == (200, 3, 32, 32) and pickled.train_images.dtype == torch.uint8
    assert pickled.train_labels.dtype == torch.int64 and pickled.test_images.shape == (40, 3, 32, 32)
    assert pickled.classes[0] == "airplane" and len(pickled.classes) == 10
    for fmt in ("folder", "tar"):
        other = load_cifar10(tiny_cifar[fmt])
        assert other.classes == pickled.classes
        for split in ("train", "test"):
            for a, b in zip(_per_class(pickled, split), _per_class(other, split)):
                assert torch.equal(a, b), f"{fmt} {split} differs from the pickled batches"


def test_second_load_comes_from_the_cache(tiny_cifar, monkeypatch):
    first = load_cifar10(tiny_cifar["tar"])
    monkeypatch.setattr(data_mod, "_decode", lambda path: pytest.fail("decoded again instead of using the cache"))
    again = load_cifar10(tiny_cifar["tar"])
    assert torch.equal(first.train_images, again.train_images)


@pytest.mark.parametrize("case", ["missing", "empty", "truncated", "missing_batch", "not_cifar"])
def test_bad_data_paths_raise_a_clear_error(case, tiny_cifar, tmp_path):
    if case == "missing":
        path, expect = tmp_path / "nope", "does not exist"
    elif case == "empty":
        path, expect = tmp_path / "empty", "is empty"
        path.mkdir()
    elif case == "truncated":
        path, expect = tmp_path / "cut.tar.gz", "truncated or corrupt"
        raw = tiny_cifar["tar"].read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif case == "missing_batch":
        path, expect = tmp_path / "p" / "cifar-10-batches-py", "data_batch_3"
        path.mkdir(parents=True)
        for f in (tiny_cifar["pickles"] / "cifar-10-batches-py").iterdir():
            if f.name != "data_batch_3":
                (path / f.name).write_bytes(f.read_bytes())
    else:
        path, expect = tmp_path / "other", "holds no CIFAR-10"
        path.mkdir()
        (path / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match=expect) as err:
        load_cifar10(path)
    assert "\n" not in str(err.value)


def test_corrupt_gzip_stream_is_a_data_error(tmp_path):
    path = tmp_path / "bad.tar.gz"
    path.write_bytes(gzip.compress(b"x" * 1000)[:-20] + b"garbage")
    with pytest.raises(DataError, match=r"^cannot read archive .*bad\.tar\.gz \((BadGzipFile|EOFError|ReadError)"
                                         r".*\); it is truncated or"):
        load_cifar10(path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
@pytest.mark.parametrize("form", ["tar", "folder"])
def test_a_corrupt_image_is_named_with_the_fix_in_one_line(form, damage, tiny_cifar, tmp_path):
    folder = tmp_path / "cifar10"
    shutil.copytree(tiny_cifar["folder"], folder)
    png = sorted((folder / "train").glob("*/*.png"))[1]
    victim = png.with_suffix(".jpg")  # the shared copy's format
    Image.open(png).save(victim, quality=95)
    png.unlink()
    raw = victim.read_bytes()
    victim.write_bytes(b"not an image at all" if damage == "garbage" else raw[: len(raw) // 2])
    member = f"cifar10/train/{victim.parent.name}/{victim.name}"
    path = folder
    if form == "tar":
        path = tmp_path / "data.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            tar.add(folder / "train", arcname="cifar10/train")
            tar.add(folder / "test", arcname="cifar10/test")
    with pytest.raises(DataError) as err:
        load_cifar10(path)
    msg = str(err.value)
    assert "\n" not in msg and "BytesIO" not in msg and "0x" not in msg
    if form == "tar":
        assert f"cannot decode image {member} in {path} (" in msg and msg.endswith("; copy the archive again")
    else:
        assert f"cannot decode image {victim} (" in msg and "replace or delete that file" in msg


def test_splits_are_stratified_disjoint_and_fixed(tiny_cifar):
    arrays = load_cifar10(tiny_cifar["pickles"])
    s = make_splits(arrays)
    assert len(s.train[1]) == 180 and len(s.val[1]) == 20 and len(s.test[1]) == 40  # 90/10 like 45k/5k
    assert torch.bincount(s.val[1]).tolist() == [2] * 10
    train_rows = {bytes(x.numpy()) for x in s.train[0]}
    assert not train_rows & {bytes(x.numpy()) for x in s.val[0]}
    assert torch.equal(make_splits(arrays).val[0], s.val[0])  # independent of any run seed

    small = make_splits(arrays, subset=50, test_subset=20)
    assert torch.bincount(small.train[1]).tolist() == [5] * 10
    assert torch.bincount(small.test[1]).tolist() == [2] * 10
    assert len(small.val[1]) == 20
    with pytest.raises(UsageError, match="larger than the 180-image training split"):
        make_splits(arrays, subset=181)
    with pytest.raises(UsageError, match="at least one image per class"):
        make_splits(arrays, subset=5)


def _loader(arrays, train, seed=0, batch_size=32):
    return CifarLoader(arrays.train_images, arrays.train_labels, batch_size, train=train, device="cpu", seed=seed)


def test_loader_batches_shapes_and_normalization(tiny_cifar):
    arrays = load_cifar10(tiny_cifar["pickles"])
    train = list(_loader(arrays, True))
    assert len(train) == 200 // 32  # the last partial batch is dropped in training
    x, y = train[0]
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    evaluation = list(_loader(arrays, False))
    assert sum(len(b[1]) for b in evaluation) == 200  # evaluation keeps every image
    x, _ = evaluation[0]
    mean = torch.tensor(data_mod.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data_mod.CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (arrays.train_images[:32].float() / 255 - mean) / std)


def test_seeded_order_repeats_and_epochs_differ(tiny_cifar):
    arrays = load_cifar10(tiny_cifar["pickles"])
    a, b = _loader(arrays, True, seed=3), _loader(arrays, True, seed=3)
    epoch0 = [y for _, y in a]
    assert all(torch.equal(p, q) for p, q in zip(epoch0, (y for _, y in b)))
    epoch1 = [y for _, y in a]
    assert not all(torch.equal(p, q) for p, q in zip(epoch0, epoch1))
    a.set_epoch(0)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(list(a), list(_loader(arrays, True, seed=3))))
    assert not all(torch.equal(p, q) for p, q in zip(epoch0, (y for _, y in _loader(arrays, True, seed=4))))


def test_augmentation_is_a_padded_crop_with_optional_flip(tiny_cifar):
    images = load_cifar10(tiny_cifar["pickles"]).train_images[:16]
    out = random_crop_flip(images, 4, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(out, images)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    flips = 0
    for img, aug in zip(padded, out):
        crops = {(dy, dx, f): (img[:, dy:dy + 32, dx:dx + 32].flip(2) if f else img[:, dy:dy + 32, dx:dx + 32])
                 for dy in range(9) for dx in range(9) for f in (0, 1)}
        match = [k for k, c in crops.items() if torch.equal(c, aug)]
        assert match, "augmented image is not a crop of the padded image"
        flips += match[0][2]
    assert 0 < flips < 16


def test_loader_rejects_a_split_smaller_than_a_batch(tiny_cifar):
    arrays = load_cifar10(tiny_cifar["pickles"])
    with pytest.raises(UsageError, match="fewer than one batch"):
        _loader(arrays, True, batch_size=256)


def test_a_pass_started_part_way_serves_the_same_batches(tiny_cifar):
    arrays = load_cifar10(tiny_cifar["pickles"])
    full = list(_loader(arrays, True, seed=5))
    late = _loader(arrays, True, seed=5)
    late.set_epoch(0, start_batch=3)
    rest = list(late)
    assert len(rest) == len(full) - 3
    for (xa, ya), (xb, yb) in zip(full[3:], rest):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert late.epoch == 1 and len(list(late)) == len(full)  # the next pass is whole again
