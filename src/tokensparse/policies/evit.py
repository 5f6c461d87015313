"""EViT (Liang et al., ICLR 2022): keep the tokens the class token attends to, fuse the rest into one.

At each location block, between attention and MLP (where the authors reorganise tokens), the patch
tokens are ranked by the class token's attention in that block (softmax probabilities, mean over
heads). The top ones stay; the others are fused into one token, sum_i a_i x_i over the dropped tokens
i with their attention a_i (the authors' code: not renormalised), appended after the kept tokens; the
MLP and the later blocks run on the shorter sequence. No parameters, no training needed.

Counts follow DynamicViT, not EViT's ceil(rho * (N - 1)) of the current tokens, so the baselines
compare at equal token counts: stage s keeps int(N * keep_ratio ** (s + 1)) patch tokens, plus the
fused token. The fused token is not a patch: it is kept outside `state.x` (in
`state.extra['fused_token']`, joined for each block), so `patch_index`, `kept_index` and
`sparsity_info` name real patches only. At a later stage the previous fused token is not ranked
against patches; it is folded into the new one with its own attention weight. Training runs the same
forward (the authors fine-tune with tokens removed).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from ..attention import attention_parts
from ..engine import SparseInfo, TokenPolicy, TokenState, check_vit, num_patches, sparsify
from .baselines import mlp_macs, record_mlp_tokens, reduced_mlp_flops
from .dynamicvit import check_keep_ratio, check_locations, keep_counts


class EViTPolicy(TokenPolicy, nn.Module):
    """EViT's token reorganisation at `locations`. No parameters."""

    method = "evit"

    def __init__(self, model: VisionTransformer, keep_ratio: float, locations: Sequence[int], fuse: bool):
        super().__init__()
        self.keep_ratio = float(keep_ratio)
        self.locations = tuple(int(i) for i in locations)
        self.fuse = fuse
        self.mlp_macs = mlp_macs(model)
        self.attn_dims = tuple(int(block.attn.num_heads * block.attn.head_dim) for block in model.blocks)

    def extra_repr(self) -> str:
        return f"keep_ratio={self.keep_ratio}, locations={self.locations}, fuse={self.fuse}"

    def begin(self, model: VisionTransformer, state: TokenState) -> None:
        state.extra["fused_token"] = None

    def before_block(self, index: int, state: TokenState) -> None:
        tokens = state.x.shape[1] + (state.extra["fused_token"] is not None)
        state.extra["active_tokens"] = torch.full((state.batch_size,), tokens, device=state.x.device)

    def run_block(self, index: int, block: nn.Module, state: TokenState) -> None:
        fused = state.extra["fused_token"]
        x = state.x if fused is None else torch.cat([state.x, fused], dim=1)
        if index not in self.locations:
            record_mlp_tokens(state, x.shape[1])
            x = block(x)
        else:
            out, q, k = attention_parts(block.attn, block.norm1(x))
            x = x + block.drop_path1(block.ls1(out))
            class_attention = ((q[:, :, :1] * block.attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = self.reorganize(self.locations.index(index), state, x, class_attention.mean(dim=1)[:, 0])
            record_mlp_tokens(state, x.shape[1])
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        main = state.x.shape[1]
        state.x = x[:, :main]
        if state.extra["fused_token"] is not None:
            state.extra["fused_token"] = x[:, main:]

    def reorganize(
        self, stage: int, state: TokenState, x: torch.Tensor, attention: torch.Tensor
    ) -> torch.Tensor:
        """Keep the top patch tokens of `x` (B, t, C) by class attention (B, t); return the MLP's input."""
        prefix, present = state.num_prefix, state.patch_tokens.shape[1]
        count = keep_counts(state.num_patches, self.keep_ratio, self.locations)[stage]
        fused = state.extra["fused_token"]
        patch_attention = attention[:, prefix : prefix + present]
        state.x = x[:, : prefix + present]
        kept = state.keep_top(count, lambda: patch_attention)
        if self.fuse and count < present:
            dropped = torch.ones_like(patch_attention).scatter_(1, kept, 0.0) * patch_attention
            fused_new = (x[:, prefix : prefix + present] * dropped.unsqueeze(-1)).sum(dim=1, keepdim=True)
            if fused is not None:
                fused_new = fused_new + attention[:, -1:].unsqueeze(-1) * x[:, -1:]
            fused = fused_new
        elif fused is not None:
            fused = x[:, -1:]
        state.extra["fused_token"] = fused
        return state.x if fused is None else torch.cat([state.x, fused], dim=1)

    def end(self, state: TokenState) -> None:
        state.extra["mlp_tokens"] = torch.stack(state.extra["mlp_tokens"], dim=1)


def evit_flops(policy: EViTPolicy, info: SparseInfo, num_patches: int) -> torch.Tensor:
    """(B,) multiply-adds beyond `backbone_flops`: the class-token attention row each location block
    computes beside its fused attention (tokens x heads x head_dim), minus the MLP work on the tokens
    removed before that block's MLP."""
    tokens = info.tokens_per_block.detach().to("cpu", torch.float64)
    class_row = sum(tokens[:, i] * policy.attn_dims[i] for i in policy.locations)
    return class_row + reduced_mlp_flops(policy, info, num_patches)


def evit(
    model: VisionTransformer,
    keep_ratio: float = 0.7,
    locations: Sequence[int] | None = None,
    fuse: bool = True,
) -> VisionTransformer:
    """Make `model` an EViT in place (and return it): token reorganisation in blocks `locations`.

    locations defaults to DynamicViT's, (3, 6, 9) for 12 blocks (also EViT's). Stage s keeps
    int(N * keep_ratio ** (s + 1)) patch tokens; with fuse, the rest become one attention-weighted
    token. Needs a class token (its attention ranks the patches).
    """
    check_vit(model)
    keep_ratio = check_keep_ratio(keep_ratio)
    locations = check_locations(locations, len(model.blocks))
    keep_counts(num_patches(model), keep_ratio, locations)
    if not isinstance(fuse, bool):
        raise ValueError(f"fuse must be True or False, got {fuse!r}")
    if getattr(model, "cls_token", None) is None:
        raise ValueError("EViT ranks patches by the class token's attention; this model has no class token")
    return sparsify(model, EViTPolicy(model, keep_ratio, locations, fuse), "evit")
