"""DiffRate (Chen et al., ICCV 2023): per block, prune the least class-attended tokens, then merge the
next least into the most attended; the counts are searched by gradient with the backbone frozen.

Every block, after its attention (with proportional attention: log token size added to every key's
logits), sorts the tokens by the class token's attention (mean over heads, the class token's own
column left out; the class token stays first), keeps the first `prune_kept[b]` (class token
included), and merges the ones after the first `merge_kept[b]` into the first `merge_kept[b]`: each
joins the one it is most similar to (cosine of the hidden states; never the class token), features
averaged unweighted, sizes adding the joiner's size times its similarity. The MLP then runs on what is
left. Counts are as the authors' `compression_rate.json` writes them: tokens left, class token
included, so block b leaves min(tokens before, prune_kept[b], merge_kept[b]). An average-pool head
(MAE's fine-tuned classifiers, timm's `global_pool="avg"`) takes the size-weighted mean of the final
patch tokens, class token left out, as their `DiffRate/patch/mae.py` (forward_features, inference:
sum(size x) / sum(size)); a class-token head is unchanged.

The search (`tokensparse train --method diffrate --target-gflops X`, or a model in train mode) keeps
every token and masks attention instead (DynamicViT's masked softmax). Each block's two counts are
`ceil(E) + 1` for the expectation E, under softmax(logits), of candidate patch counts (196, 192, ...,
4 at granularity 4), with a straight-through gradient; the mask's gradient is that of P(count > j).
The objective is cross-entropy plus 5 x (GFLOPs - target)^2 by the authors' FLOP formula
(`authors_flops`). Only the logits train (AdamW, lr 0.01 cosine to 0.001, no weight decay, 3 epochs).

Exact to github:OpenGVLab/DiffRate (commit 91ae3e3, `DiffRate/patch/deit.py`, `ddp.py`, `merge.py`,
`utils.py`): `tests/test_diffrate.py` checks logits, kept and merged tokens, sizes, the search's loss
and its gradients against outputs of their code. Kept as they are, on purpose: the unweighted mean of
merged features, sizes clamped to >= 1 in the search but not at inference, the FLOP gradient reaching
both counts of a block through their `ste_min`. One deviation: a searched model's counts are read from
its final logits (their code evaluates with the counts of the last training forward, one optimiser
step earlier). The MAE inference (pool included) is checked against their `patch/mae.py` and
`models_mae.py` on the MAE counts (`tests/golden/diffrate_mae_official.safetensors`); a search on an
average-pool model is not: it pools as the engine's masked average does (each patch token once, the
masked ones too) where theirs weights by size x mask, and it searches the last block too, which their
MAE patch keeps whole.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from ..attention import (
    _gate,
    _heads,
    _merge_heads,
    _output,
    add_attention,
    attention_parts,
    mlp_tail,
    softmax_with_keep,
)
from ..checks import is_int
from ..engine import SparseInfo, TokenPolicy, TokenState, check_vit, num_patches, sparsify
from .baselines import mlp_macs, reduced_mlp_flops
from .diffrate_published import MAE_FINETUNED, PUBLISHED, published_counts
from .diffrate_search import (
    CompressionRate,
    DiffRateLoss,
    authors_flops,
)
from .registry import DISTILL_WEIGHT, TARGET_GFLOPS, Method, Setting, register_method

if TYPE_CHECKING:
    from ..config import TrainConfig

GRANULARITY = 4  # the authors' --granularity: candidate patch counts N, N - 4, ..., 4


@dataclass
class DiffRateStats:
    """DiffRate's last forward: per block the tokens kept after pruning (`prune_kept`) and after merging
    (`merge_kept`), class token included, the final token sizes `size` (B, t) and, when traced, per block
    `owner` (B, N + 1): the position of the token holding each input token after that block, -1 where pruned,
    and `sizes` (B, t_b): the sizes of the tokens after that block; `search_flops`: the search's FLOPs (the
    authors' count, differentiable)."""

    prune_kept: list[int]
    merge_kept: list[int]
    size: torch.Tensor
    owner: list[torch.Tensor] | None = None
    sizes: list[torch.Tensor] | None = None
    search_flops: torch.Tensor | None = None


