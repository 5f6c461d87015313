"""DynamicViT (Rao et al., NeurIPS 2021): a learned predictor prunes patch tokens in stages.

Before each pruning location a small MLP scores the surviving patch tokens from their own features
(the first half of the channels) and a keep-weighted mean of the image (the second half); index 0 of
its log-probabilities means "keep". Stage s keeps int(N * keep_ratio ** (s + 1)) of the N patches.

- Training (mask regime): hard Gumbel-softmax decisions, multiplied by the previous stage's so a
  token once dropped stays dropped; every token stays in the tensor and later blocks mask attention
  multiplicatively, so the gradient reaches the predictors.
- Inference (gather regime): per image, the top-k tokens by keep log-probability are gathered and
  timm's ordinary blocks run on the shorter sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from ..adapters import backbone_of
from ..checks import check_number, is_int
from ..engine import (
    SparseInfo,
    TokenPolicy,
    TokenState,
    check_model,
    no_extra_flops,
    num_patches,
    sparsify,
)
from ..macs import linear_macs
from .registry import (
    DISTILL_WEIGHT,
    KEEP_RATIO,
    LOCATIONS,
    RATIO_WEIGHT,
    TARGET_GFLOPS,
    Method,
    Setting,
    register_method,
)

if TYPE_CHECKING:
    from ..config import TrainConfig


def default_locations(depth: int) -> tuple[int, ...]:
    """The paper's placement for a ViT of `depth` blocks, a quarter of the depth apart: (3, 6, 9) for 12
    blocks, (6, 12, 18) for 24 (Rao et al. 2021)."""
    return tuple(sorted({max(1, depth * s // 4) for s in (1, 2, 3)}))


class ScorePredictor(nn.Module):
    """One stage's keep/drop predictor, laid out as the authors' `PredictorLG` (checkpoint-compatible).

    Initialised as the authors' model initialises it (timm's ViT init: Linear weights truncated normal
    with std 0.02, zero biases; LayerNorm 1 and 0), so an untrained predictor scores every token alike
    (log-probs near log 0.5) and the ranking is learned from the training signal alone. PyTorch's
    default Linear init instead gives a strong random ranking from the start, which a short
    fine-tune does not undo (the cause of learned pruning ranking worse than random after a few
    hundred steps). `dim` is the ViT's embedding width C (a multiple of 4).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' initialisation (timm ViT `_init_weights`): trunc_normal(std=0.02), zero bias."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, patch_tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """`patch_tokens` (B, M, C) and optional `keep` (B, M, 1) mask -> (B, M, 2) log-probs, 0 = keep."""
        x = self.in_conv(patch_tokens)
        half = x.shape[-1] // 2
        local, image = x[..., :half], x[..., half:]
        if keep is None:
            image = image.mean(dim=1, keepdim=True)
        else:
            # The authors divide by keep.sum() alone: an image whose keep mask emptied (possible with
            # few patches) gives NaN there. The clamp changes nothing while the sum is >= tiny, and
            # gives the empty mask's mean as 0 (its numerator is 0) instead of NaN.
            count = keep.sum(dim=1, keepdim=True)
            image = (image * keep).sum(dim=1, keepdim=True) / count.clamp_min(torch.finfo(count.dtype).tiny)
        return self.out_conv(torch.cat([local, image.expand_as(local)], dim=-1))

    def macs(self, tokens: torch.Tensor, ranking_only: bool) -> torch.Tensor:
        """Multiply-adds on `tokens` (B,) patch tokens per image.

        ranking_only: inference ranks tokens with `keep_score`, which runs the image half of the first
        out_conv layer once per image and collapses the last layer to one output.
        """
        full = linear_macs(self)
        if not ranking_only:
            return tokens * full
        hidden, last = self.out_conv[0], self.out_conv[-2]
        image_half = hidden.in_features // 2 * hidden.out_features
        return tokens * (full - image_half - last.in_features * (last.out_features - 1)) + image_half

    def keep_score(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """(B, M) scores ranking `patch_tokens` (B, M, C) as the keep log-probability does, for inference
        (all kept).

        The same function computed with less work: log p(keep) = -softplus(l1 - l0) is monotone in
        l0 - l1, so the last layer collapses to one vector and the LogSoftmax goes; the image half of
        the first out_conv layer is the same for every token, so it runs once per image.
        """
        hidden = self.out_conv[0]
        x = self.in_conv(patch_tokens)
        half = x.shape[-1] // 2
        image = x[..., half:].mean(dim=1, keepdim=True)
        z = F.linear(x[..., :half], hidden.weight[:, :half]) + F.linear(
            image, hidden.weight[:, half:], hidden.bias
        )
        z = self.out_conv[3](self.out_conv[2](self.out_conv[1](z)))
        last = self.out_conv[4]
        direction = (last.weight[0] - last.weight[1]).unsqueeze(0)
        return F.linear(z, direction, (last.bias[0] - last.bias[1]).view(1)).squeeze(-1)


def stage_keep_counts(patches: int, keep_ratio: float, stages: int) -> list[int]:
    """Patch tokens kept after each of `stages` stages: int(N * rho^(s+1)) for N = `patches` and rho =
    `keep_ratio`, as the authors compute them."""
    return [int(patches * keep_ratio ** (s + 1)) for s in range(stages)]


def check_keep_ratio(keep_ratio: float) -> float:
    """`keep_ratio` as a float; ValueError unless it is a number in (0, 1]."""
    return check_number("keep_ratio", keep_ratio, lambda v: 0.0 < v <= 1.0, "in (0, 1]")


def check_locations(locations: Sequence[int] | None, depth: int) -> tuple[int, ...]:
    """`locations` checked for a ViT of `depth` blocks: DynamicViT's default placement when None
    (`default_locations`); else strictly increasing block indices inside the depth."""
    locations = default_locations(depth) if locations is None else tuple(locations)
    if not locations:
        raise ValueError("locations must name at least one block")
    if not all(map(is_int, locations)):
        raise ValueError(f"locations must be block indices (ints), got {locations!r}")
    if any(b <= a for a, b in zip(locations, locations[1:])):
        raise ValueError(f"locations must be strictly increasing, got {locations!r}")
    if locations[0] < 0 or locations[-1] >= depth:
        raise ValueError(
            f"locations {locations!r} must lie inside the model's depth: 0..{depth - 1} for {depth} blocks"
        )
    return locations


def keep_counts(patches: int, keep_ratio: float, locations: Sequence[int]) -> list[int]:
    """Patch tokens kept after the stage at each of `locations`, DynamicViT's int(N * rho^(s+1)) for N =
    `patches` and rho = `keep_ratio`; ValueError if one keeps none."""
    counts = stage_keep_counts(patches, keep_ratio, len(locations))
    if counts and counts[-1] < 1:
        raise ValueError(
            f"keep_ratio={keep_ratio} keeps no patch token of {patches} after stage {counts.index(0)}; "
            "raise keep_ratio or use fewer locations"
        )
    return counts


class StagePruningPolicy(TokenPolicy, nn.Module):
    """DynamicViT's pruning schedule and mechanics: before blocks `locations`, stage s keeps the
    int(N * keep_ratio ** (s + 1)) highest-scoring patch tokens. A method says how it scores.

    Inference (gather regime) gathers the kept tokens; training (mask regime) keeps every token and
    masks attention, a token once dropped staying dropped. No defaults here: the method's constructor
    (e.g. `dynamicvit`) checks and fills them.
    """

    def __init__(self, keep_ratio: float, locations: Sequence[int]):
        super().__init__()
        self.keep_ratio = float(keep_ratio)
        self.locations = tuple(int(i) for i in locations)

    def extra_repr(self) -> str:
        return f"keep_ratio={self.keep_ratio}, locations={self.locations}"

    def map_heading(self, model: nn.Module, info: SparseInfo) -> str:
        return f"{self.method} keep ratio {self.keep_ratio:g}: kept patches, dropped ones greyed"

    def patch_score(self, state: TokenState, patch_index: torch.Tensor) -> torch.Tensor:
        """(B, M) score of the original patches `patch_index` (B, M); the highest are kept.

        The ranking of a method that reads no token; a method that does overrides `gather_score` and
        `mask_stage` instead.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must define patch_score, or gather_score and mask_stage"
        )

    def gather_score(self, stage: int, state: TokenState) -> torch.Tensor:
        """Gather regime: (B, M) scores of the patch tokens present before stage `stage` prunes."""
        return self.patch_score(state, state.patch_index)

    def mask_stage(self, stage: int, count: int, state: TokenState) -> None:
        """Mask regime: set the keep mask of stage `stage`, `count` patches among those still kept."""
        every_patch = torch.arange(state.num_patches, device=state.x.device).expand(state.batch_size, -1)
        state.mask_top(count, self.patch_score(state, every_patch))

    def extra_flops(self, info: SparseInfo, num_patches: int) -> torch.Tensor:
        return no_extra_flops(info)  # a ranking that reads no token computes nothing

    def before_block(self, index: int, state: TokenState) -> None:
        if index not in self.locations:
            return
        stage = self.locations.index(index)
        count = keep_counts(state.num_patches, self.keep_ratio, self.locations)[stage]
        if state.regime == "gather":
            state.keep_top(count, lambda: self.gather_score(stage, state))
        else:
            self.mask_stage(stage, count, state)


