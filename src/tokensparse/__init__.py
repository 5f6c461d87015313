"""tokensparse: faster timm vision transformers by dropping the tokens an image does not need."""

from .checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from .engine import SparseInfo, sparsity_info
from .policies.dynamicvit import dynamicvit

__all__ = [
    "CheckpointError",
    "SparseInfo",
    "dynamicvit",
    "load_checkpoint",
    "save_checkpoint",
    "sparsity_info",
]
__version__ = "0.1.0"
