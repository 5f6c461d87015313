"""Dynamic ConvNeXt (DynamicCNN; Rao et al., T-PAMI 2023) on the user's timm ConvNeXt, patched in place.

In the third stage, every block from the first pruning location on runs its depthwise conv on every
position, then its MLP (norm, fc1, GELU, fc2, layer scale) only on the positions the latest predictor
keeps and a fast path, LayerNorm + Linear(C, C) with its own layer scale `fast_path_gamma`, on the
rest. The shared machinery (predictors, the two training streams, gather/scatter) is in `dynspatial`.

New parameters: `stages.2.score_predictor.{0,1,2}.*` and `stages.2.blocks.{j}.fast_path.{0,1}.*`,
`stages.2.blocks.{j}.fast_path_gamma`; every timm key is unchanged. `authors_convnext_state_dict`
maps a checkpoint of the authors' `AdaConvNeXt` onto these names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
from timm.layers import Mlp
from timm.models.convnext import ConvNeXt, ConvNeXtBlock, ConvNeXtStage

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


class DynamicConvNeXtBlock(ConvNeXtBlock):
    """A timm ConvNeXtBlock with a fast path; `forward` (dense) is timm's, unchanged.

    Not built directly: `dynamic_convnext` converts timm's in place, so the constructor (and its
    parameters) is timm's ConvNeXtBlock's."""

    fast_path: nn.Sequential
    fast_path_gamma: nn.Parameter | None

    def _full(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-last (..., C) positions through norm, MLP and layer scale."""
        x = self.mlp(self.norm(x))
        return x * self.gamma if self.gamma is not None else x

    def _fast(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fast_path(x)
        return x * self.fast_path_gamma if self.fast_path_gamma is not None else x

    def forward_two_stream(
        self, stream: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: `stream`, the (full, fast) streams (B, C, H, W), `mask` (B, 1, H, W) the hard keep
        decisions; both paths on every position."""
        full, fast = stream
        y = self.conv_dw(full * mask + fast * (1 - mask))
        a = (y * mask + full * (1 - mask)).permute(0, 2, 3, 1)
        b = (y * (1 - mask) + fast * mask).permute(0, 2, 3, 1)
        a = self._full(a).permute(0, 3, 1, 2)
        b = self._fast(b).permute(0, 3, 1, 2)
        return full + self.drop_path(a), fast + self.drop_path(b)

    def forward_split(self, x: torch.Tensor, split: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Inference on `x` (B, C, H, W): MLP on the kept positions, fast path on the rest, scattered back;
        `split` is (kept, rest) position indices from `rank_positions`."""
        kept, rest = split
        B, C, H, W = x.shape
        y = self.conv_dw(x).permute(0, 2, 3, 1).reshape(B, H * W, C)
        out = scatter_positions(
            self._full(gather_positions(y, kept)), self._fast(gather_positions(y, rest)), kept, rest
        )
        return x + self.drop_path(out.reshape(B, H, W, C).permute(0, 3, 1, 2))


class DynamicConvNeXtStage(DynamicStageMixin, ConvNeXtStage):
    """A timm ConvNeXtStage whose blocks run through `DynamicStageMixin`'s loop (predictors, two streams).

    Not built directly: `dynamic_convnext` converts timm's in place, so the constructor (and its
    parameters) is timm's ConvNeXtStage's."""

    score_predictor: nn.ModuleList
    locations: tuple[int, ...]
    keep_ratios: tuple[float, ...]
    _channels_first_noise = True

    def _positions(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        return (x.shape[2], x.shape[3])

    def _mask(self, keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return keep.view(x.shape[0], 1, x.shape[2], x.shape[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` (B, C, H, W) through the downsampling layer and the dynamic block loop."""
        return self._run_blocks(self.downsample(x))


class DynamicConvNeXt(ConvNeXt):
    """A timm ConvNeXt whose third stage has predictors and fast paths; records the last forward.

    Not built directly: `dynamic_convnext` converts timm's in place, so the constructor (and its
    parameters) is timm's ConvNeXt's (`dynamic_convnext` documents the settings this adds)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of images `x` (B, 3, H, W); in training also records the final-norm features."""
        features = self.forward_features(x)
        info = self.stages[SPARSE_STAGE].last_info
        info.features = convnext_feature_map(self, features) if self.training else None
        return self.forward_head(features)


def convnext_feature_map(model: ConvNeXt, features: torch.Tensor) -> torch.Tensor:
    """`features`, the (B, C, H, W) output of `model.forward_features`, -> (B, H*W, C) per position after the
    final norm (timm's head norm, applied before pooling here), the authors' `featmap`."""
    if isinstance(model.norm_pre, nn.Identity):
        features = model.head.norm(features)
    return features.flatten(2).transpose(1, 2)


def _check_convnext(
    model: nn.Module, locations: Sequence[int] | None
) -> tuple[ConvNeXtStage, tuple[int, ...]]:
    if isinstance(model, DynamicConvNeXt):
        raise ValueError("this ConvNeXt is already a dynamic ConvNeXt")
    if type(model) is not ConvNeXt:
        raise ValueError(
            f"dynamic_convnext needs a timm ConvNeXt (timm.models.convnext.ConvNeXt), got {type(model).__name__}"
        )
    if len(model.stages) != 4:
        raise ValueError(
            f"dynamic_convnext needs a 4-stage ConvNeXt (predictors go in stage {SPARSE_STAGE}), "
            f"this one has {len(model.stages)} stages"
        )
    stage = model.stages[SPARSE_STAGE]
    if type(stage) is not ConvNeXtStage:
        raise ValueError(f"stage {SPARSE_STAGE} is a {type(stage).__name__}, not a timm ConvNeXtStage")
    for j, block in enumerate(stage.blocks):
        where = f"ConvNeXt stage {SPARSE_STAGE} block {j}"
        if type(block) is not ConvNeXtBlock:
            raise ValueError(f"{where} is a {type(block).__name__}, not a timm ConvNeXtBlock")
        if block.use_conv_mlp:
            raise ValueError(
                f"{where} uses conv_mlp=True (1x1-conv MLP): not supported, build with conv_mlp=False"
            )
        if type(block.mlp) is not Mlp:
            raise ValueError(
                f"{where} has a {type(block.mlp).__name__} MLP (ConvNeXt-V2's GlobalResponseNormMlp normalises "
                "over all positions, so it cannot run on a subset): not supported"
            )
        if not isinstance(block.shortcut, nn.Identity):
            raise ValueError(f"{where} changes channels or stride (has a shortcut projection): not supported")
    dim = stage.blocks[0].conv_dw.out_channels
    if dim % 4:
        raise ValueError(
            f"ConvNeXt stage {SPARSE_STAGE} width {dim} must be a multiple of 4 for the predictors"
        )
    return stage, check_locations(locations, len(stage.blocks), "this ConvNeXt")


def dynamic_convnext(
    model: ConvNeXt, keep_ratio: float = 0.7, locations: Sequence[int] | None = None
) -> ConvNeXt:
    """Make a timm ConvNeXt a dynamic ConvNeXt in place (and return it).

    keep_ratio rho: the three predictors send rho, rho - 0.2 and rho - 0.4 of the third stage's
    positions through the full block MLP; default 0.7, the journal version's headline ratio (Rao et al.
    2023). locations: the predictors' blocks in that stage (default as
    the authors: (1, 2, 3) for ConvNeXt-T's 9 blocks, (3, 6, 9) for 27). New modules start from random
    weights (fast-path layer scales at the blocks' initial layer-scale value, 1e-6), on the model's
    device and dtype; load trained ones with `tokensparse.load_checkpoint` or train them with
    `DynamicSpatialLoss`.
    """
    keep_ratios = stage_keep_ratios(keep_ratio)
    stage, locations = _check_convnext(model, locations)
    param = next(model.parameters())
    factory = dict(device=param.device, dtype=param.dtype)
    dim = stage.blocks[0].conv_dw.out_channels
    for j, block in enumerate(stage.blocks):
        if j < locations[0]:
            continue
        block.__class__ = DynamicConvNeXtBlock
        block.fast_path = fast_path(nn.LayerNorm(dim, eps=1e-6, **factory), dim, factory)
        block.fast_path_gamma = (
            nn.Parameter(torch.full((dim,), 1e-6, **factory)) if block.gamma is not None else None
        )
    make_sparse_stage(stage, DynamicConvNeXtStage, dim, 1e-6, locations, keep_ratios, factory)
    model.__class__ = DynamicConvNeXt
    return model


def authors_convnext_state_dict(
    state: Mapping[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """`state`, a state dict of the authors' `AdaConvNeXt` (dyconvnext.py), renamed to the keys of `model`,
    a dynamic timm ConvNeXt (or the dense one).

    Backbone keys go through timm's own ConvNeXt checkpoint filter; their predictors
    (`score_predictor.{i}`, 1x1 convs) become `stages.2.score_predictor.{i}` Linears, their fast paths
    keep their names under `stages.2.blocks.{j}`.
    """
    from timm.models.convnext import checkpoint_filter_fn

    predictors = {k: v for k, v in state.items() if k.startswith("score_predictor.")}
    backbone = {k: v for k, v in state.items() if not k.startswith("score_predictor.")}
    out = dict(checkpoint_filter_fn(backbone, model))
    for key, value in predictors.items():
        if value.ndim == 4:  # 1x1 conv weight (out, in, 1, 1) -> Linear (out, in)
            value = value.reshape(value.shape[0], value.shape[1])
        out[f"stages.{SPARSE_STAGE}.{key}"] = value
    return out


def is_authors_convnext_state(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether the state dict `state` has the key layout of the authors' ConvNeXt (`downsample_layers.*`,
    `stages.{i}.{j}.*`) rather than timm's."""
    return any(k.startswith("downsample_layers.") for k in state) or any(
        re.match(r"stages\.\d+\.\d+\.", k) for k in state
    )


def dynamic_convnext_flops(model: ConvNeXt, img_size: tuple[int, int]) -> int:
    """Executed multiply-adds (MACs, what the papers call FLOPs) per image of `model`, a timm ConvNeXt, dense
    or dynamic, at `img_size` (H, W); divide by 1e9 for GMACs.

    Counted as `tokensparse.flops` does (one multiply-add of every conv, linear and matmul; not norms,
    activations, layer scales, gathers): convolutions on their output positions, block MLPs on the
    positions that took the full path, fast paths on the others, the predictors on every position of
    the stage, the head. Eval takes int(N * ratio) positions through the full path after each
    predictor; training (two streams) computes both paths everywhere. Not image-dependent.
    """
    if not isinstance(model, ConvNeXt):
        raise ValueError(f"dynamic_convnext_flops counts a timm ConvNeXt, got {type(model).__name__}")
    height, width = img_size
    total = 0

    def conv(module: nn.Conv2d, h: int, w: int) -> tuple[int, int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
        )
        h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return h, w, h * w * module.weight.numel()

    for layer in model.stem:
        if isinstance(layer, nn.Conv2d):
            height, width, macs = conv(layer, height, width)
            total += macs
    for stage in model.stages:
        for layer in stage.downsample.modules() if not isinstance(stage.downsample, nn.Identity) else ():
            if isinstance(layer, nn.Conv2d):
                height, width, macs = conv(layer, height, width)
                total += macs
        positions = height * width
        dynamic = isinstance(stage, DynamicConvNeXtStage)
        counts = mlp_position_counts(
            positions,
            len(stage.blocks),
            stage.locations if dynamic else None,
            stage.keep_ratios if dynamic else (),
            model.training,
        )
        for block, (full, fast) in zip(stage.blocks, counts, strict=True):
            total += positions * block.conv_dw.weight.numel() + full * linear_macs(block.mlp)
            total += fast * linear_macs(getattr(block, "fast_path", None))
        if dynamic:
            total += positions * sum(linear_macs(p) for p in stage.score_predictor)
    return total + linear_macs(model.head)
