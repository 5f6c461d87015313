"""DiffRate's search: the searchable counts (`CompressionRate`), the straight-through functions, the
authors' FLOP formula and the search's objective (github:OpenGVLab/DiffRate `ddp.py`, `utils.py`,
`patch/deit.py` calculate_flop_*, `engine.py`). The policy that uses them is `policies/diffrate.py`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

    from ..config import TrainConfig
    from .diffrate import DiffRatePolicy

FLOP_WEIGHT = 5.0  # engine.py's lamb


class STECeil(torch.autograd.Function):
    """ceil in the forward, identity in the backward (the authors' `ste_ceil`)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        """ceil(`x`)."""
        return torch.ceil(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        """`grad` unchanged (straight-through)."""
        return grad


class STEMin(torch.autograd.Function):
    """min(n, prune, merge) in the forward; the backward sends the whole gradient to both counts and
    none to n (the authors' `ste_min`)."""

    @staticmethod
    def forward(ctx, n, prune, merge):  # type: ignore[override]
        """min(`n`, `prune`, `merge`): the tokens a block leaves of the n entering it."""
        return torch.minimum(torch.minimum(n, prune), merge)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        """`grad` to both counts, none to n."""
        return None, grad, grad


class CompressionRate(nn.Module):
    """One block's searchable count (the authors' `DiffRate` module): logits over candidate patch
    counts; the count is ceil(E[candidate]) + 1 (class token included), straight-through.

    patches: N, the patch count (candidates N, N - granularity, ..., down to >= 1); granularity: the step
    between candidates (DiffRate's main.py uses 4, Chen et al. 2023; N + 1 leaves one candidate, N)."""

    def __init__(self, patches: int, granularity: int):
        super().__init__()
        self.patches = patches
        self.register_buffer(
            "candidates", torch.arange(patches, 0, -granularity, dtype=torch.float32), persistent=False
        )
        self.logits = nn.Parameter(torch.zeros_like(self.candidates))

    def kept(self) -> torch.Tensor:
        """() tokens kept, class token included, with the straight-through gradient."""
        return STECeil.apply(self.candidates @ self.logits.softmax(dim=0)) + 1

    def token_mask(self, kept: int, present: int) -> torch.Tensor:
        """(N + 1,) 0 at sorted positions [kept, present), else 1; gradient of P(count > position)."""
        probability = self.logits.softmax(dim=0)
        positions = torch.arange(self.patches + 1, device=probability.device)
        above = (positions[:, None] < (self.candidates + 1)[None, :]).to(probability.dtype)
        token_probability = above @ probability
        hard = torch.ones_like(token_probability)
        hard[kept:present] = 0.0
        return hard - token_probability.detach() + token_probability


def authors_flops(policy: DiffRatePolicy, prune: Sequence[Any], merge: Sequence[Any]) -> torch.Tensor:
    """The authors' FLOP count (multiply-adds, `calculate_flop_training` / `_inference`) of `policy`'s
    model at the per-block counts `prune` and `merge` (ints or tensors): patch
    embedding on every token (class token included), per block 4 N C^2 + 2 N^2 C for attention on the N
    tokens entering and 8 N' C^2 for the MLP on N' = min(N, prune, merge), and the head. With tensors
    for the counts, differentiable as theirs (`STEMin`)."""
    c = policy.embed_dim
    device = next((v.device for v in (*prune, *merge) if torch.is_tensor(v)), torch.device("cpu"))

    def count(v: Any) -> torch.Tensor:
        return v.float() if torch.is_tensor(v) else torch.tensor(float(v), device=device)

    n = torch.tensor(float(policy.tokens), device=device)
    flops = n * policy.patch_macs
    for p, m in zip(prune, merge, strict=True):
        flops = flops + 4 * n * c * c + 2 * n * n * c
        n = STEMin.apply(n, count(p), count(m))
        flops = flops + 8 * n * c * c
    return flops + policy.head_macs


class DiffRateLoss(nn.Module):
    """The search's objective: cross-entropy (soft targets with Mixup) + flop_weight x (GFLOPs by the
    authors' formula - target)^2, as their engine.py.

    target_gflops: the budget in GMACs per image (multiply-adds, what the papers call FLOPs) by
    tokensparse's count, converted to the authors' count by the dense model's ratio; flop_weight defaults
    to 5.0, their engine.py's `lamb` (Chen et al. 2023); label_smoothing to 0.0."""

    def __init__(self, target_gflops: float, flop_weight: float = FLOP_WEIGHT, label_smoothing: float = 0.0):
        super().__init__()
        if target_gflops is None or not target_gflops > 0:
            raise ValueError("the DiffRate search needs --target-gflops (its FLOP target)")
        self.target_gflops, self.flop_weight, self.label_smoothing = (
            float(target_gflops),
            flop_weight,
            label_smoothing,
        )
        self.authors_target: float | None = None

    @classmethod
    def from_config(cls, cfg: TrainConfig, depth: int = 12) -> DiffRateLoss:
        """The loss of a `TrainConfig` `cfg` (its target_gflops, flop_weight, smoothing; `depth` unused)."""
        return cls(cfg.target_gflops, cfg.get("flop_weight") or FLOP_WEIGHT, cfg.smoothing)

    def step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, teacher: nn.Module | None):
        """(loss, parts) of one search step of `model` (a searchable DiffRate model) on `images` and
        `labels`; `teacher` is not used (the search does not distil)."""
        from ..engine import get_policy, sparsity_info
        from ..losses.common import classification_loss

        logits = model(images)
        inner = getattr(model, "module", model)
        policy = get_policy(inner)
        if self.authors_target is None:  # tokensparse's GMACs -> the authors' count, by the dense ratio
            ratio, dense = authors_dense_ratio(inner, policy)
            if self.target_gflops >= dense:
                raise ValueError(
                    f"--target-gflops {self.target_gflops:g} is at or above the dense model's {dense:.4g} GMACs "
                    "per image: there is nothing for the search to remove"
                )
            self.authors_target = self.target_gflops * ratio
        flops = sparsity_info(inner).extra["search_flops"]
        task = classification_loss(logits, labels, self.label_smoothing)
        flop_term = (flops / 1e9 - self.authors_target) ** 2
        loss = self.flop_weight * flop_term + task
        return loss, {"cls": task.item(), "gflops": float(flops.detach()) / 1e9, "total": loss.item()}


def authors_dense_ratio(model: nn.Module, policy: DiffRatePolicy) -> tuple[float, float]:
    """(the authors' dense FLOP count over tokensparse's, tokensparse's dense GMACs per image) of `model`,
    the ViT under `policy`, a `DiffRatePolicy`."""
    from ..flops import backbone_flops

    tokens = torch.full((1, policy.depth), policy.tokens)
    ours = float(backbone_flops(model, tokens, policy.tokens - 1).sum())
    theirs = float(authors_flops(policy, [policy.tokens] * policy.depth, [policy.tokens] * policy.depth))
    return theirs / ours, ours / 1e9


DEIT_S_GFLOPS = 4.599177216  # DeiT-S by the authors' formula, the model their loss weight was set on


def deit_s_flop_weight(model: VisionTransformer) -> float:
    """The FLOP weight under which the search weighs a relative FLOP error on `model` as the authors'
    weight 5 does on DeiT-S: 5 x (DeiT-S's GFLOPs / the model's)^2 (their term is in absolute GFLOPs)."""
    from .diffrate import DiffRatePolicy

    policy = DiffRatePolicy(model, None, None)
    dense = float(authors_flops(policy, [policy.tokens] * policy.depth, [policy.tokens] * policy.depth)) / 1e9
    return round(FLOP_WEIGHT * (DEIT_S_GFLOPS / dense) ** 2, 1)
