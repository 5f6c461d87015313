"""Trained runs in Python: load one ready for inference, know its classes, feed it image files.

    model = tokensparse.load_run("runs/dvit")            # eval mode, on the CPU
    logits = model(tokensparse.runs.read_images(["cat.jpg"], "runs/dvit"))

A run is the folder `tokensparse train --output` wrote (config.json, model.safetensors or the last
epoch's checkpoint, classes.json). A bare weights file works too, given the model and method.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .data import CLUTTER_NAME, FASHION_MNIST_CLASSES


def load_run(
    path: str | os.PathLike,
    model: str | None = None,
    method: str | None = None,
    device: str | torch.device = "cpu",
    **config: Any,
) -> nn.Module:
    """The trained model of a run folder `path` (or of a weights file, given `model=`, a timm model name,
    and `method=`, a registered method), in eval mode on `device` (default "cpu").

    `config` overrides fields of the run's TrainConfig (e.g. keep_ratio=0.5 to run DynamicViT at
    another ratio, gate_center= for A-ViT). The run's settings stay readable as `model.tokensparse_run`
    (the TrainConfig) and its class names as `model.class_names` (None when unknown).
    """
    net, cfg = load_with_config(path, model=model, method=method, **config)
    net.tokensparse_run = cfg
    net.class_names = run_class_names(path, cfg)
    return net.to(device).eval()


def load_with_config(
    path: str | os.PathLike, model: str | None = None, method: str | None = None, **config: Any
) -> tuple[nn.Module, Any]:
    """(model, TrainConfig) of `path`, a run folder or a bare weights file; ValueError/FileNotFoundError if
    neither. `model` (a timm model name) and `method` are required for a weights file and checked
    against a run folder's; `config` overrides TrainConfig fields (None values are ignored)."""
    from .training import METHODS, TrainConfig, load_trained

    config = {k: v for k, v in config.items() if v is not None}
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"run or checkpoint not found: {path}")
    if path.is_dir():
        shape = {k: config[k] for k in ("img_size", "model_kwargs") if k in config}
        if shape:  # a run is rebuilt as it trained: its architecture and size come from config.json
            flags = " / ".join("--" + k.replace("_", "-") for k in shape)
            raise ValueError(
                f"{flags} describe a weights file; {path} is a run folder, which records its own"
            )
        overrides = dict(config)
        model_, cfg = load_trained(path, overrides=overrides)
        if model is not None and model != cfg.model:
            raise ValueError(f"{path} is a run of {cfg.model}, not --model {model}")
        if method is not None and method != cfg.method:
            raise ValueError(f"{path} is a {cfg.method} run, not --method {method}")
        return model_, cfg
    if model is None or method is None:
        raise ValueError(
            f"{path} is a weights file: say what it holds with --model NAME --method "
            f"{{{','.join(METHODS)}}} (in Python: model=, method=), or pass the run folder"
        )
    from .checkpoints import read_state_dict

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(model=model, method=method, **{k: v for k, v in config.items() if k in fields})
    if cfg.img_size is None:
        cfg.img_size = _image_size_of(read_state_dict(path))
    return load_trained(path, cfg)


def _image_size_of(state: dict[str, torch.Tensor]) -> int | None:
    """The image size a ViT state dict was trained at, from its position embedding and patch size."""
    pos, proj = state.get("pos_embed"), state.get("patch_embed.proj.weight")
    if pos is None or proj is None:
        return None
    prefix = sum(int(state[k].shape[1]) for k in ("cls_token", "reg_token", "dist_token") if k in state)
    for tokens in (pos.shape[1] - prefix, pos.shape[1]):
        grid = math.isqrt(max(int(tokens), 0))
        if grid > 0 and grid * grid == tokens:
            return grid * int(proj.shape[-1])
    return None


def run_class_names(path: str | os.PathLike, cfg: Any) -> list[str] | None:
    """Class names of the run at `path` with TrainConfig `cfg`: its classes.json, else its data set's
    (Fashion-MNIST, an ImageFolder's folders); None when unknown."""
    path = Path(path)
    saved = path / "classes.json" if path.is_dir() else None
    if saved is not None and saved.is_file():
        return list(json.loads(saved.read_text()))
    if cfg.dataset == CLUTTER_NAME:
        return list(FASHION_MNIST_CLASSES)
    if cfg.data_root and cfg.dataset in ("", "folder", "image_folder", "imagefolder"):
        from timm.utils.misc import natural_key

        train = Path(cfg.data_root) / "train"
        if train.is_dir():
            return sorted((d.name for d in train.iterdir() if d.is_dir()), key=natural_key)
    return None


