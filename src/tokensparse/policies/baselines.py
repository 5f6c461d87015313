"""Random and static pruning: DynamicViT's ablation baselines, at DynamicViT's token counts.

Both prune where DynamicViT does (before blocks `locations`, stage s keeping int(N * keep_ratio **
(s + 1)) of the N patches) and the same way: inference gathers the kept tokens and runs timm's
ordinary blocks on the shorter sequence; training (mask regime) keeps every token and masks attention,
a token once dropped staying dropped. Only the ranking differs, and it reads no token:

- random: a fresh random ranking per image and per forward (with `seed`, in eval mode image i's
  ranking comes from a generator seeded with (seed, i), i its data set index
  (`TokenPolicy.image_indices`, which `evaluate` sets) or else its position in the batch: repeated
  forwards prune the same tokens and an evaluation does not depend on its batch size; training
  always draws afresh, and a trained run evaluates with its config's seed);
- static: the patches nearest the image centre, the same for every image.

Also the MLP-accounting pieces EViT and ToMe share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from timm.models.vision_transformer import VisionTransformer

from ..adapters import backbone_of
from ..checks import is_int
from ..engine import SparseInfo, TokenPolicy, TokenState, sparsify
from .dynamicvit import StagePruningPolicy, meet_budget, ratio_or_budget, stage_policy_args
from .registry import DISTILL_WEIGHT, KEEP_RATIO, LOCATIONS, TARGET_GFLOPS, Method, register_method

if TYPE_CHECKING:
    from ..config import TrainConfig

# --- shared by the baselines ----------------------------------------------------------------------


def mlp_macs(model: VisionTransformer) -> tuple[int, ...]:
    """Multiply-adds (MACs, what the papers call FLOPs) per token of each block's MLP of `model`: what a
    token removed before the MLP saves."""
    backbone = backbone_of(model)
    return tuple(backbone.mlp_macs(i) for i in range(len(backbone.blocks)))


def reduced_mlp_flops(policy: TokenPolicy, info: SparseInfo) -> torch.Tensor:
    """(B,) multiply-adds to add to `backbone_flops` for blocks that reduce tokens between attention and
    MLP, for the forward `info` describes; `policy` holds `mlp_macs` of its model.

    `backbone_flops` counts each block on the tokens it started with; ToMe and EViT run the block's MLP
    on fewer (`info.mlp_tokens`), so the MLP work on the removed tokens is subtracted.
    """
    attention_tokens = info.tokens_per_block.detach().to("cpu", torch.float64)
    mlp_tokens = info.mlp_tokens.detach().to("cpu", torch.float64)
    per_token = torch.tensor(policy.mlp_macs, dtype=torch.float64)
    return -((attention_tokens - mlp_tokens) * per_token).sum(dim=1)


# --- random and static pruning ----------------------------------------------------------------------


@dataclass
class _Draws:
    """Where one forward of random pruning draws from: fixed draws (one per stage, in order), or
    torch's global generator (None)."""

    fixed: list[torch.Tensor] | None = None


def seeded_draws(
    seed: int, image_indices: torch.Tensor, stages: int, num_patches: int, device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    """Per stage (`stages` of them), (B, num_patches) uniform draws; image b's from a generator seeded with
    (seed, image_indices[b]), so an image draws the same whatever batch it is in; returned on `device`
    (default "cpu")."""
    rows = []
    for index in image_indices.tolist():
        generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))
        rows.append(torch.rand(stages, num_patches, generator=generator))
    draws = torch.stack(rows, dim=1).to(device)  # (stages, B, N)
    return list(draws.unbind(0))


class RandomPruningPolicy(StagePruningPolicy):
    """Random pruning: DynamicViT's stages (`keep_ratio`, `locations`) ranking patches by uniform draws;
    `seed` (default None: torch's global generator) as in `random_prune`."""

    method = "random"

    def export_refusal(self) -> str | None:
        if self.seed is not None:
            return None
        return (
            "random pruning without a seed draws new tokens every forward from torch's generator, which "
            "an exported graph cannot reproduce; sparsify with tokensparse.random_prune(model, seed=...)"
        )

    def __init__(self, keep_ratio: float, locations: Sequence[int], seed: int | None = None):
        super().__init__(keep_ratio, locations)
        self.seed = seed
        self.fixed_draws: list[torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", seed={self.seed}"

    def fix_draws(
        self, batch_size: int | None, num_patches: int = 0, device: torch.device | str = "cpu"
    ) -> None:
        """Precompute the seeded draws of a forward on `batch_size` images of `num_patches`, on `device`;
        `batch_size` None drops them.

        With a seed the draws depend on the seed and the input's shape only; fixed, they become
        constants of a traced graph (ONNX export), since torch's generator cannot be exported.
        """
        if batch_size is None:
            self.fixed_draws = None
            return
        if self.seed is None:
            raise ValueError("only seeded random pruning has draws that can be fixed; pass seed=...")
        self.fixed_draws = seeded_draws(
            self.seed, torch.arange(batch_size), len(self.locations), num_patches, device
        )

    def begin(self, model: VisionTransformer, state: TokenState) -> None:
        if self.fixed_draws is not None:
            state.policy_state = _Draws(fixed=list(self.fixed_draws))
        elif self.seed is not None and not self.training:
            indices = self.image_indices
            if indices is None:
                indices = torch.arange(state.batch_size)
            elif len(indices) != state.batch_size:
                raise ValueError(
                    f"image_indices names {len(indices)} images but the forward has {state.batch_size}"
                )
            draws = seeded_draws(self.seed, indices, len(self.locations), state.num_patches, state.x.device)
            state.policy_state = _Draws(fixed=draws)
        else:
            state.policy_state = _Draws()

    def patch_score(self, state: TokenState, patch_index: torch.Tensor) -> torch.Tensor:
        # One draw per original patch, so training's masked form and inference pick the same tokens.
        draws: _Draws = state.policy_state
        if draws.fixed is not None:
            return draws.fixed.pop(0).gather(1, patch_index)
        score = torch.rand(state.batch_size, state.num_patches, device=patch_index.device)
        return score.gather(1, patch_index)


def centre_rank(grid: tuple[int, int]) -> torch.Tensor:
    """(H * W,) rank of each patch (row-major) by distance of its centre to the image centre, 0 nearest.

    Ties (the grid is symmetric) go to the lower patch index, so every stage's set is nested in the last.
    """
    height, width = grid
    rows = torch.arange(height, dtype=torch.float64) + 0.5 - height / 2
    cols = torch.arange(width, dtype=torch.float64) + 0.5 - width / 2
    distance = (rows.view(-1, 1).square() + cols.view(1, -1).square()).flatten()
    order = torch.argsort(distance, stable=True)
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))


