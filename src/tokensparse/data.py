"""Data: timm's dataset and transform factories, plus the built-in cluttered Fashion-MNIST.

`fashion-mnist-clutter` is the default data set: each Fashion-MNIST item sits at a random position on
a larger canvas strewn with fragments of other items (as Cluttered MNIST, Mnih et al. 2014), so most
patches are background or distractors and the object's box says which tokens a good policy keeps.
Every other name goes to `timm.data.create_dataset` with `timm.data.create_transform`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ImageDataset,
    create_dataset,
    create_transform,
)
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from .clutter import (  # noqa: F401  (the clutter set's names, importable from here as before)
    _EVAL_SPLITS,
    _FASHION_MNIST_FILES,
    _IDX_DTYPES,
    _SPLIT_CODES,
    _TRAIN_SPLITS,
    CLUTTER_NAME,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_ENV,
    VAL_FRACTION,
    FashionMNISTClutter,
    _find_idx,
    _Layout,
    _load_fashion_mnist,
    box_patch_mask,
    fashion_mnist_dir,
    load_fashion_mnist,
    read_idx,
    validation_items,
)


class _ToRGB:
    """Grayscale or palette PIL images (torchvision's MNIST family) to RGB, for 3-channel transforms."""

    def __call__(self, img):
        return img.convert("RGB") if hasattr(img, "convert") and img.mode != "RGB" else img


class _Compose:
    def __init__(self, *steps: Callable) -> None:
        self.steps = steps

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x


def _is_training_split(split: str) -> bool:
    if split in _TRAIN_SPLITS:
        return True
    if split in _EVAL_SPLITS:
        return False
    raise ValueError(f"split must be one of {_TRAIN_SPLITS + _EVAL_SPLITS}, got {split!r}")


def _split_folder(root: Path, split: str) -> Path:
    names = (split,) + (_TRAIN_SPLITS if _is_training_split(split) else _EVAL_SPLITS)
    tried = [root / n for n in dict.fromkeys(names)]
    for folder in tried:
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"ImageFolder split {split!r} not found: expected {tried[0]} (also tried "
        f"{', '.join(str(t) for t in tried[1:])}); the layout is {root}/train/<class>/<image> and "
        f"{root}/val/<class>/<image>"
    )


def _image_labels(folder: Path) -> dict[str, int]:
    """Class folder name -> number of images in it, as timm's ImageFolder reader finds them."""
    from timm.data.readers.reader_image_folder import find_images_and_targets

    found, class_to_idx = find_images_and_targets(str(folder))
    counts = dict.fromkeys(class_to_idx, 0)
    names = {i: c for c, i in class_to_idx.items()}
    for _, target in found:
        counts[names[target]] += 1
    return counts


def _folder_classes(root: Path, folder: Path) -> dict[str, int]:
    """One class list for every split: the training split's (the class folders holding images, in
    timm's natural order); other splits are mapped onto it by folder name, so a class missing from one
    split cannot shift the labels of the others. A class with images in `folder` but none in training
    is an error; a training class without images in `folder` is a warning that names it."""
    counts = _image_labels(folder)
    if not counts:
        raise ValueError(f"empty ImageFolder: no images in class subfolders of {folder}")
    try:
        train_folder = _split_folder(root, "train")
    except FileNotFoundError:
        train_folder = folder  # evaluation-only data: its own classes are the only list there is
    train_counts = counts if train_folder == folder else _image_labels(train_folder)
    if not train_counts:
        raise ValueError(f"empty ImageFolder: no images in class subfolders of {train_folder}")
    extra = sorted(set(counts) - set(train_counts))
    if extra:
        raise ValueError(
            f"{folder} has classes with no training images in {train_folder}: {', '.join(extra[:10])}; "
            "the class list comes from the training split, so every class needs training images"
        )
    absent = [c for c in train_counts if c not in counts]
    if absent:
        warnings.warn(
            f"{folder} has no images of {len(absent)} training classes: {', '.join(absent[:10])} "
            "(labels still follow the training class list)",
            stacklevel=3,
        )
    return {c: i for i, c in enumerate(train_counts)}