def read_images(
    paths: Sequence[str | os.PathLike], model: nn.Module, dataset: str = CLUTTER_NAME
) -> torch.Tensor:
    """The image files `paths` as a (B, 3, H, W) batch for `model`: read with PIL, sized to the model's input
    and normalised as `dataset` does (the clutter set: grey levels, ImageNet statistics; others: timm's eval
    transform, resize and centre crop)."""
    from PIL import Image, UnidentifiedImageError
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

    from .flops import input_size

    _, height, width = input_size(model)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    transform = None if dataset == CLUTTER_NAME else create_transform(height, is_training=False)
    batch = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            image = Image.open(path)
            image.load()
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{path} is not an image PIL can read ({err})") from err
        image = to_8bit(image, path)
        if transform is not None:
            batch.append(transform(image.convert("RGB")))
            continue
        grey = image.convert("L").resize((width, height), Image.BILINEAR)
        pixels = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).view(1, height, width)
        batch.append((pixels.float().div(255).expand(3, -1, -1) - mean) / std)
    return torch.stack(batch)


def to_8bit(image, path: str | os.PathLike = "image"):
    """A PIL image with 16-bit or 32-bit integer pixels, or float pixels, as an 8-bit grey image scaled
    from its type's range (PIL's own conversion clips 16-bit grey to white and floats to black).

    Integers: 16-bit images over 0..65535 (0..255 when no pixel exceeds it); floats: 0..1, or 0..255
    when a pixel exceeds 1. A pixel outside those ranges is a ValueError naming the file (`path`, only
    for the message). Any other image comes back unchanged."""
    import numpy as np
    from PIL import Image

    if image.mode not in ("I;16", "I;16B", "I;16L", "I", "F"):
        return image
    pixels = np.asarray(image, dtype=np.float64)
    if not np.isfinite(pixels).all():
        raise ValueError(f"{path}: its pixels include NaN or infinity")
    low, high = float(pixels.min()), float(pixels.max())
    if image.mode == "F":
        top = 1.0 if high <= 1.0 else 255.0
    else:
        top = 255.0 if high <= 255 else 65535.0
    if low < 0 or high > top:
        raise ValueError(
            f"{path}: {image.mode} pixels span {low:g}..{high:g}, outside the 0..{top:g} this reader scales from"
        )
    return Image.fromarray(np.round(pixels * (255.0 / top)).astype(np.uint8), mode="L")


def train_dense_then_sparse(cfg: Any, dense_epochs: int) -> dict[str, Any]:
    """Fine-tune the dense model on the data for `dense_epochs` (into `cfg.output`/dense), then train
    `cfg.method` from it: the path from a model trained on other classes (e.g. ImageNet) to a
    sparsified one on your own data."""
    from .training import train

    if dense_epochs < 1:
        raise ValueError(f"--finetune-dense-epochs must be >= 1, got {dense_epochs}")
    if cfg.method == "dense":
        raise ValueError(
            "--finetune-dense-epochs is for sparsifying methods; --method dense already fine-tunes"
        )
    dense_out = Path(cfg.output) / "dense"
    warmup = min(dataclasses.replace(cfg, method="dense").resolved().warmup_epochs, dense_epochs // 6)
    dense_cfg = dataclasses.replace(
        cfg, method="dense", epochs=dense_epochs, warmup_epochs=warmup, output=str(dense_out), teacher=None
    )
    if cfg.resume and (dense_out / "model.safetensors").is_file():
        print(f"dense fine-tune: reusing {dense_out}/model.safetensors")
    else:
        print(f"dense fine-tune: {dense_epochs} epochs into {dense_out}")
        train(dense_cfg)
    sparse_cfg = dataclasses.replace(cfg, checkpoint=str(dense_out / "model.safetensors"), pretrained=False)
    print(f"{cfg.method}: from {sparse_cfg.checkpoint} into {cfg.output}")
    return train(sparse_cfg)