class StaticPruningPolicy(StagePruningPolicy):
    """Static pruning: DynamicViT's stages (`keep_ratio`, `locations`) keeping the patches nearest the
    centre of the model's (H, W) patch `grid` (`centre_rank`)."""

    method = "static"

    def __init__(self, keep_ratio: float, locations: Sequence[int], grid: tuple[int, int]):
        super().__init__(keep_ratio, locations)
        self.grid = tuple(int(g) for g in grid)
        self.register_buffer("patch_rank", centre_rank(self.grid), persistent=False)

    def patch_score(self, state: TokenState, patch_index: torch.Tensor) -> torch.Tensor:
        if state.num_patches != self.patch_rank.numel():
            raise ValueError(
                f"static pruning ranks the model's {self.grid[0]}x{self.grid[1]} patch grid; this input has "
                f"{state.num_patches} patches"
            )
        return -self.patch_rank[patch_index].float()


def random_prune(
    model: VisionTransformer,
    keep_ratio: float | None = None,
    locations: Sequence[int] | None = None,
    seed: int | None = None,
    target_gflops: float | None = None,
) -> VisionTransformer:
    """Prune a random subset of patch tokens per image of `model` at DynamicViT's locations and counts (in
    place; returns the model).

    locations defaults to DynamicViT's (3, 6, 9) for 12 blocks, keep_ratio to 0.7 (DynamicViT's headline
    ratio, Rao et al. 2021); `target_gflops` (GMACs per image: multiply-adds, what the papers call FLOPs;
    default None) instead of keep_ratio solves it for that budget as `dynamicvit` does. Without `seed` every
    forward draws anew from torch's global generator; with it, each forward uses a generator seeded with
    `seed`.
    """
    ratio, locations = stage_policy_args(model, ratio_or_budget(keep_ratio, target_gflops), locations)
    if seed is not None and not is_int(seed):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    sparsify(model, RandomPruningPolicy(ratio, locations, seed), "random_prune")
    return meet_budget(model, target_gflops)


def static_prune(
    model: VisionTransformer,
    keep_ratio: float | None = None,
    locations: Sequence[int] | None = None,
    target_gflops: float | None = None,
) -> VisionTransformer:
    """Keep the patches of `model` nearest the image centre, the same for every image, at DynamicViT's
    counts (in place; returns the model). locations defaults to DynamicViT's (3, 6, 9) for 12 blocks,
    keep_ratio to 0.7 (DynamicViT's headline ratio, Rao et al. 2021), or `target_gflops` (GMACs per
    image: multiply-adds, what the papers call FLOPs) solves it as `dynamicvit` does."""
    ratio, locations = stage_policy_args(model, ratio_or_budget(keep_ratio, target_gflops), locations)
    grid = backbone_of(model).grid
    sparsify(model, StaticPruningPolicy(ratio, locations, grid), "static_prune")
    return meet_budget(model, target_gflops)


def random_from_config(model: VisionTransformer, cfg: TrainConfig) -> VisionTransformer:
    """`random_prune` on `model` with the settings of the `TrainConfig` `cfg` (the registry's constructor)."""
    return random_prune(
        model,
        keep_ratio=cfg.keep_ratio,
        locations=cfg.locations,
        seed=cfg.seed,
        target_gflops=cfg.target_gflops,
    )


def static_from_config(model: VisionTransformer, cfg: TrainConfig) -> VisionTransformer:
    """`static_prune` on `model` with the settings of the `TrainConfig` `cfg` (the registry's constructor)."""
    return static_prune(
        model, keep_ratio=cfg.keep_ratio, locations=cfg.locations, target_gflops=cfg.target_gflops
    )


# training-free pruning baselines at a keep ratio, fine-tuned with cross-entropy plus the teacher's logits
register_method(
    Method(
        "random",
        sparsify=random_from_config,
        recipe=dict(keep_ratio=0.7, distill_weight=0.5),
        settings=(KEEP_RATIO, LOCATIONS, TARGET_GFLOPS, DISTILL_WEIGHT),
        bench_setting="keep_ratio",
        budget_knob="keep_ratio",
    )
)
register_method(
    Method(
        "static",
        sparsify=static_from_config,
        recipe=dict(keep_ratio=0.7, distill_weight=0.5),
        settings=(KEEP_RATIO, LOCATIONS, TARGET_GFLOPS, DISTILL_WEIGHT),
        bench_setting="keep_ratio",
        budget_knob="keep_ratio",
    )
)
