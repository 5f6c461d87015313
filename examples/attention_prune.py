"""Attention-score pruning at one location: a whole tokensparse method in one file.

Before block `prune_location`, each image keeps the `keep_ratio` share of its patch tokens that the
class token attended to most in the block before (softmax over the keys, mean over the heads): EViT's
ranking, at one location and without fusing the rest. It adds no parameters; a run fine-tunes the
backbone with cross-entropy plus the dense teacher's logits.

Nothing else in tokensparse names it. Make it a method of every command with

    TOKENSPARSE_METHODS=examples/attention_prune.py tokensparse train --method attention-prune ...

(or import this module before calling the Python API); `tests/test_adding_a_method.py` trains,
evaluates, benchmarks and exports it that way. The README's "Adding a method" walks through it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from tokensparse.attention import add_attention, attention_parts, mlp_tail
from tokensparse.engine import SparseInfo, TokenPolicy, TokenState, check_vit, sparsify
from tokensparse.policies.registry import DISTILL_WEIGHT, KEEP_RATIO, Method, Setting, register_method


class AttentionPrunePolicy(TokenPolicy, nn.Module):
    """The engine's hooks: rank in block `location - 1`, keep the top tokens before block `location`."""

    method = "attention-prune"

    def __init__(self, keep_ratio: float, location: int, attn_dim: int):
        super().__init__()
        self.keep_ratio, self.location, self.attn_dim = float(keep_ratio), int(location), int(attn_dim)

    def run_block(self, index: int, block: nn.Module, state: TokenState) -> None:
        if index != self.location - 1:
            return super().run_block(index, block, state)
        # the block before: timm's block, split to read the class token's attention row (no mask is set yet)
        out, q, k = attention_parts(block.attn, block.norm1(state.x))
        x = add_attention(block, state.x, out)
        row = ((q[:, :, :1] * block.attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)[:, 0]
        state.policy_state = row[:, state.num_prefix :]  # (B, N): one score per patch token
        state.x = mlp_tail(block, x)

    def before_block(self, index: int, state: TokenState) -> None:
        # then keep the top share of the patch tokens
        if index != self.location:
            return
        count = math.ceil(self.keep_ratio * state.num_patches)
        if state.regime == "gather":  # inference: the dropped tokens leave the tensor
            state.keep_top(count, lambda: state.policy_state)
        else:  # training: every token stays, later blocks mask the dropped ones
            state.mask_top(count, state.policy_state.detach())

    def extra_flops(self, info: SparseInfo, num_patches: int) -> torch.Tensor:
        """The class token's attention row it computes again: tokens x attention width, per image."""
        # its own multiply-adds, beyond the blocks on their tokens
        return info.tokens_per_block[:, self.location - 1].double() * self.attn_dim

    def map_heading(self, model: nn.Module, info: SparseInfo) -> str:
        return (
            f"attention-prune keep {self.keep_ratio:g} before block {self.location}: dropped patches greyed"
        )


def attention_prune(model: nn.Module, keep_ratio: float = 0.7, location: int | None = None) -> nn.Module:
    """Prune `model` (a timm ViT with a class token) in place by class attention before one block
    (default: a third of the depth) and return it."""
    check_vit(model)
    if getattr(model, "cls_token", None) is None:
        raise ValueError("attention-prune ranks patches by the class token's attention; this model has none")
    depth = len(model.blocks)
    location = max(1, depth // 3) if location is None else location
    if not 1 <= location < depth:
        raise ValueError(
            f"prune_location must be in 1..{depth - 1} (a block with one before it), got {location}"
        )
    attn = model.blocks[location - 1].attn
    policy = AttentionPrunePolicy(keep_ratio, location, attn.num_heads * attn.head_dim)
    return sparsify(model, policy, "attention_prune")


def from_config(model: nn.Module, cfg) -> nn.Module:
    """`attention_prune` with a run's settings (`cfg` a resolved `TrainConfig`)."""
    return attention_prune(model, keep_ratio=cfg.keep_ratio, location=cfg.get("prune_location"))


register_method(
    Method(
        "attention-prune",
        sparsify=from_config,  # (dense model, resolved TrainConfig) -> sparse model
        recipe=dict(keep_ratio=0.7, distill_weight=0.5),  # its TrainConfig defaults
        settings=(
            KEEP_RATIO,  # a shared setting
            Setting("prune_location", int, "the block before which attention-prune drops tokens", low=1),
            DISTILL_WEIGHT,
        ),
        bench_setting="keep_ratio",  # what `tokensparse bench` sweeps
    )
)
