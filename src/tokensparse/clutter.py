"""The built-in data set `fashion-mnist-clutter`: each Fashion-MNIST item (Debian's
`dataset-fashion-mnist`, read from its idx files) at a random place on a larger canvas strewn with
fragments of other items, its box kept so a policy's kept tokens can be checked against the object.
`tokensparse.data.build_dataset` builds it by name."""

from __future__ import annotations

import functools
import gzip
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
)
from torch.utils.data import Dataset

CLUTTER_NAME = "fashion-mnist-clutter"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist puts it
FASHION_MNIST_ENV = "TOKENSPARSE_FASHION_MNIST_DIR"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_TRAIN_SPLITS = ("train", "training")
_EVAL_SPLITS = ("val", "valid", "validation", "eval", "evaluation", "test")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

Box = tuple[int, int, int, int]  # (top, left, bottom, right) in canvas pixels, bottom/right exclusive


# ---------------------------------------------------------------------------------------------------
# Fashion-MNIST from Debian's idx files


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An array from an idx file (the MNIST format), gzipped or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{path}: header says shape {shape} but the file holds {len(data) - offset} bytes")
    return np.frombuffer(data, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder with the idx files: `root`, else $TOKENSPARSE_FASHION_MNIST_DIR, else Debian's path."""
    return Path(root or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"Fashion-MNIST file not found: {folder / (stem + '.gz')} (nor {folder / stem}). "
        f"Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files go to "
        f"{FASHION_MNIST_DIR}), or point --data-root DIR (root= in Python) or ${FASHION_MNIST_ENV} at a folder "
        "holding the idx files."
    )


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (N, 28, 28) uint8 and labels (N,) int64, read once per process."""
    if split not in _FASHION_MNIST_FILES:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    return _load_fashion_mnist(split, fashion_mnist_dir(root).resolve())


@functools.lru_cache(maxsize=4)
def _load_fashion_mnist(split: str, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    image_stem, label_stem = _FASHION_MNIST_FILES[split]
    images = read_idx(_find_idx(folder, image_stem))
    labels = read_idx(_find_idx(folder, label_stem)).astype(np.int64)
    if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
        raise ValueError(
            f"{folder}: unexpected Fashion-MNIST arrays {images.shape} {images.dtype}, {labels.shape}"
        )
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


# ---------------------------------------------------------------------------------------------------
# The cluttered data set


class _Layout(NamedTuple):
    top: int
    left: int
    sources: np.ndarray  # (k,) indices of the items the fragments are cut from
    crops: np.ndarray  # (k, 2) top-left of each fragment inside its source item
    places: np.ndarray  # (k, 2) top-left of each fragment on the canvas


def validation_items(num_items: int, seed: int = 0) -> np.ndarray:
    """The Fashion-MNIST training items held out as the clutter set's `val` split (sorted indices).

    A fixed, seeded twelfth of the training items (5000 of 60000): settings are chosen on them, so
    Fashion-MNIST's own test split stays for reported numbers only.
    """
    count = max(1, num_items // VAL_FRACTION)
    return np.sort(np.random.default_rng([seed, 7]).permutation(num_items)[:count])


VAL_FRACTION = 12
_SPLIT_CODES = {"train": 0, "test": 1, "val": 2}


class FashionMNISTClutter(Dataset):
    """Fashion-MNIST items at random positions on a canvas strewn with fragments of other items.

    Splits: `train` (Fashion-MNIST's training items less the held-out twelfth), `val` (that twelfth,
    for choosing settings) and `test` (Fashion-MNIST's test items, for reported numbers only).
    The canvas gets `num_fragments` crops (`fragment_size` square) of other items of the split at
    random places, then the 28x28 item at a random place, combined by pixel-wise max so the object is
    never hidden. With `fresh_layouts` (the default for `train`) the layout of item `i` is drawn anew
    each epoch from (seed, split, epoch, i): call `set_epoch(epoch)` (the training loop does), and a
    resumed run sees the same canvases. Otherwise (`val`, `test`) item `i` is a function of
    (seed, split, i) alone, whatever the worker, epoch or `limit`.
    Returns (image, label), or (image, label, box) with `return_box`; the image is a (3, H, W) float
    tensor normalised with `mean`/`std`. The default is timm's ImageNet statistics, what pretrained timm
    ViTs (DeiT, the backbone of DynamicViT and A-ViT) expect; pass the model's own data config for
    others, or `mean=None, std=None` for pixels in [0, 1]. `transform`, when given, is applied last.
    There is no other random augmentation: the data set's randomness is the per-index layout.
    """

    object_size = 28
    classes = FASHION_MNIST_CLASSES
    num_classes = len(FASHION_MNIST_CLASSES)

    def __init__(
        self,
        split: str = "train",
        img_size: int = 64,
        num_fragments: int = 8,
        fragment_size: int = 8,
        seed: int = 0,
        limit: int | None = None,
        mean: tuple[float, ...] | None = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, ...] | None = IMAGENET_DEFAULT_STD,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        return_box: bool = False,
        root: str | os.PathLike | None = None,
        fresh_layouts: bool | None = None,
    ) -> None:
        if split not in _SPLIT_CODES:
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if img_size < self.object_size:
            raise ValueError(f"img_size must be at least {self.object_size}, got {img_size}")
        if not 1 <= fragment_size <= self.object_size or num_fragments < 0:
            raise ValueError(
                f"need 1 <= fragment_size <= 28 and num_fragments >= 0, got {fragment_size}, {num_fragments}"
            )
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 (or None for all items), got {limit}")
        self.images, self.labels = load_fashion_mnist("test" if split == "test" else "train", root)
        if split == "test":
            self.items = np.arange(len(self.labels))
        else:
            held_out = validation_items(len(self.labels))
            if split == "val":
                self.items = held_out
            else:
                self.items = np.setdiff1d(np.arange(len(self.labels)), held_out)
        self.split, self.img_size, self.seed = split, img_size, seed
        self.fresh_layouts = split == "train" if fresh_layouts is None else bool(fresh_layouts)
        self.epoch = 0
        self.num_fragments, self.fragment_size = num_fragments, fragment_size
        self.length = len(self.items) if limit is None else min(limit, len(self.items))
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.transform = transform
        self.return_box = return_box

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """With fresh layouts, the canvases of `epoch` (a no-op otherwise)."""
        self.epoch = int(epoch)

    def _check(self, index: int) -> int:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        return index % self.length

    def _item(self, index: int) -> int:
        """The Fashion-MNIST index of position `index` of this split."""
        return int(self.items[self._check(index)])

    def _layout(self, index: int) -> _Layout:
        key = [self.seed, _SPLIT_CODES[self.split], index]
        if self.fresh_layouts:
            key.insert(2, self.epoch + 1)
        rng = np.random.default_rng(key)
        k, f, n = self.num_fragments, self.fragment_size, len(self.items)
        top, left = rng.integers(0, self.img_size - self.object_size + 1, size=2)
        positions = rng.integers(0, max(n - 1, 1), size=k)
        positions += positions >= index  # never a fragment of the item itself
        sources = self.items[np.minimum(positions, n - 1)]
        crops = rng.integers(0, self.object_size - f + 1, size=(k, 2))
        places = rng.integers(0, self.img_size - f + 1, size=(k, 2))
        return _Layout(int(top), int(left), sources, crops, places)

    def canvas(self, index: int) -> np.ndarray:
        """The (img_size, img_size) uint8 canvas of item `index`, before normalisation."""
        index = self._check(index)
        lay, f, s = self._layout(index), self.fragment_size, self.object_size
        item = int(self.items[index])
        canvas = np.zeros((self.img_size, self.img_size), np.uint8)
        for src, (cy, cx), (py, px) in zip(lay.sources, lay.crops, lay.places, strict=True):
            region = canvas[py : py + f, px : px + f]
            np.maximum(region, self.images[src, cy : cy + f, cx : cx + f], out=region)
        region = canvas[lay.top : lay.top + s, lay.left : lay.left + s]
        np.maximum(region, self.images[item], out=region)
        return canvas

    def box(self, index: int) -> Box:
        """(top, left, bottom, right) of the object's non-zero pixels on the canvas; exclusive ends."""
        index = self._check(index)
        lay = self._layout(index)
        rows, cols = np.nonzero(self.images[self.items[index]])
        if len(rows) == 0:  # a blank item: its whole 28x28 place
            return lay.top, lay.left, lay.top + self.object_size, lay.left + self.object_size
        return (
            lay.top + int(rows.min()),
            lay.left + int(cols.min()),
            lay.top + int(rows.max()) + 1,
            lay.left + int(cols.max()) + 1,
        )

    def object_patch_mask(self, index: int, patch_size: int) -> torch.Tensor:
        """(grid_h, grid_w) bool mask of the patches that overlap the object's box."""
        return box_patch_mask(self.box(index), self.img_size, patch_size)

    def __getitem__(self, index: int):
        canvas = torch.from_numpy(self.canvas(index)).to(torch.float32).div_(255.0)
        image = canvas.expand(3, -1, -1)
        image = image.clone() if self.mean is None else (image - self.mean) / self.std
        if self.transform is not None:
            image = self.transform(image)
        label = int(self.labels[self._item(index)])
        if self.return_box:
            return image, label, torch.tensor(self.box(index))
        return image, label

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, n={self.length}, img_size={self.img_size}, "
            f"num_fragments={self.num_fragments}, fragment_size={self.fragment_size}, seed={self.seed}, "
            f"fresh_layouts={self.fresh_layouts})"
        )


def box_patch_mask(box: Box | torch.Tensor, img_size: int | tuple[int, int], patch_size: int) -> torch.Tensor:
    """(grid_h, grid_w) bool mask of the patches overlapping `box` (top, left, bottom, right; exclusive end).

    With a (B, 4) tensor of boxes, a (B, grid_h, grid_w) mask; flattened row-major it lines up with
    the patch tokens of a timm ViT, for measuring the share of object patches a policy keeps.
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {(h, w)} is not a multiple of the patch size {patch_size}")
    boxes = torch.as_tensor(box, dtype=torch.long)
    b = boxes.view(-1, 4, 1)
    ys = torch.arange(0, h, patch_size).view(1, -1)  # patch row r spans [ys, ys + patch_size)
    xs = torch.arange(0, w, patch_size).view(1, -1)
    rows = (ys < b[:, 2]) & (ys + patch_size > b[:, 0])
    cols = (xs < b[:, 3]) & (xs + patch_size > b[:, 1])
    mask = rows[:, :, None] & cols[:, None, :]
    return mask[0] if boxes.dim() == 1 else mask


# ---------------------------------------------------------------------------------------------------
# Factories
