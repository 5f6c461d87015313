"""The authors' DynamicViT code, loaded from a checkout the user provides, for timing beside ours.

Never shipped in the package: only the benchmarks time it (`bench_dynamicvit.py --authors-code DIR`).
"""

from __future__ import annotations

import os

import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer


def authors_dynamicvit(code_dir: str | os.PathLike, dense: VisionTransformer, keep_ratio: float) -> nn.Module:
    """The authors' DynamicViT (`models/dyvit.py` of their repository, checked out at `code_dir` by the
    user; never shipped here), shaped like `dense` and loaded with its weights, for timing side by side."""
    import importlib
    import math
    import sys
    import types

    sys.modules.setdefault("torch._six", types.SimpleNamespace(inf=math.inf))  # gone from modern torch
    if "tensorboardX" not in sys.modules and importlib.util.find_spec("tensorboardX") is None:
        sys.modules.setdefault("tensorboardX", types.SimpleNamespace(SummaryWriter=object))
    sys.path.insert(0, str(code_dir))
    try:
        dyvit = importlib.import_module("models.dyvit")
    finally:
        sys.path.remove(str(code_dir))
    blocks = len(dense.blocks)
    model = dyvit.VisionTransformerDiffPruning(
        img_size=dense.patch_embed.img_size[0],
        patch_size=dense.patch_embed.patch_size[0],
        num_classes=dense.num_classes,
        embed_dim=dense.embed_dim,
        depth=blocks,
        num_heads=dense.blocks[0].attn.num_heads,
        mlp_ratio=dense.blocks[0].mlp.fc1.out_features / dense.embed_dim,
        qkv_bias=True,
        pruning_loc=[blocks // 4, blocks // 2, 3 * blocks // 4],
        token_ratio=[keep_ratio, keep_ratio**2, keep_ratio**3],
    )
    model.load_state_dict(dense.state_dict(), strict=False)
    return model.eval()