DEFAULT_KEEP_RATIO = 0.7  # the papers' (DynamicViT's rho, EViT's keep rate)


def ratio_or_budget(keep_ratio: float | None, target_gflops: float | None) -> float:
    """The keep ratio a stage-pruning method is patched with: `keep_ratio` (default 0.7, DynamicViT's
    headline ratio, Rao et al. 2021, and EViT's keep rate), or 1.0 where a FLOP budget `target_gflops`
    (GMACs per image) then solves it (`meet_budget`); ValueError if both are given."""
    if target_gflops is None:
        return DEFAULT_KEEP_RATIO if keep_ratio is None else keep_ratio
    if keep_ratio is not None:
        raise ValueError(
            f"give keep_ratio or target_gflops, not both (keep_ratio={keep_ratio!r}, target_gflops={target_gflops!r})"
        )
    return 1.0


def meet_budget(model: nn.Module, target_gflops: float | None) -> nn.Module:
    """Set the stage-pruning `model`'s keep ratio to the one that executes `target_gflops` (if given)."""
    if target_gflops is not None:
        from ..budget import solve_keep_ratio
        from ..engine import get_policy

        get_policy(model).keep_ratio = solve_keep_ratio(model, target_gflops)
    return model


def stage_policy_args(
    model: VisionTransformer, keep_ratio: float, locations: Sequence[int] | None
) -> tuple[float, tuple[int, ...]]:
    """Checked (keep_ratio, locations) of a stage-pruning method on `model` (ValueError naming the problem)."""
    backbone = check_model(model)
    keep_ratio = check_keep_ratio(keep_ratio)
    locations = check_locations(locations, len(backbone.blocks))
    keep_counts(num_patches(model), keep_ratio, locations)
    return keep_ratio, locations


