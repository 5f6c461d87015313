"""tokensparse: faster timm vision transformers by dropping the tokens an image does not need.

model = tokensparse.dynamicvit(timm.create_model("deit_small_patch16_224"), keep_ratio=0.7)
"""

from .checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from .engine import SparseInfo, sparsity_info
from .export import export_onnx
from .flops import gflops, model_flops
from .losses import AViTLoss, DynamicViTLoss, teacher_outputs
from .policies.avit import HaltingStats, avit, avit_stats
from .policies.baselines import random_prune, static_prune
from .policies.dynamicvit import dynamicvit
from .policies.evit import evit
from .policies.tome import tome

__all__ = [
    "AViTLoss",
    "HaltingStats",
    "avit",
    "avit_stats",
    "CheckpointError",
    "DynamicViTLoss",
    "SparseInfo",
    "dynamicvit",
    "evit",
    "export_onnx",
    "random_prune",
    "static_prune",
    "tome",
    "gflops",
    "load_checkpoint",
    "model_flops",
    "save_checkpoint",
    "sparsity_info",
    "teacher_outputs",
]
__version__ = "0.1.0"
