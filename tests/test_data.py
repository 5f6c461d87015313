from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokensparse import data
from tokensparse.data import (
    FashionMNISTClutter,
    box_patch_mask,
    build_dataset,
    build_loader,
    load_fashion_mnist,
    num_classes,
    read_idx,
)

DEBIAN_FILES = Path(data.FASHION_MNIST_DIR) / "train-labels-idx1-ubyte.gz"
needs_debian = pytest.mark.skipif(
    not DEBIAN_FILES.is_file(), reason=f"{DEBIAN_FILES} missing: apt-get install dataset-fashion-mnist"
)


def write_idx(path: Path, array: np.ndarray) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + np.array(array.shape, ">u4").tobytes()
    payload = header + array.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


# Item k of the synthetic set is a solid block at rows 5..19, cols 8+k%4 .. 17+k%4, of brightness 100+k.
N_FAKE = 30


def fake_item(k: int) -> np.ndarray:
    item = np.zeros((28, 28), np.uint8)
    item[5:20, 8 + k % 4 : 18 + k % 4] = 100 + k
    return item


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    images = np.stack([fake_item(k) for k in range(N_FAKE)])
    labels = (np.arange(N_FAKE) % 10).astype(np.uint8)
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", labels)  # not gzipped: both are read
    return tmp_path


def test_read_idx_reads_gz_and_plain_and_rejects_other_files(tmp_path: Path) -> None:
    array = np.arange(24, dtype=">i4").reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "a", array)
    for name in ("a.gz", "a"):
        got = read_idx(tmp_path / name)
        assert got.shape == (2, 3, 4) and got.dtype == np.int32
        np.testing.assert_array_equal(got, np.arange(24).reshape(2, 3, 4))
    (tmp_path / "bad").write_bytes(b"PNG\x00 not idx")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "a").read_bytes()[:-4])
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(tmp_path / "short")


def test_missing_fashion_mnist_names_the_file_and_the_install_command(tmp_path, monkeypatch) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        FashionMNISTClutter(root=missing)
    message = str(err.value)
    assert str(missing / "train-images-idx3-ubyte.gz") in message
    assert "apt-get install dataset-fashion-mnist" in message
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        build_dataset(data.CLUTTER_NAME, split="val")


def test_items_are_deterministic_per_index(fake_root) -> None:
    ds = FashionMNISTClutter("test", root=fake_root, seed=3)
    image, label = ds[5]
    assert torch.equal(image, ds[5][0]) and label == ds[5][1]
    assert torch.equal(
        image, FashionMNISTClutter("test", root=fake_root, seed=3, limit=8)[5][0]
    )  # limit: same items
    assert not torch.equal(image, ds[6][0])
    assert not torch.equal(image, FashionMNISTClutter("test", root=fake_root, seed=4)[5][0])
    assert not torch.equal(image, FashionMNISTClutter("val", root=fake_root, seed=3)[0][0])
    np.random.seed(0)
    torch.manual_seed(0)
    again = ds[5][0]  # the global RNGs play no part
    assert torch.equal(image, again)