class DynamicViTPolicy(StagePruningPolicy, nn.ModuleList):
    """The predictors of every stage (registered as `score_predictor.{i}`) and the pruning rule.

    dim: the ViT's embedding width; keep_ratio and locations as in `dynamicvit` (here without
    defaults: `dynamicvit` checks and fills them)."""

    method = "dynamicvit"

    def __init__(self, dim: int, keep_ratio: float, locations: Sequence[int]):
        super().__init__(keep_ratio, locations)
        self.extend(ScorePredictor(dim) for _ in self.locations)

    def gather_score(self, stage: int, state: TokenState) -> torch.Tensor:
        return self[stage].keep_score(state.patch_tokens)

    def mask_stage(self, stage: int, count: int, state: TokenState) -> None:
        previous = state.previous_keep()
        log_probs = self[stage](state.patch_tokens, previous.unsqueeze(-1))
        if self.training:
            state.set_keep(F.gumbel_softmax(log_probs, hard=True)[..., 0] * previous)
        else:
            # Deterministic mask regime: the same top-k as inference, among tokens still kept.
            state.mask_top(count, log_probs[..., 0])

    def extra_flops(self, info: SparseInfo, num_patches: int) -> torch.Tensor:
        """Each stage's predictor runs on the patch tokens present before that stage prunes (`info`:
        the forward; `num_patches`: N): (B,) multiply-adds (what the papers call FLOPs).

        Gather regime (eval): a stage that keeps every token skips its predictor. Mask regime (training):
        every token stays in the tensor and each predictor scores all of them.
        """
        patch_tokens = info.tokens_per_block.detach().to("cpu", torch.float64) - info.num_prefix
        gathered = bool(info.kept_index)  # kept indices are recorded only when tokens are gathered
        total = torch.zeros(patch_tokens.shape[0], dtype=torch.float64)
        for location, predictor in zip(self.locations, self, strict=True):
            before = patch_tokens[:, location - 1] if location > 0 else torch.full_like(total, num_patches)
            ran = (patch_tokens[:, location] < before).double() if gathered else torch.ones_like(total)
            total += ran * predictor.macs(before, ranking_only=gathered)
        return total


