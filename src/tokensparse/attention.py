"""Attention forms the engine needs beyond timm's own fused blocks.

Training-time DynamicViT keeps every token and masks attention *multiplicatively*, so the keep
decisions stay in the autograd graph and the predictors get a gradient. Inference never comes here:
it runs timm's ordinary blocks on gathered (shorter) sequences.
"""

from __future__ import annotations

import torch
import torch.nn as nn


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
