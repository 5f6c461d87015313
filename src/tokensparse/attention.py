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


def _gate(attn: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    return attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None


def _is_view(attn: object) -> bool:
    """Whether `attn` is a backbone family's `AttentionView` (tokensparse.adapters) rather than timm's own
    `Attention`."""
    return callable(getattr(attn, "heads", None))


def _heads(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, heads, N, head_dim) of a timm `Attention` (or a family's view) on x (B, N, C), after
    q_norm / k_norm (and the view's positions)."""
    if _is_view(attn):
        return attn.heads(x)
    batch, n, _ = x.shape
    q, k, v = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _output(attn: nn.Module, out: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """The tail of a timm `Attention` on merged heads (..., heads * head_dim): norm, gate, projection."""
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def _project(attn: nn.Module, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The output (B, N, C) of `attn` (timm's `Attention` or a family's view) from merged heads `out`; `x` is
    the attention's input (for a gate)."""
    if _is_view(attn):
        return attn.finish(out, x)
    return _output(attn, out, _gate(attn, x))


def position_bias(attn: nn.Module) -> torch.Tensor | None:
    """The (B or 1, heads, N, N) logit bias a family's view adds for the tokens' positions, or None."""
    return attn.position_bias() if _is_view(attn) else None


def _merge_heads(out: torch.Tensor) -> torch.Tensor:
    batch, heads, n, dim = out.shape
    return out.transpose(1, 2).reshape(batch, n, heads * dim)


def masked_attention(attn: nn.Module, x: torch.Tensor, keep: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Run a timm `Attention` module with `softmax_with_keep` in place of its softmax."""
    q, k, v = _heads(attn, x)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    position = position_bias(attn)
    if position is not None:
        logits = logits + position
    probs = softmax_with_keep(logits, keep, eps)
    return _project(attn, _merge_heads(attn.attn_drop(probs) @ v), x)


def attention_parts(
    attn: nn.Module, x: torch.Tensor, key_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A timm `Attention` forward (its own weights, fused attention) that also returns q and k.

    key_bias: optional (B, N) added to every query's scaled logits for each key. Returns the output
    (B, N, C) and q, k (B, heads, N, head_dim) after q_norm / k_norm.
    """
    batch, n, _ = x.shape
    q, k, v = _heads(attn, x)
    mask = None if key_bias is None else key_bias.to(q.dtype).view(batch, 1, 1, n)
    position = position_bias(attn)
    if position is not None:
        mask = position.to(q.dtype) if mask is None else mask + position.to(q.dtype)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=attn.scale)
    return _project(attn, _merge_heads(out), x), q, k


def add_attention(block: nn.Module, x: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
    """The residual of a timm pre-norm `Block`'s attention branch: x + drop_path1(ls1(attention_output))."""
    return x + block.drop_path1(block.ls1(attention_output))


def mlp_tail(block: nn.Module, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The second half of a timm pre-norm `Block`: x + drop_path2(ls2(mlp(norm2(x)))).

    keep: optional (..., 1) mask multiplying the MLP branch's input before and after its norm (A-ViT's
    training form).
    """
    hidden = block.norm2(x) if keep is None else block.norm2(x * keep) * keep
    return x + block.drop_path2(block.ls2(block.mlp(hidden)))


def masked_block(block: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """A timm pre-norm `Block` whose attention only sees kept keys (all tokens stay in `x`)."""
    return mlp_tail(block, add_attention(block, x, masked_attention(block.attn, block.norm1(x), keep)))


# --- A-ViT -----------------------------------------------------------------------------------------


def key_masked_attention(attn: nn.Module, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
    """Run a timm `Attention` with an additive per-key bias (B, N) on the scaled logits (queries unmasked)."""
    return attention_parts(attn, x, key_bias)[0]


def halting_block(
    block: nn.Module,
    x: torch.Tensor,
    running: torch.Tensor,
    key_bias: float = -1000.0,
    straight_through_zeroing: bool = True,
) -> torch.Tensor:
    """A timm `Block` in A-ViT's training form: halted tokens stay in `x` but take no part.

    running: (B, N), 1 for tokens still computing. As in the authors' `Block_ACT.forward_act`, the
    mask multiplies each branch's input before and after its norm, and halted tokens are attention
    keys with logit bias `key_bias` (-1000, added after scaling); their own rows are still computed
    (from zero input) because the per-block mean halting score includes them.

    The block's input is zeroed at halted tokens first. straight_through_zeroing=True (default) does
    it as the authors' training does (`out.data = out.data * mask` in `forward_features_act_token`):
    same values, but the gradient passes the zeroing unchanged, so the distributional prior's
    gradient from a halted token's later halting scores reaches the blocks that token ran through
    (via the residual path). False makes it an ordinary product: the gradient of a halted row's input
    is zero. Only the prior's gradient differs; cross-entropy and ponder gradients are the same.
    """
    keep = running.unsqueeze(-1).to(x.dtype)
    if straight_through_zeroing:
        x = x - (x * (1.0 - keep)).detach()  # exactly x where keep = 1 and 0 where keep = 0
    else:
        x = x * keep
    attn = key_masked_attention(block.attn, block.norm1(x) * keep, (1.0 - running) * key_bias)
    return mlp_tail(block, add_attention(block, x, attn), keep)


def length_buckets(
    lengths: list[int], max_buckets: int = 4, min_saving: float = 0.05
) -> list[tuple[int, int]]:
    """Split lengths sorted in descending order into contiguous runs [start, end) padded to their first.

    Greedy: split where it saves the most padded attention work (run size * length^2), while a split
    saves at least `min_saving` of the current total and there are fewer than `max_buckets` runs.
    """
    if not lengths:
        return []
    runs = [(0, len(lengths))]
    cost = lambda a, b: (b - a) * lengths[a] ** 2  # noqa: E731
    total = cost(0, len(lengths))
    while len(runs) < max_buckets:
        best = (0, None, None)
        for r, (a, b) in enumerate(runs):
            for m in range(a + 1, b):
                saving = cost(a, b) - cost(a, m) - cost(m, b)
                if saving > best[0]:
                    best = (saving, r, m)
        saving, r, m = best
        if r is None or saving < min_saving * total:
            break
        a, b = runs[r]
        runs[r : r + 1] = [(a, m), (m, b)]
        total -= saving
    return runs


@dataclass
class PackedLayout:
    """Where the rows of a packed (T, C) token tensor sit in padded attention batches.

    The tokens of several images are packed image after image (ascending image id) so that norms,
    linears and MLPs run on exactly the T live tokens. Attention must stay within an image: it runs
    on padded copies (images, heads, length, head_dim) with a key-padding mask, the images grouped
    by token count into a few buckets (`length_buckets`) so that short images are not padded to the
    longest one.

    counts:    (num_images,) tokens of each image in the pack (0 for images not in it); None when
               the pack is one image's tokens (its count is the pack's length).
    buckets:   (images, length) of each padded batch; their rows are concatenated in one buffer.
    pad_index: (T,) row of each packed token in that buffer; None when the pack is the buffer already
               (one bucket, every image of full length).
    key_masks: per bucket, (images, 1, 1, length) True for real tokens, or None without padding.
    """

    buckets: list[tuple[int, int]]
    pad_index: torch.Tensor | None
    key_masks: list[torch.Tensor | None]
    counts: torch.Tensor | None = None

    @classmethod
    def full(cls, num_images: int, length: int, device: torch.device | None = None) -> PackedLayout:
        """Every image with `length` tokens: no padding."""
        counts = torch.full((num_images,), length, dtype=torch.long, device=device)
        return cls([(num_images, length)], None, [None], counts)

    @classmethod
    def single(cls, length: int) -> PackedLayout:
        """One image's `length` tokens: one bucket without padding, and no counts (the pack's length)."""
        return cls([(1, length)], None, [None])

    @classmethod
    def from_image_ids(cls, image: torch.Tensor, num_images: int, max_buckets: int = 4) -> PackedLayout:
        """Layout of a pack whose token t belongs to image `image[t]` (non-decreasing)."""
        counts = torch.bincount(image, minlength=num_images)
        lengths = counts.tolist()
        order = sorted((i for i in range(num_images) if lengths[i]), key=lambda i: -lengths[i])
        if not order:
            return cls([], None, [], counts)
        runs = length_buckets([lengths[i] for i in order], max_buckets)
        if len(runs) == 1 and lengths[order[0]] == lengths[order[-1]]:
            return cls([(len(order), lengths[order[0]])], None, [None], counts)
        slot, buckets, key_masks, offset = [0] * num_images, [], [], 0
        for a, b in runs:
            length = lengths[order[a]]
            for rank, i in enumerate(order[a:b]):
                slot[i] = offset + rank * length
            buckets.append((b - a, length))
            if lengths[order[b - 1]] == length:
                key_masks.append(None)
            else:
                real = torch.tensor([lengths[i] for i in order[a:b]], device=image.device)
                mask = torch.arange(length, device=image.device) < real.unsqueeze(1)
                key_masks.append(mask.view(b - a, 1, 1, length))
            offset += (b - a) * length
        start = counts.cumsum(0) - counts
        position = torch.arange(image.numel(), device=image.device) - start[image]
        pad_index = torch.tensor(slot, device=image.device)[image] + position
        return cls(buckets, pad_index, key_masks, counts)


def packed_attention(
    attn: nn.Module, x: torch.Tensor, layout: PackedLayout, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """A timm `Attention` (or a family's view) on packed tokens (T, C): linears on the pack, fused attention
    per image. positions: (T,) each token's place in its image's sequence (prefix first), which a family's
    view reads for rotary rows and relative-position bias; unused by timm's `Attention`."""
    view = _is_view(attn)
    if view:
        q, k, v = attn.packed_heads(x, positions)  # (T, heads, head_dim) each, positions applied
        qkv = torch.cat([q, k, v], dim=1).reshape(x.shape[0], -1)
    else:
        qkv = attn.qkv(x)
    if layout.pad_index is not None:
        rows = sum(images * length for images, length in layout.buckets)
        qkv = qkv.new_zeros(rows, qkv.shape[-1]).index_copy_(0, layout.pad_index, qkv)
        if view:
            positions = positions.new_zeros(rows).index_copy_(0, layout.pad_index, positions)
    dropout = attn.attn_drop.p if attn.training else 0.0
    outputs, offset = [], 0
    for (images, length), key_mask in zip(layout.buckets, layout.key_masks, strict=True):
        part = qkv[offset : offset + images * length]
        q, k, v = part.view(images, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mask = key_mask
        if view:
            bias = attn.pair_bias(positions[offset : offset + images * length].view(images, length))
            if bias is not None:
                mask = bias if key_mask is None else bias.masked_fill(~key_mask, float("-inf"))
        else:
            q, k = attn.q_norm(q), attn.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=attn.scale)
        outputs.append(out.transpose(1, 2).reshape(images * length, -1))
        offset += images * length
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    if layout.pad_index is not None:
        out = out.index_select(0, layout.pad_index)
    return _project(attn, out, x)


def packed_block(
    block: nn.Module, x: torch.Tensor, layout: PackedLayout, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """A timm pre-norm `Block` (or a family's view) on packed tokens (T, C) of several images (see
    `PackedLayout`); positions: (T,) each token's place in its image's sequence (see `packed_attention`)."""
    out = packed_attention(block.attn, block.norm1(x), layout, positions)
    return mlp_tail(block, add_attention(block, x, out))