def build_dataset(
    name: str = CLUTTER_NAME,
    root: str | os.PathLike | None = None,
    split: str = "train",
    img_size: int | None = None,
    is_training: bool | None = None,
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
    limit: int | None = None,
    download: bool = False,
    limit_seed: int = 0,
    fresh_subset: bool = False,
    **kw,
) -> Dataset:
    """A data set by name: `fashion-mnist-clutter`, `torch/<name>` (torchvision) or an ImageFolder root.

    `img_size` defaults to 64 for the clutter set and 224 otherwise. `is_training` (default: whether
    `split` is a training split) picks timm's train augmentation or its eval transform; the clutter set
    has no augmentation. `**kw` go to FashionMNISTClutter (num_fragments, seed, return_box, ...) or to
    `timm.data.create_transform` (auto_augment, re_prob, hflip, interpolation, crop_pct, ...). `limit`
    keeps n items, for quick runs: the clutter set's first n; of other sets a seeded sample spread evenly
    over the classes (`limit_seed`). With `fresh_subset`, `limit` items are instead drawn afresh every
    epoch (seeded by `limit_seed` and the epoch, see `FreshSubset`) from the whole split, so a short
    epoch still visits all items over a run. Find the class count with `num_classes(dataset)`.
    """
    if name == CLUTTER_NAME:
        split = "train" if _is_training_split(split) else "test" if split == "test" else "val"
        if fresh_subset and limit is not None:
            whole = FashionMNISTClutter(split, img_size or 64, mean=mean, std=std, root=root, **kw)
            return FreshSubset(whole, limit, limit_seed)
        return FashionMNISTClutter(split, img_size or 64, limit=limit, mean=mean, std=std, root=root, **kw)
    training_split = _is_training_split(split)
    is_training = training_split if is_training is None else is_training
    transform = create_transform(img_size or 224, is_training=is_training, mean=mean, std=std, **kw)
    if name.startswith("torch/"):
        root = Path(root) if root is not None else None
        if root is None:
            raise ValueError(
                f"{name} needs --data-root DIR (root= in Python), the folder torchvision keeps it in"
            )
        try:
            dataset = create_dataset(
                name, root=str(root), split=split, is_training=is_training, download=download
            )
        except RuntimeError as err:
            raise FileNotFoundError(
                f"{name} not found under {root} ({err}); download it into --data-root {root} with torchvision "
                "(download=True in Python, e.g. torchvision.datasets.CIFAR10(root, download=True))"
            ) from err
        dataset.transform = _Compose(_ToRGB(), transform)
    else:
        if name not in ("", "folder", "image_folder", "imagefolder"):
            raise ValueError(
                f"unknown data set {name!r}: use {CLUTTER_NAME!r}, 'torch/<torchvision name>' or "
                f"'folder' with --data-root DIR (root= in Python) an ImageFolder"
            )
        if root is None:
            raise ValueError(
                "an ImageFolder data set needs --data-root DIR (root= in Python): a folder with train/ and val/ inside"
            )
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"ImageFolder root not found: {root}")
        folder = _split_folder(root, split)
        dataset = StrictImageDataset(str(folder), class_map=_folder_classes(root, folder))
        dataset.transform = transform
    if limit is None:
        return dataset
    if fresh_subset:
        return FreshSubset(dataset, limit, limit_seed)
    return Subset(dataset, spread_over_classes(dataset, limit, limit_seed))


class FreshSubset(Dataset):
    """`limit` items of `dataset`, drawn afresh for every epoch from all of its items.

    Epoch e's items are the first `limit` of a permutation seeded by (`seed`, e): reproducible, so a
    resumed run sees the same items, and over a run every item is visited (an epoch of `limit` items
    is a fraction of a pass; the first-n `limit` would show the same n items every epoch). The loop's
    `set_epoch(e)` reaches the wrapped set too (the clutter set's fresh canvases).
    """

    def __init__(self, dataset: Dataset, limit: int, seed: int = 0) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1 (or None for all items), got {limit}")
        self.dataset, self.seed = dataset, int(seed)
        self.length = min(int(limit), len(dataset))
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        order = np.random.default_rng([self.seed, 11, self.epoch]).permutation(len(self.dataset))
        self.indices = order[: self.length]
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        return self.dataset[int(self.indices[index])]


