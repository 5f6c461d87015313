"""Dynamic Swin (DynamicSwin; Rao et al., T-PAMI 2023) on the user's timm SwinTransformer, patched in place.

In the third stage, every block from the first pruning location on runs its (shifted-)window
attention on every position, then its MLP only on the positions the latest predictor keeps and a fast
path, LayerNorm + Linear(C, C), on the rest. As in the authors' dyswin.py the Swin fast path has no
layer scale, and in training both paths add to the post-attention features of the mixed stream.
The shared machinery (predictors, the two training streams, gather/scatter) is in `dynspatial`.

New parameters: `layers.2.score_predictor.{0,1,2}.*` and `layers.2.blocks.{j}.fast_path.{0,1}.*`;
every timm key is unchanged. `authors_swin_state_dict` maps a checkpoint of the authors'
`AdaSwinTransformer` onto these names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
from timm.layers import Mlp
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, SwinTransformerStage

from ..macs import linear_macs
from .dynspatial import (
    SPARSE_STAGE,
    DynamicStageMixin,
    check_locations,
    fast_path,
    gather_positions,
    make_sparse_stage,
    mlp_position_counts,
    scatter_positions,
    stage_keep_ratios,
)


class DynamicSwinBlock(SwinTransformerBlock):
    """A timm SwinTransformerBlock with a fast path; `forward` (dense) is timm's, unchanged.

    Not built directly: `dynamic_swin` converts timm's in place, so the constructor (and its
    parameters) is timm's SwinTransformerBlock's."""

    fast_path: nn.Sequential

    def forward_two_stream(
        self, stream: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: `stream`, the (full, fast) streams (B, H, W, C), `mask` (B, H, W, 1) the hard keep
        decisions; both paths on every position."""
        full, fast = stream
        x = full * mask + fast * (1 - mask)
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        a = x * mask + full * (1 - mask)
        b = x * (1 - mask) + fast * mask
        return x + self.drop_path2(self.mlp(self.norm2(a))), x + self.drop_path2(self.fast_path(b))

    def forward_split(self, x: torch.Tensor, split: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Inference on `x` (B, H, W, C): attention everywhere, MLP on the kept positions, fast path on the
        rest; `split` is (kept, rest) position indices from `rank_positions`."""
        kept, rest = split
        B, H, W, C = x.shape
        x = (x + self.drop_path1(self._attn(self.norm1(x)))).reshape(B, H * W, C)
        full = self.mlp(self.norm2(gather_positions(x, kept)))
        out = scatter_positions(full, self.fast_path(gather_positions(x, rest)), kept, rest)
        return (x + self.drop_path2(out)).reshape(B, H, W, C)


class DynamicSwinStage(DynamicStageMixin, SwinTransformerStage):
    """A timm SwinTransformerStage whose blocks run through `DynamicStageMixin`'s loop.

    Not built directly: `dynamic_swin` converts timm's in place, so the constructor (and its
    parameters) is timm's SwinTransformerStage's."""

    score_predictor: nn.ModuleList
    locations: tuple[int, ...]
    keep_ratios: tuple[float, ...]
    _channels_first_noise = False

    def _positions(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1, 2)

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        return (x.shape[1], x.shape[2])

    def _mask(self, keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return keep.view(x.shape[0], x.shape[1], x.shape[2], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` (B, H, W, C) through the patch merging and the dynamic block loop."""
        return self._run_blocks(self.downsample(x))


class DynamicSwinTransformer(SwinTransformer):
    """A timm SwinTransformer whose third stage has predictors and fast paths; records the last forward.

    Not built directly: `dynamic_swin` converts timm's in place, so the constructor (and its
    parameters) is timm's SwinTransformer's (`dynamic_swin` documents the settings this adds)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of images `x` (B, 3, H, W); in training also records the final-norm features."""
        features = self.forward_features(x)
        info = self.layers[SPARSE_STAGE].last_info
        info.features = swin_feature_map(self, features) if self.training else None
        return self.forward_head(features)


def swin_feature_map(model: SwinTransformer, features: torch.Tensor) -> torch.Tensor:
    """`features`, the (B, H, W, C) output of `model.forward_features` (already final-normed), as
    (B, H*W, C)."""
    return features.flatten(1, 2)


def _check_swin(
    model: nn.Module, locations: Sequence[int] | None
) -> tuple[SwinTransformerStage, tuple[int, ...]]:
    if isinstance(model, DynamicSwinTransformer):
        raise ValueError("this Swin Transformer is already a dynamic Swin")
    if type(model) is not SwinTransformer:
        raise ValueError(
            "dynamic_swin needs a timm SwinTransformer (timm.models.swin_transformer.SwinTransformer), "
            f"got {type(model).__name__}"
        )
    if len(model.layers) != 4:
        raise ValueError(
            f"dynamic_swin needs a 4-stage Swin (predictors go in stage {SPARSE_STAGE}), "
            f"this one has {len(model.layers)} stages"
        )
    stage = model.layers[SPARSE_STAGE]
    if type(stage) is not SwinTransformerStage:
        raise ValueError(f"stage {SPARSE_STAGE} is a {type(stage).__name__}, not a timm SwinTransformerStage")
    for j, block in enumerate(stage.blocks):
        where = f"Swin stage {SPARSE_STAGE} block {j}"
        if type(block) is not SwinTransformerBlock:
            raise ValueError(f"{where} is a {type(block).__name__}, not a timm SwinTransformerBlock")
        if type(block.mlp) is not Mlp:
            raise ValueError(f"{where} has a {type(block.mlp).__name__} MLP, not timm's Mlp: not supported")
    if stage.blocks[0].dim % 4:
        raise ValueError(
            f"Swin stage {SPARSE_STAGE} width {stage.blocks[0].dim} must be a multiple of 4 for the predictors"
        )
    return stage, check_locations(locations, len(stage.blocks), "this Swin")