def test_image_shape_dtype_range_and_normalisation(fake_root) -> None:
    raw = FashionMNISTClutter("test", root=fake_root, mean=None, std=None, img_size=48)
    image, label = raw[2]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32 and isinstance(label, int)
    assert image.min() >= 0 and image.max() <= 1 and image.max() > 0
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    assert torch.equal(image[0], torch.from_numpy(raw.canvas(2)).float() / 255)
    normed = FashionMNISTClutter("test", root=fake_root, img_size=48)[2][0]
    mean = torch.tensor(data.IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(data.IMAGENET_DEFAULT_STD).view(3, 1, 1)
    torch.testing.assert_close(normed, (image - mean) / std)
    flipped = FashionMNISTClutter(
        "test", root=fake_root, img_size=48, mean=None, std=None, transform=torch.fliplr
    )
    assert torch.equal(flipped[2][0], torch.fliplr(image))


def test_box_holds_exactly_the_object(fake_root) -> None:
    bare = FashionMNISTClutter("test", root=fake_root, num_fragments=0, limit=20)
    tops, lefts = set(), set()
    for k in range(len(bare)):
        top, left, bottom, right = bare.box(k)
        assert 0 <= top < bottom <= 64 and 0 <= left < right <= 64
        assert (bottom - top, right - left) == (15, 10)
        canvas = bare.canvas(k)
        np.testing.assert_array_equal(canvas[top:bottom, left:right], 100 + k)
        canvas[top:bottom, left:right] = 0
        assert not canvas.any()  # nothing outside the box without fragments
        tops.add(top)
        lefts.add(left)
    assert len(tops) > 5 and len(lefts) > 5  # positions vary


def test_fragments_clutter_the_canvas_without_hiding_the_object(fake_root) -> None:
    ds = FashionMNISTClutter("test", root=fake_root, num_fragments=8)
    clutter = 0
    for k in range(20):
        top, left, bottom, right = ds.box(k)
        canvas = ds.canvas(k)
        assert (canvas[top:bottom, left:right] >= 100 + k).all()  # max-combined: the object stays whole
        canvas[top:bottom, left:right] = 0
        values = set(np.unique(canvas).tolist()) - {0}
        assert 100 + k not in values  # fragments come from other items (item k is 100+k bright)
        clutter += bool(values)
    assert clutter >= 18


def test_return_box_and_patch_mask(fake_root) -> None:
    ds = FashionMNISTClutter("test", root=fake_root, return_box=True)
    image, label, box = ds[7]
    assert box.tolist() == list(ds.box(7)) and label == 7
    mask = ds.object_patch_mask(7, patch_size=16)
    assert mask.shape == (4, 4) and mask.dtype == torch.bool
    top, left, bottom, right = ds.box(7)
    for r in range(4):
        for c in range(4):
            overlaps = r * 16 < bottom and (r + 1) * 16 > top and c * 16 < right and (c + 1) * 16 > left
            assert mask[r, c].item() == overlaps


def test_box_patch_mask_edges_and_batches() -> None:
    assert box_patch_mask((0, 0, 1, 1), 64, 16).nonzero().tolist() == [[0, 0]]
    assert box_patch_mask((16, 16, 32, 32), 64, 16).nonzero().tolist() == [[1, 1]]  # exclusive end
    assert box_patch_mask((15, 15, 17, 17), 64, 16).sum() == 4
    boxes = torch.tensor([[0, 0, 64, 64], [40, 8, 50, 9]])
    batch = box_patch_mask(boxes, 64, 8)
    assert batch.shape == (2, 8, 8) and batch[0].all()
    assert batch[1].nonzero().tolist() == [[5, 1], [6, 1]]
    with pytest.raises(ValueError, match="multiple of the patch size"):
        box_patch_mask((0, 0, 1, 1), 60, 16)


@needs_debian
def test_real_fashion_mnist_labels_and_items() -> None:
    with gzip.open(DEBIAN_FILES) as f:  # parsed independently of read_idx
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    images, loaded = load_fashion_mnist("train")
    assert images.shape == (60000, 28, 28) and len(load_fashion_mnist("test")[1]) == 10000
    np.testing.assert_array_equal(loaded, labels)
    assert loaded[:4].tolist() == [9, 0, 0, 3]  # Ankle boot, T-shirt, T-shirt, Dress
    ds = build_dataset(data.CLUTTER_NAME, split="test", limit=50, mean=None, std=None, num_fragments=0)
    images, labels = load_fashion_mnist("test")
    assert len(ds) == 50 and num_classes(ds) == 10
    for k in (0, 17, 49):
        image, label = ds[k]
        assert label == labels[k]
        top, left, bottom, right = ds.box(k)
        rows, cols = np.nonzero(images[k])
        assert (bottom - top, right - left) == (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
        assert image[0].sum() * 255 == pytest.approx(float(images[k].sum()), rel=1e-5)  # whole item on canvas
    test = build_dataset(data.CLUTTER_NAME, split="test", limit=3)
    assert test.split == "test" and test[0][0].shape == (3, 64, 64)
    val = build_dataset(data.CLUTTER_NAME, split="val")
    train = build_dataset(data.CLUTTER_NAME, split="train")
    assert val.split == "val" and len(val) == 5000 and len(train) == 55000
    assert not set(val.items.tolist()) & set(train.items.tolist())  # validation items never train


def make_image_folder(root: Path, classes=("cat", "dog", "owl"), per_class: int = 2) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_image_folder_dataset_and_class_count(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    train = build_dataset("folder", root=tmp_path, split="train", img_size=32)
    val = build_dataset("folder", root=tmp_path, split="val", img_size=32)
    assert len(train) == 6 and len(val) == 6
    assert num_classes(train) == 3 and num_classes(val) == 3
    image, label = val[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 2
    assert torch.equal(val[0][0], val[0][0])  # eval transform: no randomness
    limited = build_dataset("folder", root=tmp_path, split="train", img_size=32, limit=4)
    assert len(limited) == 4 and num_classes(limited) == 3


def test_missing_image_folder_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        build_dataset("folder", root=tmp_path / "absent")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "val")):
        build_dataset("folder", root=tmp_path, split="val")
    with pytest.raises(ValueError, match="needs --data-root"):
        build_dataset("folder")
    with pytest.raises(ValueError, match="unknown data set 'imagenette'"):
        build_dataset("imagenette", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="torch/cifar10 not found under"):
        build_dataset("torch/cifar10", root=tmp_path / "absent", split="train")


def test_loader_seeded_shuffle_per_epoch_and_in_order_eval(fake_root) -> None:
    ds = FashionMNISTClutter("test", root=fake_root, limit=12)
    first = build_loader(ds, batch_size=4, seed=1)
    labels = [y.tolist() for _, y in first]
    assert len(labels) == 3 and sorted(sum(labels, [])) == sorted(int(ds.labels[k]) for k in range(12))
    assert [y.tolist() for _, y in build_loader(ds, batch_size=4, seed=1)] == labels
    order = list(first.sampler)
    first.sampler.set_epoch(1)
    assert sorted(list(first.sampler)) == sorted(order) and list(first.sampler) != order
    evaluation = build_loader(ds, batch_size=5, is_training=False)
    evaluation.sampler.set_epoch(3)
    assert list(evaluation.sampler) == list(range(12))
    images, targets = next(iter(evaluation))
    assert images.shape == (5, 3, 64, 64) and targets.tolist() == [0, 1, 2, 3, 4]


def test_loader_shards_per_rank(fake_root, monkeypatch) -> None:
    ds = FashionMNISTClutter("test", root=fake_root, limit=11)
    shards = {}
    for rank in (0, 1):
        monkeypatch.setattr(data, "_rank_and_world", lambda rank=rank: (rank, 2))
        shards[rank] = list(build_loader(ds, batch_size=2, is_training=False).sampler)
        train = list(build_loader(ds, batch_size=2, seed=5).sampler)
        assert len(train) == 6
        shards[rank, "train"] = train
    assert sorted(shards[0] + shards[1]) == list(range(11))  # eval: each item once, no padding
    assert set(shards[0, "train"]) | set(shards[1, "train"]) == set(range(11))
    assert isinstance(build_loader(ds, batch_size=2).sampler, torch.utils.data.DistributedSampler)


def test_splits_partition_the_training_items_and_test_is_apart(fake_root) -> None:
    train = FashionMNISTClutter("train", root=fake_root)
    val = FashionMNISTClutter("val", root=fake_root)
    test = FashionMNISTClutter("test", root=fake_root)
    assert len(val) == N_FAKE // data.VAL_FRACTION and len(train) + len(val) == N_FAKE
    assert sorted(train.items.tolist() + val.items.tolist()) == list(range(N_FAKE))
    assert test.items.tolist() == list(range(N_FAKE))
    for k in range(len(val)):  # a validation canvas shows its own item and only validation fragments
        item = int(val.items[k])
        assert val[k][1] == item % 10
        values = set(np.unique(val.canvas(k)).tolist()) - {0}
        assert values <= {100 + int(i) for i in val.items}
    assert build_dataset(data.CLUTTER_NAME, root=fake_root, split="validation").split == "val"
    assert build_dataset(data.CLUTTER_NAME, root=fake_root, split="test").split == "test"
    with pytest.raises(ValueError, match="split must be"):
        FashionMNISTClutter("holdout", root=fake_root)


def test_training_canvases_are_fresh_every_epoch_and_reproducible(fake_root) -> None:
    train = FashionMNISTClutter("train", root=fake_root)
    assert train.fresh_layouts
    first = [train[k][0] for k in range(8)]
    train.set_epoch(1)
    second = [train[k][0] for k in range(8)]
    assert sum(not torch.equal(a, b) for a, b in zip(first, second)) >= 7  # new layouts
    assert [train[k][1] for k in range(8)] == [train.labels[train.items[k]] for k in range(8)]
    again = FashionMNISTClutter("train", root=fake_root)
    again.set_epoch(1)  # a resumed run at epoch 1 sees the same canvases
    assert all(torch.equal(a, again[k][0]) for k, a in enumerate(second))
    for split in ("val", "test"):  # evaluation canvases never change
        fixed = FashionMNISTClutter(split, root=fake_root)
        before = fixed[1][0]
        fixed.set_epoch(5)
        assert not fixed.fresh_layouts and torch.equal(before, fixed[1][0])


def test_fresh_subset_draws_each_epoch_from_the_whole_split(fake_root) -> None:
    """A short epoch (`limit` items) visits every item over a run, reproducibly; the first-n limit does not."""
    subset = build_dataset(
        "fashion-mnist-clutter", fake_root, "train", limit=8, fresh_subset=True, limit_seed=3
    )
    whole = FashionMNISTClutter("train", root=fake_root)
    assert len(subset) == 8 and num_classes(subset) == 10

    def labels_and_brightness(epoch: int) -> list[tuple[int, int]]:
        subset.set_epoch(epoch)
        return [
            (int(subset[i][1]), int(subset.dataset.canvas(int(subset.indices[i])).max())) for i in range(8)
        ]

    first, second = labels_and_brightness(0), labels_and_brightness(1)
    assert first != second
    assert labels_and_brightness(0) == first  # the same epoch, the same items (a resumed run)
    seen = set()
    for epoch in range(12):
        subset.set_epoch(epoch)
        seen |= set(subset.indices.tolist())
        assert subset.dataset.epoch == epoch  # fresh canvases reach the wrapped set too
    assert seen == set(range(len(whole)))
    other_seed = build_dataset(
        "fashion-mnist-clutter", fake_root, "train", limit=8, fresh_subset=True, limit_seed=4
    )
    assert (
        other_seed.indices.tolist()
        != build_dataset(
            "fashion-mnist-clutter", fake_root, "train", limit=8, fresh_subset=True, limit_seed=3
        ).indices.tolist()
    )
    fixed = build_dataset("fashion-mnist-clutter", fake_root, "train", limit=8)
    fixed.set_epoch(5)
    assert len(fixed) == 8 and fixed._item(7) == int(whole.items[7])  # the first-n limit stays the first n
    with pytest.raises(IndexError):
        subset[8]
