"""Attention forms the engine needs beyond timm's own fused blocks.

Training-time DynamicViT keeps every token and masks attention *multiplicatively*, so the keep
decisions stay in the autograd graph and the predictors get a gradient. DynamicViT inference never
comes here: it runs timm's ordinary blocks on gathered (shorter) sequences.

A-ViT trains with halted tokens masked as attention keys (`halting_block`) and infers on a pack of
the live tokens of all images, attention per image on a padded layout (`PackedLayout`, `packed_block`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def softmax_with_keep(attn_logits: torch.Tensor, keep: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Softmax over keys restricted to kept keys (and each query's own key), differentiable in `keep`.

    attn_logits: (B, H, N, N); keep: (B, N) or (B, N, 1) with 1 = kept. Computed as
    exp(a - max a) * keep, renormalised as (e + eps / N) / (sum e + eps), the DynamicViT form.
    """
    batch, _, n, _ = attn_logits.shape
    keep = keep.reshape(batch, 1, 1, n).to(attn_logits.dtype)
    eye = torch.eye(n, dtype=attn_logits.dtype, device=attn_logits.device).view(1, 1, n, n)
    key_weight = keep + (1.0 - keep) * eye
    e = (attn_logits - attn_logits.amax(dim=-1, keepdim=True)).exp() * key_weight
    return (e + eps / n) / (e.sum(dim=-1, keepdim=True) + eps)


def masked_attention(attn: nn.Module, x: torch.Tensor, keep: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Run a timm `Attention` module with `softmax_with_keep` in place of its softmax."""
    batch, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = softmax_with_keep((q * attn.scale) @ k.transpose(-2, -1), keep, eps)
    out = attn.attn_drop(probs) @ v
    out = out.transpose(1, 2).reshape(batch, n, attn.num_heads * attn.head_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def masked_block(block: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """A timm pre-norm `Block` whose attention only sees kept keys (all tokens stay in `x`)."""
    x = x + block.drop_path1(block.ls1(masked_attention(block.attn, block.norm1(x), keep)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


# --- A-ViT -----------------------------------------------------------------------------------------


def key_masked_attention(attn: nn.Module, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
    """Run a timm `Attention` with an additive per-key bias (B, N) on the scaled logits (queries unmasked)."""
    batch, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = key_bias.to(q.dtype).view(batch, 1, 1, n)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=attn.scale)
    out = attn.norm(out.transpose(1, 2).reshape(batch, n, attn.num_heads * attn.head_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def halting_block(block: nn.Module, x: torch.Tensor, running: torch.Tensor, key_bias: float = -1000.0):
    """A timm `Block` in A-ViT's training form: halted tokens stay in `x` but take no part.

    running: (B, N), 1 for tokens still computing. As in the authors' `Block_ACT.forward_act`, the
    mask multiplies each branch's input before and after its norm, and halted tokens are attention
    keys with logit bias `key_bias` (-1000, added after scaling); their own rows are still computed
    (from zero input) because the per-block mean halting score includes them.
    """
    keep = running.unsqueeze(-1).to(x.dtype)
    x = x * keep
    attn = key_masked_attention(block.attn, block.norm1(x) * keep, (1.0 - running) * key_bias)
    x = x + block.drop_path1(block.ls1(attn))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x * keep) * keep)))


@dataclass
class PackedLayout:
    """Where the rows of a packed (T, C) token tensor sit in a padded (batch, length) attention layout.

    The tokens of several images are packed image after image (ascending image id) so that norms,
    linears and MLPs run on exactly the T live tokens; attention, which must stay within an image,
    runs on a padded (batch, heads, length, head_dim) copy with a key-padding mask.

    counts:    (num_images,) tokens of each image in the pack (0 for images not in it).
    batch:     images with at least one token; length: tokens of the longest.
    pad_index: (T,) row of each packed token in the flattened (batch * length) layout; None when every
               image has `length` tokens (the pack is then already the padded layout).
    key_mask:  (batch, 1, 1, length) True for real tokens; None when there is no padding.
    """

    counts: torch.Tensor
    batch: int
    length: int
    pad_index: torch.Tensor | None
    key_mask: torch.Tensor | None

    @classmethod
    def from_image_ids(cls, image: torch.Tensor, num_images: int) -> PackedLayout:
        """Layout of a pack whose token t belongs to image `image[t]` (non-decreasing)."""
        counts = torch.bincount(image, minlength=num_images)
        present = counts > 0
        batch, length = torch.stack([present.sum(), counts.max()]).tolist()
        if batch * length == image.numel():
            return cls(counts, batch, length, None, None)
        rank = present.cumsum(0) - 1
        start = counts.cumsum(0) - counts
        position = torch.arange(image.numel(), device=image.device) - start[image]
        pad_index = rank[image] * length + position
        lengths = counts[present]
        key_mask = torch.arange(length, device=image.device) < lengths.unsqueeze(1)
        return cls(counts, batch, length, pad_index, key_mask.view(batch, 1, 1, length))


def packed_attention(attn: nn.Module, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """A timm `Attention` on packed tokens (T, C): linears on the pack, fused attention per image."""
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x)
    if layout.pad_index is not None:
        padded = qkv.new_zeros(layout.batch * layout.length, qkv.shape[-1])
        qkv = padded.index_copy_(0, layout.pad_index, qkv)
    qkv = qkv.view(layout.batch, layout.length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.key_mask, dropout_p=dropout, scale=attn.scale)
    out = out.transpose(1, 2).reshape(layout.batch * layout.length, attn.num_heads * attn.head_dim)
    if layout.pad_index is not None:
        out = out.index_select(0, layout.pad_index)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def packed_block(block: nn.Module, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """A timm pre-norm `Block` on packed tokens (T, C) of several images (see `PackedLayout`)."""
    x = x + block.drop_path1(block.ls1(packed_attention(block.attn, block.norm1(x), layout)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
