"""EViT (Liang et al., ICLR 2022): keep the tokens the class token attends to, fuse the rest into one.

At each location block, between attention and MLP (where the authors reorganise tokens), the tokens
after the prefix are ranked by the class token's attention in that block (softmax probabilities of
the class-token query, mean over heads). The top ones stay; with `fuse`, the others become one token,
sum_i a_i x_i over the dropped tokens i with their attention a_i (not renormalised, as the authors'
code computes it), appended after the kept tokens; the MLP and the later blocks run on the shorter
sequence. No parameters. Training runs the same forward (the authors fine-tune with tokens removed);
their fine-tuning anneals the keep rate (1 for `shrink_start_epoch` epochs, then a cosine to the base
rate over `shrink_epochs`, per iteration, one rate for all locations): a training loop can do the same
by setting `get_policy(model).keep_ratio` before each step, as the count is computed every forward.

Two token-count rules (`counts`):

- "authors" (default): the authors' evit.py, exactly. A location keeps ceil(keep_ratio * T) of the
  T tokens present after the prefix, the current count rather than the original patch count (196 ->
  138, 97, 68 at 0.7 without fusion; 138, 98, 70 with it), and nothing changes (no fused token either)
  where that keeps them all. From the second location on the previous fused token is ranked together
  with the patches: if it is among the top ones it stays as a token of its own, else it is fused into
  the new one. A fused token is not a patch: in `patch_index`, `kept_index` and
  `sparsity_info(model).patch_index` it appears as the index N (the number of patches), and, since
  images can keep different numbers of real patches, `kept_index[s]` has ceil(keep_ratio * T) entries
  per image, ascending, a kept fused token last as N. The authors' code ranks every non-class token,
  a DeiT distillation token included; here only the tokens after all prefix tokens are ranked.
- "dynamicvit": DynamicViT's counts, for comparisons with DynamicViT at equal token counts and FLOPs:
  stage s keeps int(N * keep_ratio ** (s + 1)) patch tokens, plus the fused token. Here the fused token
  is kept outside `state.x` (`EViTStats.fused_token`, joined for each block) and never ranked;
  a later stage folds it into the new one with its own attention weight, so `patch_index`,
  `kept_index` and `sparsity_info` name real patches only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from ..adapters import backbone_of
from ..attention import add_attention, attention_parts, mlp_tail, position_bias
from ..checks import check_flag
from ..engine import SparseInfo, TokenPolicy, TokenState, check_model, check_vit, policy_stats, sparsify
from .baselines import mlp_macs, reduced_mlp_flops
from .dynamicvit import check_keep_ratio, check_locations, keep_counts, meet_budget, ratio_or_budget
from .registry import DISTILL_WEIGHT, KEEP_RATIO, LOCATIONS, TARGET_GFLOPS, Method, register_method

if TYPE_CHECKING:
    from ..config import TrainConfig

Counts = Literal["authors", "dynamicvit"]
COUNTS = ("authors", "dynamicvit")


def authors_keep_counts(patches: int, keep_ratio: float, stages: int, fuse: bool) -> list[int]:
    """Tokens the authors' EViT keeps at each of `stages` locations, from `patches` tokens after the prefix,
    at keep rate `keep_ratio`; with `fuse` the previous location's fused token is ranked too.

    math.ceil(keep_rate * (N - 1)) on Python floats, N - 1 the non-class tokens present (the previous
    fused token included); a location that would keep them all changes nothing.
    """
    ranked, counts = patches, []
    for _ in range(stages):
        count = math.ceil(keep_ratio * ranked)
        counts.append(count)
        if count < ranked:
            ranked = count + int(fuse)
    return counts


@dataclass
class EViTStats:
    """What EViT's last forward did (B images).

    fused_token:      with counts="dynamicvit" and fuse, the (B, 1, C) fused token after the last
                      block, kept outside the patch tokens; else None (the authors' counts keep it in
                      the sequence, last).
    class_row_tokens: per location, the tokens of the class-attention row computed to rank them (0
                      where the location kept every token).
    mlp_tokens:       (B, depth) tokens that reached each block's MLP.
    """

    fused_token: torch.Tensor | None
    class_row_tokens: list[int]
    mlp_tokens: torch.Tensor | None = None


class EViTPolicy(TokenPolicy, nn.Module):
    """EViT's token reorganisation at `locations`. No parameters.

    model: the ViT (its MLP and attention widths, for the FLOP count); keep_ratio, locations, fuse and
    counts (default "authors") as in `evit`, which checks them and gives the paper's defaults."""

    method = "evit"

    def __init__(
        self,
        model: VisionTransformer,
        keep_ratio: float,
        locations: Sequence[int],
        fuse: bool,
        counts: Counts = "authors",
    ):
        super().__init__()
        self.keep_ratio = float(keep_ratio)
        self.locations = tuple(int(i) for i in locations)
        self.fuse = fuse
        self.counts = counts
        self.mlp_macs = mlp_macs(model)
        backbone = backbone_of(model)
        self.attn_dims = tuple(int(backbone.pair_macs(i) // 2) for i in range(len(backbone.blocks)))

    def map_heading(self, model: nn.Module, info: SparseInfo) -> str:
        fused = ", the rest fused into one token" if self.fuse else ""
        return f"EViT keep rate {self.keep_ratio:g}: kept patches{fused}, dropped ones greyed"

    def extra_repr(self) -> str:
        return f"keep_ratio={self.keep_ratio}, locations={self.locations}, fuse={self.fuse}, counts={self.counts!r}"

    def begin(self, model: VisionTransformer, state: TokenState) -> None:
        state.policy_state = EViTStats(fused_token=None, class_row_tokens=[])

    def before_block(self, index: int, state: TokenState) -> None:
        if self.counts == "dynamicvit":
            tokens = state.x.shape[1] + (state.policy_state.fused_token is not None)
            state.active_tokens = torch.full((state.batch_size,), tokens, device=state.x.device)

    def run_block(self, index: int, block: nn.Module, state: TokenState) -> None:
        fused = state.policy_state.fused_token
        x = state.x if fused is None else torch.cat([state.x, fused], dim=1)
        if index not in self.locations:
            state.record_mlp_tokens(x.shape[1])
            x = block(x)
        else:
            out, q, k = attention_parts(block.attn, block.norm1(x))
            x = add_attention(block, x, out)
            stage = self.locations.index(index)
            if self.counts == "authors":
                x = self.reorganize_authors(state, x, q, k, block.attn)
            else:
                x = self.reorganize(stage, state, x, q, k, block.attn)
            state.record_mlp_tokens(x.shape[1])
            x = mlp_tail(block, x)
        if self.counts == "authors":
            state.x = x
            return
        main = state.x.shape[1]
        state.x = x[:, :main]
        if state.policy_state.fused_token is not None:
            state.policy_state.fused_token = x[:, main:]

    def class_attention(self, state: TokenState, q: torch.Tensor, k: torch.Tensor, attn: Any) -> torch.Tensor:
        """(B, t): the class token's attention to every token (softmax, mean over heads) in the block whose
        attention is `attn` (its scale, and the position bias of a family that has one); records the tokens
        of the row computed for the FLOP count."""
        state.policy_state.class_row_tokens.append(k.shape[2])
        logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)
        position = position_bias(attn)
        if position is not None:
            logits = logits + position[:, :, :1]
        return logits.softmax(dim=-1).mean(dim=1)[:, 0]

    def reorganize_authors(
        self, state: TokenState, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, attn: Any
    ) -> torch.Tensor:
        """The authors' rule on `x` (B, P + T, C), all T tokens after the prefix ranked by the class attention
        (q, k of the block's attention `attn`); the MLP's input."""
        prefix, ranked = state.num_prefix, x.shape[1] - state.num_prefix
        count = math.ceil(self.keep_ratio * ranked)
        if count >= ranked:
            state.policy_state.class_row_tokens.append(0)
            self.record_stage(state, state.patch_index)
            return x
        attention = self.class_attention(state, q, k, attn)[:, prefix:]
        kept = attention.topk(count, dim=1).indices.sort(dim=1).values  # the order tokens had
        tokens = x[:, prefix:]
        channels = x.shape[-1]
        kept_tokens = tokens.gather(1, kept.unsqueeze(-1).expand(-1, -1, channels))
        patch_index = state.patch_index.gather(1, kept)
        self.record_stage(state, patch_index)
        parts = [x[:, :prefix], kept_tokens]
        if self.fuse:
            dropped = attention.scatter(1, kept, 0.0)  # the dropped tokens' attention, the kept ones' 0
            parts.append((tokens * dropped.unsqueeze(-1)).sum(dim=1, keepdim=True))
            patch_index = torch.cat(
                [patch_index, torch.full_like(patch_index[:, :1], state.num_patches)], dim=1
            )
        state.patch_index = patch_index
        return torch.cat(parts, dim=1)

    @staticmethod
    def record_stage(state: TokenState, kept_index: torch.Tensor) -> None:
        """Note a location's kept tokens (B, k) as original patch indices, N for a fused token."""
        state.kept_index.append(kept_index)
        decision = torch.zeros(state.batch_size, state.num_patches + 1, device=kept_index.device)
        state.keep_decisions.append(decision.scatter_(1, kept_index, 1.0)[:, : state.num_patches])

    def reorganize(
        self, stage: int, state: TokenState, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, attn: Any
    ) -> torch.Tensor:
        """DynamicViT's counts: keep the top patch tokens of `x` (B, t, C), ranked by the class attention (q, k
        of the block's attention `attn`); return the MLP's input."""
        prefix, present = state.num_prefix, state.patch_tokens.shape[1]
        count = keep_counts(state.num_patches, self.keep_ratio, self.locations)[stage]
        fused = state.policy_state.fused_token
        if count >= present:
            state.policy_state.class_row_tokens.append(0)
            state.x = x[:, : prefix + present]
            state.keep_top(count, lambda: None)
            return x
        attention = self.class_attention(state, q, k, attn)
        patch_attention = attention[:, prefix : prefix + present]
        state.x = x[:, : prefix + present]
        kept = state.keep_top(count, lambda: patch_attention)
        if self.fuse:
            dropped = torch.ones_like(patch_attention).scatter_(1, kept, 0.0) * patch_attention
            fused_new = (x[:, prefix : prefix + present] * dropped.unsqueeze(-1)).sum(dim=1, keepdim=True)
            if fused is not None:
                fused_new = fused_new + attention[:, -1:].unsqueeze(-1) * x[:, -1:]
            fused = fused_new
        elif fused is not None:
            fused = x[:, -1:]
        state.policy_state.fused_token = fused
        return state.x if fused is None else torch.cat([state.x, fused], dim=1)

    def end(self, state: TokenState) -> None:
        state.policy_state.mlp_tokens = torch.stack(state.mlp_tokens, dim=1)
        state.stats = state.policy_state

    def extra_flops(self, info: SparseInfo, num_patches: int) -> torch.Tensor:
        """(B,) multiply-adds (what the papers call FLOPs) of the forward `info` describes beyond
        `backbone_flops`: the class-token attention row each pruning location computes beside its fused
        attention (tokens x heads x head_dim), minus the MLP work on the tokens removed before that
        block's MLP. `num_patches` (N) is not needed here."""
        rows = info.extra["class_row_tokens"]
        class_row = sum(float(t) * self.attn_dims[i] for t, i in zip(rows, self.locations, strict=True))
        return class_row + reduced_mlp_flops(self, info)


evit_flops = EViTPolicy.extra_flops  # (policy, info, num_patches) -> (B,): EViT's FLOP term as a function


def evit_stats(model: nn.Module) -> EViTStats:
    """The fused token, class-attention rows and MLP token counts of the last forward of `model`, made by
    `evit` (`EViTStats`)."""
    return policy_stats(model, EViTPolicy, EViTStats, "evit_stats", "evit")


def evit(
    model: VisionTransformer,
    keep_ratio: float | None = None,
    locations: Sequence[int] | None = None,
    fuse: bool = True,
    counts: Counts = "authors",
    target_gflops: float | None = None,
) -> VisionTransformer:
    """Make `model` an EViT in place (and return it): token reorganisation in blocks `locations`.

    locations defaults to (3, 6, 9) for 12 blocks (EViT's and DynamicViT's). With fuse (default True,
    EViT's inattentive-token fusion, Liang et al. 2022), the tokens not kept become one
    attention-weighted token. counts="authors" (default) is the authors' evit.py:
    each location keeps ceil(keep_ratio * T) of the T tokens present, the previous fused token ranked
    with the patches (196 patches at 0.7: 138, 98, 70 kept with fusion; 138, 97, 68 without).
    counts="dynamicvit" keeps int(N * keep_ratio ** (s + 1)) patches at stage s (137, 96, 67),
    DynamicViT's counts, for equal-FLOP comparisons with DynamicViT. Needs a class token. keep_ratio
    defaults to 0.7, EViT's DeiT-S keep rate (Liang et al. 2022); `target_gflops` (GMACs per image:
    multiply-adds, what the papers call FLOPs; default None) instead of it: the largest keep ratio
    executing at most that many GMACs per image, within 2% (`tokensparse.budget`).
    """
    backbone = check_model(model)
    keep_ratio = check_keep_ratio(ratio_or_budget(keep_ratio, target_gflops))
    locations = check_locations(locations, len(backbone.blocks))
    if counts not in COUNTS:
        raise ValueError(f"counts must be one of {COUNTS}, got {counts!r}")
    if counts == "dynamicvit":
        check_vit(model, "EViT with counts='dynamicvit'", "its fused token is kept outside the sequence")
        keep_counts(backbone.num_patches(), keep_ratio, locations)
    check_flag("fuse", fuse)
    if not backbone.has_class_token:
        raise ValueError("EViT ranks patches by the class token's attention; this model has no class token")
    sparsify(model, EViTPolicy(model, keep_ratio, locations, fuse, counts), "evit")
    return meet_budget(model, target_gflops)


def from_config(model: VisionTransformer, cfg: TrainConfig) -> VisionTransformer:
    """`evit` on `model` with the settings of the `TrainConfig` `cfg` (the registry's constructor)."""
    return evit(model, keep_ratio=cfg.keep_ratio, locations=cfg.locations, target_gflops=cfg.target_gflops)


# a training-free ranking, fine-tuned with cross-entropy plus the teacher's logits
register_method(
    Method(
        "evit",
        sparsify=from_config,
        recipe=dict(keep_ratio=0.7, distill_weight=0.5),
        settings=(KEEP_RATIO, LOCATIONS, TARGET_GFLOPS, DISTILL_WEIGHT),
        bench_setting="keep_ratio",
        budget_knob="keep_ratio",
    )
)
