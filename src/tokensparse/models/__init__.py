"""Dense models shipped with the package, so a study starts where the papers start: from a converged model.

    model = tokensparse.pretrained("clutter-vit")            # a timm VisionTransformer, eval mode
    model = tokensparse.dynamicvit(model, keep_ratio=0.7)    # then fine-tune the predictors

Each entry names its timm architecture, the data it was trained on, the weights file beside this
module (safetensors) and the card (`<name>.md`: command, machine, date, metrics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class PretrainedEntry:
    """A shipped dense model: how to build it and where its weights are.

    name: the name `pretrained` takes; model: the timm architecture, built with `model_kwargs`,
    `num_classes` (default 10) and `img_size` (default 64, pixels); dataset: the data set it was
    trained on (default "fashion-mnist-clutter", the built-in one); weights: the safetensors file beside
    this module."""

    name: str
    model: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 10
    img_size: int = 64
    dataset: str = "fashion-mnist-clutter"
    weights: str = ""

    @property
    def path(self) -> Path:
        return HERE / self.weights

    @property
    def card(self) -> Path:
        return self.path.with_suffix(".md")


PRETRAINED: dict[str, PretrainedEntry] = {
    "clutter-vit": PretrainedEntry(
        name="clutter-vit",
        model="vit_tiny_patch16_224",
        model_kwargs={"patch_size": 8, "embed_dim": 64, "depth": 12, "num_heads": 2},
        num_classes=10,
        img_size=64,
        dataset="fashion-mnist-clutter",
        weights="clutter_vit.safetensors",
    ),
}


def pretrained_entry(name: str) -> PretrainedEntry:
    """The entry of the shipped model `name`; ValueError listing the names if there is none by that name."""
    if name not in PRETRAINED:
        raise ValueError(f"no shipped model named {name!r}; available: {', '.join(sorted(PRETRAINED))}")
    entry = PRETRAINED[name]
    if not entry.path.is_file():
        raise FileNotFoundError(f"the weights of {name!r} are missing from the package: {entry.path}")
    return entry


def pretrained(name: str = "clutter-vit", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The shipped dense model `name` (default "clutter-vit", the only one) as a timm model in eval mode,
    weights cast to `dtype` (default float32)."""
    entry = pretrained_entry(name)
    model = timm.create_model(
        entry.model,
        pretrained=False,
        num_classes=entry.num_classes,
        img_size=entry.img_size,
        **entry.model_kwargs,
    )
    state = {k: v.to(dtype) for k, v in load_file(str(entry.path)).items()}
    model.load_state_dict(state)
    return model.to(dtype).eval()