@dataclass
class _State:
    size: torch.Tensor
    mask: torch.Tensor | None = None
    owner: torch.Tensor | None = None
    owners: list[torch.Tensor] | None = None
    sizes: list[torch.Tensor] | None = None
    prune: list[Any] | None = None
    merge: list[Any] | None = None


class DiffRatePolicy(TokenPolicy, nn.Module):
    """DiffRate's pruning and merging in every block, at fixed counts or at searchable ones.

    model: the ViT (its depth, patches and widths); prune_kept and merge_kept: the fixed counts, or
    None for searchable ones; granularity (default 4: DiffRate's main.py `--granularity`, Chen et al.
    2023) and trace (default False) as in `diffrate`, which checks them."""

    method = "diffrate"
    map_kind = "kept"

    def __init__(
        self,
        model: VisionTransformer,
        prune_kept: Sequence[int] | None,
        merge_kept: Sequence[int] | None,
        granularity: int = GRANULARITY,
        trace: bool = False,
    ):
        super().__init__()
        depth, patches = len(model.blocks), num_patches(model)
        self.tokens = patches + 1
        self.depth = depth
        self.trace = trace
        self.embed_dim = int(model.embed_dim)
        self.patch_macs = int(model.patch_embed.proj.weight[0].numel()) * self.embed_dim
        self.head_macs = int(getattr(model.head, "weight", torch.zeros(0, 0)).numel())
        self.mlp_macs = mlp_macs(model)
        self.attn_dims = tuple(int(block.attn.num_heads * block.attn.head_dim) for block in model.blocks)
        self.fixed = prune_kept is not None
        if self.fixed:
            self.prune_kept, self.merge_kept = list(prune_kept), list(merge_kept)  # type: ignore[arg-type]
        else:  # searchable: block 0 never compresses (a single candidate), as the authors'
            self.prune_rates = nn.ModuleList(
                CompressionRate(patches, patches + 1 if b == 0 else granularity) for b in range(depth)
            )
            self.merge_rates = nn.ModuleList(
                CompressionRate(patches, patches + 1 if b == 0 else granularity) for b in range(depth)
            )

    def extra_repr(self) -> str:
        prune, merge = self.counts()
        return f"prune_kept={prune}, merge_kept={merge}, searchable={not self.fixed}"

    def counts(self) -> tuple[list[int], list[int]]:
        """(prune_kept, merge_kept) per block, class token included (a searchable policy: read from its
        logits, the authors' ceil(E) + 1, and kept as plain numbers while it infers, so an exported or
        compiled graph holds them as constants)."""
        if self.fixed:
            return list(self.prune_kept), list(self.merge_kept)
        if getattr(self, "_counts", None) is None:
            with torch.no_grad():
                self._counts = (
                    [int(rate.kept()) for rate in self.prune_rates],
                    [int(rate.kept()) for rate in self.merge_rates],
                )
        return self._counts

    def train(self, mode: bool = True) -> DiffRatePolicy:
        self._counts = None  # the logits may change in training; read them again after
        super().train(mode)
        if not mode and not self.fixed:
            self.counts()
        return self

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._counts = None

    def map_heading(self, model: nn.Module, info: SparseInfo) -> str:
        left = int(info.tokens_per_block[0, -1])
        return f"DiffRate: patches whose token survived (merged ones count with their destination); {left} tokens in the last block"

    def progress(self, info: SparseInfo) -> dict[str, str]:
        """The search's progress bar: its FLOPs (the authors' count) at the current counts."""
        flops = info.extra.get("search_flops")
        return {} if flops is None else {"gflops": f"{float(flops.detach()) / 1e9:.4g}"}

    def pool_weights(self, info: SparseInfo) -> torch.Tensor | None:
        """(B, M) the final sizes of the patch tokens of the forward `info` describes (class token left out):
        an average-pool head takes their size-weighted mean, as the authors' MAE inference
        (`DiffRate/patch/mae.py` forward_features: sum(size x) / sum(size)). None in the search, whose
        tokens all stay in the tensor."""
        size = info.extra.get("size")
        if size is None or info.extra.get("search_flops") is not None:
            return None
        if size.shape[1] - 1 != info.patch_tokens.shape[1]:
            return None
        return size[:, 1:]

    def begin(self, model: VisionTransformer, state: TokenState) -> None:
        batch = state.batch_size
        size = state.x.new_ones(batch, state.x.shape[1], 1)
        owner = None
        if self.trace:
            owner = torch.arange(state.x.shape[1], device=state.x.device).expand(batch, -1).clone()
        if state.regime == "mask" and not self.fixed:  # the search (fixed counts train as they infer)
            state.policy_state = _State(
                size, state.x.new_ones(batch, state.x.shape[1]), owner, [], [], [], []
            )
        else:
            prune, merge = self.counts()
            state.policy_state = _State(size, None, owner, [], [], prune, merge)

    # --- inference: the tokens leave the tensor ---------------------------------------------------

    def run_block(self, index: int, block: nn.Module, state: TokenState) -> None:
        if state.policy_state.mask is not None:
            return self._search_block(index, block, state)
        ps: _State = state.policy_state
        x, size = state.x, ps.size
        present = x.shape[1]
        prune = min(present, ps.prune[index])
        merge = min(prune, ps.merge[index])
        attn = block.attn
        bias = size[..., 0].log()  # proportional attention: log size added to every key's logits
        out, q, k = attention_parts(attn, block.norm1(x), bias)
        bias = bias.to(q.dtype)
        x = add_attention(block, x, out)
        if prune < present or merge < prune or self.trace:
            row = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1) + bias[:, None, None, :]).softmax(dim=-1)
            score = row.mean(dim=1)[:, 0, 1:]
            if self.trace:  # the whole order, to follow every input token
                order = _order(score)
                x, size = _take(x, order), _take(size, order)
                self._reorder(state, order)
                x, size = x[:, :prune], size[:, :prune]
                self._cut(state, prune)
            else:  # only the kept tokens, most attended first: one gather of what stays
                top = score.topk(prune - 1, dim=1).indices
                order = torch.cat([torch.zeros_like(top[:, :1]), top + 1], dim=1)
                x, size = _take(x, order), _take(size, order)
                state.patch_index = state.patch_index.gather(1, top)
            if merge < prune:
                node_max, node_idx = _matching(x, merge)
                size = _merge_sum(size, merge, node_idx, size[:, merge:] * node_max[..., None])
                x = _merge_mean_(x, merge, node_idx)
                self._merge(state, merge, node_idx)
        ps.size = size
        state.record_mlp_tokens(x.shape[1])
        state.x = mlp_tail(block, x)
        if self.trace:
            ps.owners.append(ps.owner.clone())
            ps.sizes.append(size[..., 0].clone())

    def _reorder(self, state: TokenState, order: torch.Tensor) -> None:
        """Token bookkeeping after the sort `order` (B, t) of the sequence (class token first)."""
        state.patch_index = state.patch_index.gather(1, order[:, 1:] - 1)
        ps: _State = state.policy_state
        if ps.owner is not None:
            inverse = torch.empty_like(order).scatter_(
                1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
            )
            ps.owner = torch.where(ps.owner >= 0, inverse.gather(1, ps.owner.clamp(min=0)), ps.owner)

    def _cut(self, state: TokenState, kept: int) -> None:
        state.patch_index = state.patch_index[:, : kept - 1]
        ps: _State = state.policy_state
        if ps.owner is not None:
            ps.owner = torch.where(ps.owner >= kept, torch.full_like(ps.owner, -1), ps.owner)

    def _merge(self, state: TokenState, kept: int, node_idx: torch.Tensor) -> None:
        state.patch_index = state.patch_index[:, : kept - 1]
        ps: _State = state.policy_state
        if ps.owner is not None:
            moved = torch.cat(
                [torch.arange(kept, device=node_idx.device).expand(node_idx.shape[0], -1), node_idx], 1
            )
            ps.owner = torch.where(ps.owner >= 0, moved.gather(1, ps.owner.clamp(min=0)), ps.owner)

    # --- the search: every token stays, masked --------------------------------------------------

    def _search_block(self, index: int, block: nn.Module, state: TokenState) -> None:
        ps: _State = state.policy_state
        x, size, mask = state.x, ps.size, ps.mask
        attn = block.attn
        h = block.norm1(x)
        q, k, v = _heads(attn, h)
        logits = (q * attn.scale) @ k.transpose(-2, -1) + size[..., 0].log()[:, None, None, :]
        probs = softmax_with_keep(logits, mask)
        x = add_attention(block, x, _output(attn, _merge_heads(attn.attn_drop(probs) @ v), _gate(attn, h)))
        order = _order(probs[:, :, 0, 1:].mean(dim=1))
        x, size, mask = _take(x, order), _take(size, order), _take(mask[..., None], order)[..., 0]
        state.patch_index = state.patch_index.gather(1, order[:, 1:] - 1)
        present = int(mask[0].sum())  # the authors' .int(): exact here, the mask is 0/1 in the forward
        prune_rate, merge_rate = self.prune_rates[index], self.merge_rates[index]
        prune = prune_rate.kept()
        ps.prune.append(prune)
        if prune < present:
            mask = mask * prune_rate.token_mask(int(prune), present)
        mid = min(present, int(prune))
        merge = merge_rate.kept()
        ps.merge.append(merge)
        if merge < mid:
            kept = int(merge)
            merge_mask = merge_rate.token_mask(kept, mid)
            node_max, node_idx = _matching(x[:, :mid].detach(), kept)
            head = torch.cat([_merge_mean(x[:, :mid], kept, node_idx), x[:, kept:mid]], dim=1)
            x = torch.cat([head, x[:, mid:]], dim=1)
            clamped = torch.cat([size[:, :kept], size[:, kept:mid] * node_max[..., None]], dim=1).clamp(min=1)
            merged = _merge_sum(clamped, kept, node_idx, clamped[:, kept:])
            size = torch.cat([merged, clamped[:, kept:], size[:, mid:]], dim=1)
            mask = mask * merge_mask
        ps.size, ps.mask = size, mask
        state.x = mlp_tail(block, x)

    def end(self, state: TokenState) -> None:
        ps: _State = state.policy_state
        search = None
        if ps.mask is not None:
            search = authors_flops(self, ps.prune, ps.merge)
            prune = [int(p) for p in ps.prune]
            merge = [int(m) for m in ps.merge]
        else:
            prune, merge = ps.prune, ps.merge
        traced = self.trace and ps.mask is None
        state.stats = DiffRateStats(
            prune, merge, ps.size[..., 0], ps.owners if traced else None, ps.sizes if traced else None, search
        )

    def extra_flops(self, info: SparseInfo, num_patches: int) -> torch.Tensor:
        """(B,) multiply-adds (what the papers call FLOPs) of the forward `info` describes beyond
        `backbone_flops` (`num_patches`, N, is not needed here): per compressing block the class token's
        attention row computed again (tokens x width) and the merge's similarities (sources x destinations x
        dim), minus the MLP work on the tokens removed before that block's MLP."""
        tokens = info.tokens_per_block.detach().to("cpu", torch.float64)
        prune, merge = info.extra["prune_kept"], info.extra["merge_kept"]
        extra = torch.zeros(tokens.shape[0], dtype=torch.float64)
        for b in range(tokens.shape[1]):
            t = tokens[:, b]
            p = torch.clamp(t, max=prune[b])
            m = torch.clamp(p, max=merge[b])
            compressing = (p < t) | (m < p)
            extra += torch.where(compressing, t * self.attn_dims[b] + (p - m) * m * self.embed_dim, 0.0)
        return extra + reduced_mlp_flops(self, info)