def dynamic_swin(
    model: SwinTransformer, keep_ratio: float = 0.7, locations: Sequence[int] | None = None
) -> SwinTransformer:
    """Make a timm SwinTransformer a dynamic Swin in place (and return it).

    keep_ratio rho: the three predictors send rho, rho - 0.2 and rho - 0.4 of the third stage's
    positions through the full block MLP (attention always runs on all of them); default 0.7, the
    journal version's headline ratio (Rao et al. 2023). locations: the
    predictors' blocks in that stage (default as the authors: (1, 2, 3) for Swin-T's 6 blocks,
    (2, 4, 6) for 18). New modules start from random weights, on the model's device and dtype.
    """
    keep_ratios = stage_keep_ratios(keep_ratio)
    stage, locations = _check_swin(model, locations)
    param = next(model.parameters())
    factory = dict(device=param.device, dtype=param.dtype)
    dim = stage.blocks[0].dim
    for j, block in enumerate(stage.blocks):
        if j < locations[0]:
            continue
        block.__class__ = DynamicSwinBlock
        norm = nn.LayerNorm(dim, eps=block.norm2.eps, **factory)
        block.fast_path = fast_path(norm, dim, factory, nn.Dropout(block.mlp.drop2.p))
    make_sparse_stage(
        stage, DynamicSwinStage, dim, stage.blocks[0].norm1.eps, locations, keep_ratios, factory
    )
    model.__class__ = DynamicSwinTransformer
    return model


def authors_swin_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`state`, a state dict of the authors' `AdaSwinTransformer` (dyswin.py), renamed to the keys of
    `model`, a dynamic timm Swin (or the dense one).

    Backbone keys go through timm's own Swin checkpoint filter (which moves each stage's patch merging
    to the start of the next stage and drops the attention-mask buffers); their predictors keep their
    names (`layers.2.score_predictor.{i}`), their `fastmlp.fc1.{0,1}` become `fast_path.{0,1}`.
    """
    from timm.models.swin_transformer import checkpoint_filter_fn

    renamed = {re.sub(r"\.fastmlp\.fc1\.", ".fast_path.", k): v for k, v in state.items()}
    return dict(checkpoint_filter_fn(renamed, model))


def is_authors_swin_state(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether the state dict `state` has the key layout of the authors' Swin (patch merging at the end of
    a stage, `fastmlp`) rather than timm's."""
    return "layers.0.downsample.reduction.weight" in state or any(".fastmlp." in k for k in state)


def dynamic_swin_flops(model: SwinTransformer, img_size: tuple[int, int]) -> int:
    """Executed multiply-adds (MACs, what the papers call FLOPs) per image of `model`, a timm
    SwinTransformer, dense or dynamic, at `img_size` (H, W); divide by 1e9 for GMACs.

    Counted as `tokensparse.flops` does: the patch-embedding conv; per block qkv and proj on every
    (window-padded) position, attention logits and attention-times-values (window area^2 * attn dim
    each, per window), the MLP on the full-path positions and the fast path on the others; patch
    merging; the predictors on every position of the stage; the head. Not image-dependent.
    """
    if not isinstance(model, SwinTransformer):
        raise ValueError(f"dynamic_swin_flops counts a timm SwinTransformer, got {type(model).__name__}")
    proj = model.patch_embed.proj
    height = img_size[0] // proj.stride[0]
    width = img_size[1] // proj.stride[1]
    total = height * width * proj.weight.numel()
    for stage in model.layers:
        if not isinstance(stage.downsample, nn.Identity):
            height, width = math.ceil(height / 2), math.ceil(width / 2)
            total += height * width * linear_macs(stage.downsample)
        positions = height * width
        dynamic = isinstance(stage, DynamicSwinStage)
        counts = mlp_position_counts(
            positions,
            len(stage.blocks),
            stage.locations if dynamic else None,
            stage.keep_ratios if dynamic else (),
            model.training,
        )
        for block, (full, fast) in zip(stage.blocks, counts, strict=True):
            wh, ww = block.window_size
            windows = math.ceil(height / wh) * math.ceil(width / ww)
            padded = windows * wh * ww
            attn = block.attn
            attn_dim = attn.qkv.out_features // 3
            total += padded * linear_macs(attn) + windows * 2 * (wh * ww) ** 2 * attn_dim
            total += full * linear_macs(block.mlp) + fast * linear_macs(getattr(block, "fast_path", None))
        if dynamic:
            total += positions * sum(linear_macs(p) for p in stage.score_predictor)
    return total + linear_macs(model.head)
