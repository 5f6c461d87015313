"""Token Merging, ToMe (Bolya et al., ICLR 2023): every block merges its r most similar tokens.

In every block, between attention and MLP, bipartite soft matching on the attention keys (mean over
heads): the tokens alternate into sets A (even positions) and B (odd positions), each A token finds
its most similar B token by cosine similarity, and the r A tokens with the best matches are merged
into them by a size-weighted average (several may join one B token). Prefix tokens (class,
distillation, registers) are never merged. A token's size counts the input tokens it holds; with
proportional attention, log(size) is added to the attention logits so a merged token weighs as much
as the tokens it stands for. r is capped in each block at half the mergeable tokens.

As the authors' timm patch: no parameters, the same forward in training (ToMe fine-tunes with merging
on; they advise prop_attn=False there) and inference, `model.r` settable after patching (an int, a
per-block list, or ToMe's (r, inflection) schedule), merged tokens ordered as theirs (unmerged A
tokens, then B), so every block matches the same pairs as their code.

Bookkeeping of the last forward: `tome_stats(model)` (`ToMeStats`; also by name in
`sparsity_info(model).extra`). `patch_index` names, for each output patch token, the patch
it is anchored at (a B token keeps its identity when A tokens merge into it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from ..adapters import backbone_of
from ..attention import add_attention, attention_parts, mlp_tail
from ..checks import check_flag, is_int
from ..engine import SparseInfo, TokenPolicy, TokenState, check_model, policy_stats, sparsify
from .baselines import mlp_macs, reduced_mlp_flops
from .registry import DISTILL_WEIGHT, TARGET_GFLOPS, Method, Setting, register_method

if TYPE_CHECKING:
    from ..config import TrainConfig

MergeRate = int | list[int] | tuple[int, float]


def merge_schedule(r: MergeRate, depth: int) -> list[int]:
    """Tokens to merge in each of `depth` blocks, as ToMe's `parse_r`: r per block, a per-block list
    (missing blocks merge none) or (r, inflection) with inflection in [-1, 1] (-1: ToMe's decreasing
    schedule)."""
    if isinstance(r, tuple):
        rate, inflection = r if len(r) == 2 else (None, None)
        if not (
            is_int(rate) and rate >= 0 and isinstance(inflection, (int, float)) and -1.0 <= inflection <= 1.0
        ):
            raise ValueError(
                f"an (r, inflection) schedule needs an int r >= 0 and inflection in [-1, 1], got {r!r}"
            )
        low = int(rate * (1.0 - inflection))
        step = (2 * rate - 2 * low) / max(depth - 1, 1)
        return [int(low + step * i) for i in range(depth)]
    if isinstance(r, list):
        if len(r) > depth or not all(is_int(v) and v >= 0 for v in r):
            raise ValueError(f"a per-block r must list at most {depth} ints >= 0 (one per block), got {r!r}")
        return list(r) + [0] * (depth - len(r))
    if not is_int(r) or r < 0:
        raise ValueError(
            f"r must be an int >= 0 (tokens merged per block), a per-block list or (r, inflection); got {r!r}"
        )
    return [r] * depth


@dataclass
class Matching:
    """One block's bipartite matching over t tokens: A = even positions, B = odd positions.

    unmerged: (B, U) A indices that stay, in output order; merged: (B, r) A indices merged away;
    target: (B, r) the B index each merged token joins; order: permutation of the output rows putting
    the prefix tokens first in their original order, None when they already are.
    """

    unmerged: torch.Tensor
    merged: torch.Tensor
    target: torch.Tensor
    order: torch.Tensor | None

    def merge(self, x: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        """`x` (B, t, C) -> (B, t - r, C): the unmerged A rows, then the B rows with their merged A rows
        reduced in by `reduce` (a `torch.scatter_reduce` mode; default "sum", as ToMe's merge_wavg)."""
        a, b = x[:, ::2], x[:, 1::2]
        channels = x.shape[-1]
        unmerged = a.gather(1, self.unmerged.unsqueeze(-1).expand(-1, -1, channels))
        merged = a.gather(1, self.merged.unsqueeze(-1).expand(-1, -1, channels))
        b = b.scatter_reduce(1, self.target.unsqueeze(-1).expand(-1, -1, channels), merged, reduce=reduce)
        out = torch.cat([unmerged, b], dim=1)
        return out if self.order is None else out[:, self.order]

    def destination(self, tokens: int) -> torch.Tensor:
        """(B, t) output row of each of the `tokens` (t) input rows."""
        batch, kept = self.unmerged.shape
        device = self.unmerged.device
        to_a = torch.empty(batch, (tokens + 1) // 2, dtype=torch.long, device=device)
        to_a.scatter_(1, self.unmerged, torch.arange(kept, device=device).expand(batch, -1))
        to_a.scatter_(1, self.merged, kept + self.target)
        rows = torch.empty(batch, tokens, dtype=torch.long, device=device)
        rows[:, ::2] = to_a
        rows[:, 1::2] = kept + torch.arange(tokens // 2, device=device)
        if self.order is not None:
            rows = torch.empty_like(self.order).scatter_(
                0, self.order, torch.arange(len(self.order), device=device)
            )[rows]
        return rows

    def anchors(self, tokens: int) -> torch.Tensor:
        """(B, t - r) input row each output row is anchored at (itself, or the B token merged into), for
        `tokens` (t) input rows."""
        batch = self.unmerged.shape[0]
        b_rows = 2 * torch.arange(tokens // 2, device=self.unmerged.device) + 1
        rows = torch.cat([2 * self.unmerged, b_rows.expand(batch, -1)], dim=1)
        return rows if self.order is None else rows[:, self.order]


@torch.no_grad()
def bipartite_matching(metric: torch.Tensor, r: int, num_prefix: int) -> Matching:
    """ToMe's bipartite soft matching of (B, t, d) `metric` merging `r` tokens; the first `num_prefix`
    (prefix) tokens stay apart."""
    tokens = metric.shape[1]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    prefix_a, prefix_b = (num_prefix + 1) // 2, num_prefix // 2
    scores[:, :prefix_a, :] = -torch.inf
    scores[:, :, :prefix_b] = -torch.inf
    best, target = scores.max(dim=-1)
    ranked = best.argsort(dim=-1, descending=True)
    unmerged, merged = ranked[:, r:], ranked[:, :r]
    if num_prefix:
        unmerged = unmerged.sort(dim=-1).values  # the prefix A tokens (never matched) first
    order = None
    if prefix_b:
        kept = unmerged.shape[1]
        prefix = [p // 2 if p % 2 == 0 else kept + p // 2 for p in range(num_prefix)]
        rest = list(range(prefix_a, kept)) + list(range(kept + prefix_b, kept + tokens // 2))
        order = torch.tensor(prefix + rest, device=metric.device)
    return Matching(unmerged, merged, target.gather(1, merged), order)


@dataclass
class ToMeStats:
    """What ToMe's last forward did, per image (B images of P + N input tokens, T output tokens).

    token_size:     (B, T) input tokens each output token holds (None until a block merges).
    token_group:    (B, P + N) the output token each input token ended in (prefix first).
    merge_schedule: the r each block merged (capped at half the mergeable tokens).
    mlp_tokens:     (B, depth) tokens that reached each block's MLP.
    source:         (B, T, P + N) token_group as a 0/1 matrix, with trace_source=True; else None.
    """

    token_size: torch.Tensor | None
    token_group: torch.Tensor
    merge_schedule: list[int]
    mlp_tokens: torch.Tensor | None = None
    source: torch.Tensor | None = None


class ToMePolicy(TokenPolicy, nn.Module):
    """ToMe's block: attention (proportional to token size), merge, MLP. No parameters.

    model: the ViT (its MLP widths, for the FLOP count); prop_attn and trace_source as in `tome`, which
    checks them and gives the defaults."""

    method = "tome"

    map_kind = "groups"

    def solved_setting(self, model: nn.Module, name: str) -> int:
        """ToMe's r (the setting `name`) as a run of `model` trains it: one r for every block (a per-block
        schedule is refused)."""
        if isinstance(model.r, list):
            raise ValueError(
                f"the budget needs a per-block ToMe r ({model.r}), and a run trains one r for every block: "
                "choose a budget one r reaches (tokensparse eval --target-gflops tells), or --tome-r"
            )
        return int(model.r)

    def map_heading(self, model: nn.Module, info: SparseInfo) -> str:
        r = getattr(model, "r", None)
        return f"ToMe{f' r={r}' if r is not None else ''}: each colour is one token after the last block"

    def __init__(self, model: VisionTransformer, prop_attn: bool, trace_source: bool):
        super().__init__()
        self.prop_attn = prop_attn
        self.trace_source = trace_source
        self.mlp_macs = mlp_macs(model)
        backbone = backbone_of(model)
        self.head_dims = tuple(backbone.head_dim(i) for i in range(len(backbone.blocks)))

    def extra_repr(self) -> str:
        return f"prop_attn={self.prop_attn}, trace_source={self.trace_source}"

    def begin(self, model: VisionTransformer, state: TokenState) -> None:
        tokens = state.x.shape[1]
        state.policy_state = ToMeStats(
            token_size=None,
            token_group=torch.arange(tokens, device=state.x.device).expand(state.batch_size, -1),
            merge_schedule=merge_schedule(model.r, len(self.head_dims)),
        )

    def before_block(self, index: int, state: TokenState) -> None:
        state.active_tokens = torch.full((state.batch_size,), state.x.shape[1], device=state.x.device)

    def run_block(self, index: int, block: nn.Module, state: TokenState) -> None:
        run: ToMeStats = state.policy_state
        size = run.token_size
        bias = size.log() if self.prop_attn and size is not None else None
        out, _, keys = attention_parts(block.attn, block.norm1(state.x), bias)
        x = add_attention(block, state.x, out)
        tokens, prefix = x.shape[1], state.num_prefix
        r = min(run.merge_schedule[index], (tokens - prefix) // 2)
        run.merge_schedule[index] = max(r, 0)
        if r > 0:
            matching = bipartite_matching(keys.mean(dim=1), r, prefix)
            weight = (x.new_ones(x.shape[:2]) if size is None else size).unsqueeze(-1)
            x = matching.merge(x * weight)
            weight = matching.merge(weight)
            x = x / weight
            run.token_size = weight.squeeze(-1)
            run.token_group = matching.destination(tokens).gather(1, run.token_group)
            patch_of_row = torch.cat(
                [state.patch_index.new_full((x.shape[0], prefix), -1), state.patch_index], 1
            )
            state.patch_index = patch_of_row.gather(1, matching.anchors(tokens))[:, prefix:]
        state.record_mlp_tokens(x.shape[1])
        state.x = mlp_tail(block, x)

    def token_of_patch(self, info: SparseInfo) -> torch.Tensor:
        """(B, N) the final patch token each patch was merged into (ToMe's source map, prefix left out)."""
        return info.extra["token_group"][:, info.num_prefix :] - info.num_prefix

    def token_size(self, info: SparseInfo) -> torch.Tensor:
        """(B, M) patches each final patch token holds (ToMe's sizes, the prefix tokens left out)."""
        return info.extra["token_size"][:, info.num_prefix :]

    def end(self, state: TokenState) -> None:
        run: ToMeStats = state.policy_state
        run.mlp_tokens = torch.stack(state.mlp_tokens, dim=1)
        if run.token_size is None:
            run.token_size = state.x.new_ones(state.x.shape[:2])
        if self.trace_source:
            rows = torch.arange(state.x.shape[1], device=run.token_group.device).view(1, -1, 1)
            run.source = (run.token_group.unsqueeze(1) == rows).to(state.x.dtype)
        state.stats = run

    def extra_flops(self, info: SparseInfo, num_patches: int) -> torch.Tensor:
        """(B,) multiply-adds (what the papers call FLOPs) of the forward `info` describes beyond
        `backbone_flops` on the tokens each block started with: the similarity matmul of each merging block
        (A x B x head_dim) minus the MLP work on the tokens merged before it. `num_patches` (N) is not
        needed here."""
        tokens = info.tokens_per_block.detach().to("cpu", torch.float64)
        merged = tokens > info.mlp_tokens.detach().to("cpu", torch.float64)
        head_dim = torch.tensor(self.head_dims, dtype=torch.float64)
        matching = torch.ceil(tokens / 2) * torch.floor(tokens / 2) * head_dim * merged
        return matching.sum(dim=1) + reduced_mlp_flops(self, info)


tome_flops = ToMePolicy.extra_flops  # (policy, info, num_patches) -> (B,): ToMe's FLOP term as a function


def tome_stats(model: nn.Module) -> ToMeStats:
    """Token sizes, groups, the merge schedule and MLP token counts of the last forward of `model`, made
    by `tome` (`ToMeStats`)."""
    return policy_stats(model, ToMePolicy, ToMeStats, "tome_stats", "tome")


def tome(
    model: VisionTransformer,
    r: MergeRate = 0,
    prop_attn: bool = True,
    trace_source: bool = False,
    target_gflops: float | None = None,
) -> VisionTransformer:
    """Patch `model` with Token Merging in place (and return it), merging r tokens in every block.

    Like `tome.patch.timm(model)` followed by `model.r = r`; change `model.r` at any time. r defaults to 0 (no
    merging, as ToMe's patch leaves it; `merge_schedule` lists the forms r takes); the registry's fine-tuning
    recipe uses r=8. prop_attn (default True, as ToMe's patch) adds log(token size) to the attention logits
    (for off-the-shelf models; ToMe trains with it off, Bolya et al. 2023). trace_source (default False) also
    records `source` (B, T, P + N), which input tokens each output token holds. `target_gflops` (GMACs per
    image: multiply-adds, what the papers call FLOPs; default None) instead of r: the r (one for every block,
    else a per-block list) executing at most that many GMACs per image at the model's input size, within 2%
    (`tokensparse.budget`).
    """
    backbone = check_model(model)
    if target_gflops is not None and r != 0:
        raise ValueError(f"give r or target_gflops, not both (r={r!r}, target_gflops={target_gflops!r})")
    merge_schedule(r, len(backbone.blocks))
    check_flag("prop_attn", prop_attn)
    check_flag("trace_source", trace_source)
    policy = ToMePolicy(model, prop_attn, trace_source)
    sparsify(model, policy, "tome")
    model.r = r
    if target_gflops is not None:
        from ..budget import solve_merge_schedule

        model.r = solve_merge_schedule(model, target_gflops)
    return model


def from_config(model: VisionTransformer, cfg: TrainConfig) -> VisionTransformer:
    """`tome` on `model` with the settings of the `TrainConfig` `cfg` (the registry's constructor)."""
    return tome(model, r=cfg.tome_r or 0, target_gflops=cfg.target_gflops)


register_method(
    Method(
        "tome",
        sparsify=from_config,
        recipe=dict(tome_r=8, distill_weight=0.5),
        settings=(
            Setting("tome_r", int, "tokens merged in every block", low=0),
            TARGET_GFLOPS,
            DISTILL_WEIGHT,
        ),
        bench_setting="tome_r",
        setting_name="r",
        budget_knob="tome_r",
    )
)
