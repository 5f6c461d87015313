"""tokensparse: faster timm vision transformers by dropping the tokens an image does not need.

model = tokensparse.dynamicvit(timm.create_model("deit_small_patch16_224"), keep_ratio=0.7)
model = tokensparse.load_run("runs/dvit")     # a trained run, in eval mode

The names below are imported on first use, so `import tokensparse` (and the CLI's `--help`) does not
import torch until something needs it. The API reference (`make docs`) opens with the README's guides:

.. include:: ../../README.md
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

try:  # one place: the package metadata (pyproject.toml's version)
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    __version__ = _version("tokensparse")
except PackageNotFoundError:  # the source tree on sys.path, not installed
    __version__ = "0+unknown"

_EXPORTS = {
    "CheckpointError": ".checkpoints",
    "load_checkpoint": ".checkpoints",
    "save_checkpoint": ".checkpoints",
    "SparseInfo": ".engine",
    "sparsity_info": ".engine",
    "dense_features": ".engine",
    "get_policy": ".engine",
    "gflops": ".flops",
    "model_flops": ".flops",
    "AViTLoss": ".losses",
    "DynamicViTLoss": ".losses",
    "teacher_outputs": ".losses",
    "HaltingStats": ".policies.avit",
    "avit": ".policies.avit",
    "avit_stats": ".policies.avit",
    "random_prune": ".policies.baselines",
    "static_prune": ".policies.baselines",
    "dynamicvit": ".policies.dynamicvit",
    "diffrate": ".policies.diffrate",
    "diffrate_stats": ".policies.diffrate",
    "DiffRateStats": ".policies.diffrate",
    "evit": ".policies.evit",
    "EViTStats": ".policies.evit",
    "evit_stats": ".policies.evit",
    "tome": ".policies.tome",
    "ToMeStats": ".policies.tome",
    "tome_stats": ".policies.tome",
    "load_run": ".runs",
    "pretrained": ".models",
    "export_onnx": ".export",
    "dynamic_convnext": ".policies.dynconvnext",
    "dynamic_swin": ".policies.dynswin",
    "SpatialInfo": ".policies.dynspatial",
    "dynamic_spatial_info": ".policies.dynspatial",
}

__all__ = [
    "AViTLoss",
    "HaltingStats",
    "avit",
    "avit_stats",
    "CheckpointError",
    "DynamicViTLoss",
    "SparseInfo",
    "dynamicvit",
    "diffrate",
    "diffrate_stats",
    "DiffRateStats",
    "dynamic_convnext",
    "dynamic_spatial_info",
    "dynamic_swin",
    "SpatialInfo",
    "evit",
    "EViTStats",
    "evit_stats",
    "export_onnx",
    "random_prune",
    "static_prune",
    "tome",
    "ToMeStats",
    "tome_stats",
    "pretrained",
    "gflops",
    "load_checkpoint",
    "load_run",
    "model_flops",
    "save_checkpoint",
    "sparsity_info",
    "dense_features",
    "get_policy",
    "teacher_outputs",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tokensparse' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the eager imports
    from .checkpoints import CheckpointError, load_checkpoint, save_checkpoint
    from .engine import SparseInfo, dense_features, sparsity_info
    from .export import export_onnx
    from .flops import gflops, model_flops
    from .losses import AViTLoss, DynamicViTLoss, teacher_outputs
    from .models import pretrained
    from .policies.avit import HaltingStats, avit, avit_stats
    from .policies.baselines import random_prune, static_prune
    from .policies.dynamicvit import dynamicvit
    from .policies.dynconvnext import dynamic_convnext
    from .policies.dynspatial import SpatialInfo, dynamic_spatial_info
    from .policies.dynswin import dynamic_swin
    from .policies.evit import EViTStats, evit, evit_stats
    from .policies.tome import ToMeStats, tome, tome_stats
    from .runs import load_run