def dynamicvit(
    model: VisionTransformer,
    keep_ratio: float | None = None,
    locations: Sequence[int] | None = None,
    target_gflops: float | None = None,
) -> VisionTransformer:
    """Make `model` a DynamicViT in place (and return it): predictors before blocks `locations`.

    locations defaults to a quarter of the depth apart: (3, 6, 9) for a 12-block ViT, as the paper. Stage s
    keeps int(N * keep_ratio ** (s + 1)) patch tokens (N = patches of the model; keep_ratio defaults to 0.7,
    DynamicViT's headline ratio, Rao et al. 2021); prefix tokens (class, distillation, registers) are never
    pruned. `target_gflops` (GMACs per image: multiply-adds, what the papers call FLOPs; default None) instead
    of keep_ratio: the largest keep ratio whose executed GMACs per image at the model's input size (predictors
    included) are at most the target and within 2% of it (`tokensparse.budget`); ValueError naming the
    reachable range otherwise. The predictors start from random weights; load trained ones with
    `tokensparse.load_checkpoint` or train them with the DynamicViT loss. Runs on every backbone family
    (`tokensparse.adapters`): its training form masks attention through the family's own positions.
    """
    ratio = ratio_or_budget(keep_ratio, target_gflops)
    ratio, locations = stage_policy_args(model, ratio, locations)
    width = backbone_of(model).width
    sparsify(model, DynamicViTPolicy(width, ratio, locations), "score_predictor")
    return meet_budget(model, target_gflops)


def from_config(model: VisionTransformer, cfg: TrainConfig) -> VisionTransformer:
    """`dynamicvit` on `model` with the settings of the `TrainConfig` `cfg` (the registry's constructor)."""
    return dynamicvit(
        model, keep_ratio=cfg.keep_ratio, locations=cfg.locations, target_gflops=cfg.target_gflops
    )


def _objective(cfg: TrainConfig, depth: int) -> torch.nn.Module:
    from ..losses.dynamicvit import DynamicViTLoss

    return DynamicViTLoss.from_config(cfg, depth)


# The authors' recipe (raoyongming/DynamicViT main.py and optim_factory.py): MSE token distillation for
# DeiT/ViT, cls_token and pos_embed frozen, the backbone at lr x 0.01 and at lr 0 for its first 5
# epochs, the predictors at the full lr from the start.
register_method(
    Method(
        "dynamicvit",
        sparsify=from_config,
        objective=_objective,
        recipe=dict(
            keep_ratio=0.7,
            ratio_weight=2.0,
            token_distill="mse",
            distill_weight=0.5,
            backbone_lr_scale=0.01,
            backbone_fixed_epochs=5,
            freeze_embeddings=True,
        ),
        settings=(
            KEEP_RATIO,
            LOCATIONS,
            TARGET_GFLOPS,
            RATIO_WEIGHT,
            Setting(
                "token_distill",
                str,
                "token distillation: mse (DeiT/ViT, the authors' default) or kl (their LV-ViT)",
                choices=("mse", "kl"),
                source="DynamicViT losses.py, mse_token",
            ),
            DISTILL_WEIGHT,
        ),
        bench_setting="keep_ratio",
        budget_knob="keep_ratio",
    )
)
