"""Executed FLOPs per image: the multiply-adds that actually run, as the papers report "FLOPs".

One FLOP here is one multiply-add of a matmul, linear or convolution: DeiT-S at 224 is 4.60 G,
DynamicViT-S at keep_ratio 0.7 is 2.97 G, 2.88 G without its predictors (the paper reports 2.9 G).
Counted: the patch-embedding conv; per block, every linear (qkv, proj, fc1, fc2, any other linear of
the block) on the tokens the block ran on, plus the attention logits and attention-times-values
(n * n * attn_dim each); the head (and the distillation head); the policy's own matmuls (DynamicViT's
score predictors: each policy's `extra_flops`). Not counted, as in `torch.utils.flop_counter.FlopCounterMode` (which reports
2 FLOPs per multiply-add): layer norms, GELU, softmax, bias adds, pooling, gathers. A sparsified
model is counted from what its forward reported (`SparseInfo.tokens_per_block`, per image), so
methods whose images keep different numbers of tokens (A-ViT) are counted per image.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from .adapters import Backbone, backbone_of
from .engine import SparseInfo, get_policy, sparsity_info
from .macs import linear_macs  # noqa: F401  (re-exported: tokensparse.flops.linear_macs)


def _check_countable(model: nn.Module) -> Backbone:
    """The `Backbone` of `model` if its multiply-adds are counted here (ValueError naming the part that is
    not: a patch embedding that is no convolution, a convolution inside a block)."""
    backbone = backbone_of(model)
    embed = getattr(model, "patch_embed", None)
    if embed is not None and not isinstance(getattr(embed, "proj", None), nn.Conv2d):
        raise ValueError(f"patch embedding {type(embed.proj).__name__} is not counted")
    for i, block in enumerate(backbone.blocks):
        if any(isinstance(m, nn.modules.conv._ConvNd) for m in block.modules()):
            raise ValueError(f"block {i} contains a convolution; its FLOPs are not counted")
    return backbone


def backbone_flops(
    model: nn.Module,
    tokens_per_block: torch.Tensor,
    num_patches: int,
    final_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multiply-adds (MACs, what the papers call FLOPs) per image of `model` itself (a timm ViT, Eva, BEiT or a
    Hugging Face vision model): patch embedding, blocks, head (no policy work).

    tokens_per_block: (B, depth) tokens (prefix included) each block computed on, per image.
    num_patches: patches the patch embedding produced (its conv runs on all of them).
    final_tokens: (B,) tokens the last block output (prefix included), what an attention-pool head reads;
    default: the last block's input.
    Returns (B,) float64.
    """
    backbone = _check_countable(model)
    tokens = tokens_per_block.detach().to("cpu", torch.float64)
    depth = len(backbone.blocks)
    if tokens.ndim != 2 or tokens.shape[1] != depth:
        raise ValueError(f"tokens_per_block must be (B, depth={depth}), got {tuple(tokens_per_block.shape)}")
    per_token = torch.tensor([backbone.token_macs(i) for i in range(depth)], dtype=torch.float64)
    per_pair = torch.tensor([backbone.pair_macs(i) for i in range(depth)], dtype=torch.float64)
    blocks = (tokens * per_token + tokens.square() * per_pair).sum(dim=1)
    final = tokens[:, -1] if final_tokens is None else final_tokens.detach().to("cpu", torch.float64)
    return blocks + backbone.fixed_macs(num_patches, final)


def flops_from_info(model: VisionTransformer, info: SparseInfo | None = None) -> torch.Tensor:
    """Executed multiply-adds (MACs, what the papers call FLOPs) per image, (B,) float64, of a forward that
    already ran on `model`, a sparsified ViT.

    info defaults to `tokensparse.sparsity_info(model)` (the last forward), so an evaluation loop can
    count what it ran without a second pass.
    """
    policy = get_policy(model)
    if policy is None:
        raise ValueError("model is not sparsified; use model_flops(model, images) for a dense model")
    info = sparsity_info(model) if info is None else info
    num_patches = info.keep_mask.shape[1]
    final = torch.full((info.patch_tokens.shape[0],), float(info.num_prefix + info.patch_tokens.shape[1]))
    backbone = backbone_flops(model, info.tokens_per_block, num_patches, final)
    return backbone + policy.extra_flops(info, num_patches)


def model_flops(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Executed multiply-adds (MACs, what the papers call FLOPs) per image of `model` on `images`
    (B, 3, H, W), (B,) float64 on the CPU; divide by 1e9 for GMACs.

    Dense timm ViT: the formula with every token in every block (no forward runs). Sparsified model:
    one no-grad forward in the model's current mode (eval: pruned sequences; train: the mask regime,
    where every token is computed), then `flops_from_info`. That forward replaces the model's
    `sparsity_info` and, in train mode, draws random numbers.
    """
    from .policies.dynspatial import is_spatial_model, spatial_flops

    if is_spatial_model(model):  # timm ConvNeXt / Swin, dense or dynamic: counts fixed by the image size
        macs = spatial_flops(model, tuple(images.shape[-2:]))
        return torch.full((images.shape[0],), float(macs), dtype=torch.float64)
    if get_policy(model) is None and backbone_of(model).family.startswith("hf"):
        backbone = _check_countable(model)
        backbone.check_images(images)
        tokens = backbone.num_patches() + backbone.num_prefix
        return backbone_flops(
            model, torch.full((images.shape[0], len(backbone.blocks)), tokens), backbone.num_patches()
        )
    if get_policy(model) is None:
        backbone = _check_countable(model)
        backbone.check_images(images)
        grid = model.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
        patches = grid[0] * grid[1]
        tokens = patches + backbone.num_prefix
        return backbone_flops(model, torch.full((images.shape[0], len(backbone.blocks)), tokens), patches)
    with torch.no_grad():
        model(images)
    return flops_from_info(model)


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the images `model` takes: a ViT's or Swin's patch-embedding size,
    else its timm `pretrained_cfg["input_size"]` (a ConvNeXt runs at any size; a loaded run records its
    own there)."""
    model = getattr(model, "module", model)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "image_size") and getattr(model, "patch_embed", None) is None:
        from .adapters.hf import hf_parts  # a Hugging Face vision model: its config's size

        height, width = hf_parts(model).base.config.image_size, None
        height, width = (height, height) if isinstance(height, int) else tuple(height)
        return int(hf_parts(model).patch_conv.in_channels), int(height), int(width)
    embed = getattr(model, "patch_embed", None)
    if embed is not None and getattr(embed, "img_size", None) is not None:
        height, width = embed.img_size
        return int(embed.proj.in_channels), int(height), int(width)
    channels, height, width = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))
    return int(channels), int(height), int(width)


def gflops(
    model: VisionTransformer,
    images: torch.Tensor | None = None,
    img_size: int | tuple[int, int] | None = None,
    batch: int = 1,
) -> float:
    """Mean executed GMACs (1e9 multiply-adds, what the papers call GFLOPs) per image of `model`.

    Without `images`, counts a random-normal batch of `batch` (default 1) images of `img_size` (an int for
    square images or (H, W); default: the model's, `input_size`). Enough for DynamicViT, whose token counts do
    not depend on the image; pass real images for data-dependent methods (A-ViT).
    """
    if images is None:
        channels, *size = input_size(model)
        img_size = size if img_size is None else img_size
        height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
        param = next(model.parameters())
        images = torch.randn(batch, channels, height, width, device=param.device, dtype=param.dtype)
    return model_flops(model, images).mean().item() / 1e9