def _order(class_attention: torch.Tensor) -> torch.Tensor:
    """(B, t) positions sorted by class attention (B, t - 1) descending, the class token first."""
    order = class_attention.argsort(dim=1, descending=True) + 1
    return torch.cat([torch.zeros_like(order[:, :1]), order], dim=1)


def _take(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))


def _matching(x: torch.Tensor, kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token after the first `kept` joins its most similar one among them (cosine of `x`, never the
    class token): (similarity (B, s), index (B, s))."""
    metric = x / x.norm(dim=-1, keepdim=True)
    similarity = metric[:, kept:] @ metric[:, :kept].transpose(-2, -1)
    similarity[..., 0] = -math.inf
    node_max, node_idx = similarity.max(dim=-1)
    return node_max, node_idx


def _merge_mean(x: torch.Tensor, kept: int, node_idx: torch.Tensor) -> torch.Tensor:
    """The first `kept` rows of `x`, each the unweighted mean of itself and the rows that joined it (the
    authors' scatter_reduce 'mean', written as a sum over a count: ONNX has no scatter mean)."""
    index = node_idx[..., None].expand(-1, -1, x.shape[-1])
    total = x[:, :kept].scatter_add(1, index, x[:, kept:])
    count = torch.ones_like(x[:, :kept, :1]).scatter_add(
        1, node_idx[..., None], torch.ones_like(x[:, kept:, :1])
    )
    return total / count


def _merge_mean_(x: torch.Tensor, kept: int, node_idx: torch.Tensor) -> torch.Tensor:
    """`_merge_mean` written into `x` (a tensor of the forward's own, which it changes): the authors'
    scatter_reduce 'mean' on its first `kept` rows, one pass over the rows that joined instead of a copy
    and a division of every kept row; returns those rows. Where a graph is traced (ONNX, torch.export,
    torch.compile), `_merge_mean`."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return _merge_mean(x, kept, node_idx)
    index = node_idx[..., None].expand(-1, -1, x.shape[-1])
    head = x[:, :kept]
    head.scatter_reduce_(1, index, x[:, kept:], reduce="mean", include_self=True)
    return head


def _merge_sum(size: torch.Tensor, kept: int, node_idx: torch.Tensor, joining: torch.Tensor) -> torch.Tensor:
    return size[:, :kept].scatter_add(1, node_idx[..., None], joining)


def _published_head(model: VisionTransformer, name: str) -> str | None:
    """Why the authors' counts for `name` do not fit the head of `model`, or None: the MAE counts are
    for MAE's fine-tuned classifier (average pool, `fc_norm`)."""
    if name in MAE_FINETUNED and (model.global_pool != "avg" or isinstance(model.fc_norm, nn.Identity)):
        return (
            f"the authors' {name} counts are for MAE's fine-tuned classifier, whose head averages the patch "
            f"tokens: timm.create_model({name!r}, global_pool='avg') with the weights of {MAE_FINETUNED[name]} "
            f"(their 'model' entry); this model has global_pool={model.global_pool!r}"
            + ("" if model.global_pool != "avg" else " without fc_norm")
        )
    return None


def _check_counts(model: VisionTransformer, prune_kept: Sequence[int], merge_kept: Sequence[int]) -> None:
    depth, tokens = len(model.blocks), num_patches(model) + 1
    for name, counts in (("prune_kept", prune_kept), ("merge_kept", merge_kept)):
        if len(counts) != depth or not all(is_int(c) and 2 <= c <= tokens for c in counts):
            raise ValueError(
                f"{name} must list {depth} whole numbers in 2..{tokens} (tokens left after each block, class "
                f"token included), got {list(counts)}"
            )


def diffrate(
    model: VisionTransformer,
    prune_kept: Sequence[int] | None = None,
    merge_kept: Sequence[int] | None = None,
    target_gflops: float | None = None,
    published: float | None = None,
    granularity: int = GRANULARITY,
    trace: bool = False,
) -> VisionTransformer:
    """Make `model` (a timm ViT with a class token) a DiffRate model in place and return it.

    Give the counts one way:
    - `prune_kept`, `merge_kept`: per block, tokens left after pruning and after merging (class token
      included), as the authors' `compression_rate.json`;
    - `published`: their searched counts for this model at that budget in GFLOPs (their formula: GMACs,
      multiply-adds), e.g. `published=2.9` for DeiT-S (79.54% top-1 in their paper): DeiT
      (`deit_{tiny,small,base}_patch16_224`) or MAE's fine-tuned ViT-B/L/H (`vit_base_patch16_224`,
      `vit_large_patch16_224`, `vit_huge_patch14_224` with `global_pool="avg"`, MAE's weights;
      `diffrate_published.MAE_FINETUNED`), pooled by token size as theirs;
    - `target_gflops`: counts whose executed GMACs per image (multiply-adds, what the papers call FLOPs;
      tokensparse's count) are at most the target and within 2% of it, without a search: the authors'
      DeiT-S profile (their 2.3 GFLOPs counts as shares of the tokens) scaled between none and that
      share (`tokensparse.budget`);
    - none of them: searchable counts (logits at zero, as the authors start), trained by
      `tokensparse train --method diffrate --target-gflops X` with the backbone frozen.
    `granularity`: the search's step between candidate patch counts (default 4: DiffRate's main.py
    `--granularity`, Chen et al. 2023). `trace` (default False) records which input tokens each token
    holds after every block (`diffrate_stats(model).owner`).
    """
    check_vit(model, "DiffRate", "its search and merge run on timm's Attention")
    if getattr(model, "cls_token", None) is None or model.num_prefix_tokens != 1:
        raise ValueError(
            "DiffRate ranks tokens by the class token's attention: it needs one class token and no registers"
        )
    given = [
        prune_kept is not None or merge_kept is not None,
        published is not None,
        target_gflops is not None,
    ]
    if sum(given) > 1:
        raise ValueError("give the counts one way: prune_kept and merge_kept, published=, or target_gflops=")
    if (prune_kept is None) != (merge_kept is None):
        raise ValueError("give both prune_kept and merge_kept")
    if published is not None:
        name = getattr(model, "pretrained_cfg", {}).get("architecture") or ""
        prune_kept, merge_kept = published_counts(name, published)
        if (problem := _published_head(model, name)) is not None:
            raise ValueError(problem)
    if prune_kept is not None:
        _check_counts(model, prune_kept, merge_kept)  # type: ignore[arg-type]
    if not is_int(granularity) or granularity < 1:
        raise ValueError(f"granularity must be a whole number >= 1, got {granularity!r}")
    if target_gflops is not None:
        prune_kept, merge_kept = profile_counts(model, 0.0)
    sparsify(model, DiffRatePolicy(model, prune_kept, merge_kept, granularity, trace), "diffrate")
    if target_gflops is not None:
        from ..budget import solve_diffrate_counts

        model.diffrate.prune_kept, model.diffrate.merge_kept = solve_diffrate_counts(model, target_gflops)
    return model


def profile_counts(model: VisionTransformer, strength: float) -> tuple[list[int], list[int]]:
    """Counts `strength` of the way (0: none, 1: all) from no compression to the authors' DeiT-S 2.3
    GFLOPs profile, as shares of the tokens of `model` (blocks mapped by relative depth)."""
    prune, merge = PUBLISHED["deit_small_patch16_224"][2.3]
    depth, tokens = len(model.blocks), num_patches(model) + 1
    out: tuple[list[int], list[int]] = ([], [])
    for b in range(depth):
        source = min(len(prune) - 1, round(b * (len(prune) - 1) / max(1, depth - 1)))
        for counts, target in ((prune, out[0]), (merge, out[1])):
            share = 1.0 - strength * (1.0 - counts[source] / 197)
            target.append(max(2, min(tokens, math.ceil(share * (tokens - 1)) + 1)))
    out[0][0] = out[1][0] = tokens  # block 0 never compresses, as the authors'
    return out


def diffrate_stats(model: nn.Module) -> DiffRateStats:
    """The counts, sizes (and traced owners) of the last forward of `model`, made by `diffrate`
    (`DiffRateStats`)."""
    from ..engine import policy_stats

    return policy_stats(model, DiffRatePolicy, DiffRateStats, "diffrate_stats", "diffrate")


def untrained(model: VisionTransformer, cfg: TrainConfig) -> VisionTransformer:
    """`model` made a fresh DiffRate model at the settings of the `TrainConfig` `cfg`, without a search: a
    FLOP budget gives the counts of `diffrate(target_gflops=)`; without one, the search's starting counts."""
    return diffrate(model, target_gflops=cfg.target_gflops, granularity=cfg.get("granularity") or GRANULARITY)


def from_config(model: VisionTransformer, cfg: TrainConfig) -> VisionTransformer:
    """`diffrate` on `model` for a run with `TrainConfig` `cfg` (its granularity, default 4): searchable
    counts with the backbone frozen (the search trains only the
    logits); a FLOP budget is the search's target, not solved here."""
    diffrate(model, granularity=cfg.get("granularity") or GRANULARITY)
    for name, param in model.named_parameters():
        if not name.startswith("diffrate."):
            param.requires_grad_(False)
    return model


def _objective(cfg: TrainConfig, depth: int) -> nn.Module:
    return DiffRateLoss.from_config(cfg, depth)


def _bench(model, budgets, settings, **options):
    """`tokensparse bench` for DiffRate: each budget's counts (`diffrate(target_gflops=)`; None: the
    authors' published budget nearest 63% of the dense model's GMACs for a model they searched (DeiT; MAE's
    ViT-B/L/H with the avg-pool head), else 63%,
    DeiT-S's 2.9 of 4.6), or a run's searched counts; the bound slices tokens between attention and MLP
    as DiffRate does."""
    from ..bench import bench_method
    from ..flops import gflops

    counts = settings.get("counts")

    def build(dense: nn.Module, budget: float | None) -> nn.Module:
        if counts is not None:
            return diffrate(dense, *counts)
        if budget is None:
            name = getattr(dense, "pretrained_cfg", {}).get("architecture")
            dense_gflops = gflops(dense.eval())
            published = [b for b in PUBLISHED.get(name, {}) if b < dense_gflops]
            published = published if _published_head(dense, name) is None else []
            if published:
                return diffrate(dense, published=min(published, key=lambda b: abs(b / dense_gflops - 0.63)))
            budget = 0.63 * dense_gflops
        return diffrate(dense, target_gflops=budget)

    settings = [None] if counts is not None else budgets
    return bench_method(model or "deit_small_patch16_224", keep_ratios=settings, method="diffrate", build=build,
                        mlp_bound=True, **options)  # fmt: skip


# The authors' search (OpenGVLab/DiffRate README and main.py): the backbone frozen, only the rates'
# logits trained with AdamW (lr 0.01, cosine to 0.001, no weight decay) for 3 epochs, cross-entropy on
# Mixup 0.8 / CutMix 1.0 targets smoothed 0.1, no distillation.
register_method(
    Method(
        "diffrate",
        sparsify=from_config,
        untrained=untrained,
        objective=_objective,
        bench_setting="target_gflops",
        bench=_bench,
        bench_bound="truncation bound (dense blocks on DiffRate's counts, sliced between attention and MLP)",
        recipe=dict(
            epochs=3,
            lr=0.01,
            min_lr=0.001,
            weight_decay=0.0,
            warmup_epochs=0,
            mixup=0.8,
            cutmix=1.0,
            smoothing=0.1,
            distill_weight=0.0,
            granularity=4,
            flop_weight=5.0,
        ),
        settings=(
            TARGET_GFLOPS,
            Setting("granularity", int, "DiffRate: step between the search's candidate patch counts", low=1,
                    source="DiffRate main.py --granularity"),
            Setting("flop_weight", float, "DiffRate: weight of the search's (GFLOPs - target)^2 term, in absolute "
                    "GFLOPs as the authors' (their 5 was set on DeiT-S's 4.6 GFLOPs; a model k times smaller needs "
                    "k^2 times the weight for the same pull: tokensparse.policies.diffrate_search.deit_s_flop_weight)", low=0,
                    source="DiffRate engine.py lamb"),
            DISTILL_WEIGHT,
        ),
    )
)  # fmt: skip