class StrictImageDataset(ImageDataset):
    """timm's ImageDataset without its silent substitute: an image that cannot be read is a ValueError
    naming the file (timm logs a warning and returns the next item instead, which a reported accuracy
    would silently count)."""

    def __getitem__(self, index: int):
        self._max_retries = 1
        try:
            return super().__getitem__(index)
        except RuntimeError as err:
            raise ValueError(
                f"cannot read image {self.reader.filename(index, absolute=True)}: fix or remove it ({err})"
            ) from None


def _targets(dataset: Dataset) -> list[int] | None:
    """Every item's class index without loading images (timm's ImageFolder reader, torchvision sets)."""
    samples = getattr(getattr(dataset, "reader", None), "samples", None)
    if samples is not None:
        return [int(t) for _, t in samples]
    targets = getattr(dataset, "targets", None)
    return None if targets is None else [int(t) for t in targets]


def spread_over_classes(dataset: Dataset, limit: int, seed: int = 0) -> list[int]:
    """`limit` indices of `dataset` taken in turn from each class, each class's items in a seeded order.

    A folder lists its items class by class, so its first n items are usually one class; this sample
    has every class (as evenly as the class sizes allow). Returned sorted; without targets, the first n.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all items), got {limit}")
    targets = _targets(dataset)
    if targets is None or limit >= len(targets):
        return list(range(min(limit, len(dataset))))
    rng = np.random.default_rng([seed, 11])
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(target, []).append(index)
    queues = [list(rng.permutation(items)) for _, items in sorted(by_class.items())]
    chosen: list[int] = []
    while len(chosen) < limit:
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(int(queue.pop()))
    return sorted(chosen)


def class_names(dataset: Dataset) -> list[str] | None:
    """The class names in index order (None when the data set does not know them)."""
    while isinstance(dataset, (Subset, FreshSubset)):
        dataset = dataset.dataset
    for holder in (dataset, getattr(dataset, "reader", None)):
        mapping = getattr(holder, "class_to_idx", None)
        if mapping:
            return [name for name, _ in sorted(mapping.items(), key=lambda item: item[1])]
        names = getattr(holder, "classes", None)
        if names and all(isinstance(n, str) for n in names):
            return list(names)
    return None


def num_classes(dataset: Dataset) -> int:
    """The number of classes, read from the data set (not from a model head)."""
    while isinstance(dataset, (Subset, FreshSubset)):
        dataset = dataset.dataset
    if isinstance(getattr(dataset, "num_classes", None), int):
        return dataset.num_classes
    for holder in (dataset, getattr(dataset, "reader", None)):
        for attr in ("class_to_idx", "classes"):
            found = getattr(holder, attr, None)
            if found:
                return len(found)
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets):
        return int(max(int(t) for t in targets)) + 1
    raise ValueError(f"cannot tell the class count of {type(dataset).__name__}: it has no classes or targets")


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _ShardSampler(Sampler[int]):
    """Every `world`-th index from `rank`, in order and without padding: evaluation sees each item once."""

    def __init__(self, length: int, rank: int, world: int) -> None:
        self.indices = range(rank, length, world)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        pass


def _seed_worker(worker_id: int) -> None:
    np.random.seed(torch.initial_seed() % 2**32)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    is_training: bool = True,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader over this rank's shard of `dataset`.

    Training shuffles with a DistributedSampler seeded by `seed`; a single process is rank 0 of 1, so
    one code path serves both and `loader.sampler.set_epoch(epoch)` gives each epoch its own,
    reproducible order (resume-safe). Evaluation reads in order; under torch.distributed each rank takes
    every world-th item, without the padding DistributedSampler adds, so summed metrics count each item
    once (its set_epoch is a no-op, so a loop may call it on any loader).
    """
    rank, world = _rank_and_world()
    if is_training:
        sampler: Sampler[int] = DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=drop_last
        )
    else:
        sampler = _ShardSampler(len(dataset), rank, world)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        # a data set with set_epoch (fresh layouts) must reach the workers anew every epoch
        persistent_workers=num_workers > 0 and not hasattr(dataset, "set_epoch"),
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(seed),
    )
