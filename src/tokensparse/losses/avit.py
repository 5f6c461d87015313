"""A-ViT's objective (the authors' training loss): classification, ponder cost, distributional prior,
optional distillation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checks import check_int, check_number
from ..engine import SparseInfo

if TYPE_CHECKING:
    from ..config import TrainConfig
from .common import (
    AVIT_PARTS,
    Logits,
    Objective,
    _as_floats,
    _check_weight,
    _distill_weight_needs_teacher,
    _resolve_info,
    classification_loss,
    logits_kl,
    merge_heads,
)


def avit_prior(depth: int = 12, target_depth: int = 8, std: float = 1.0, mass: float = 0.98) -> torch.Tensor:
    """The A-ViT distributional prior over `depth` blocks (default 12), as the authors' code builds it.

    Gaussian pdf N(target_depth, std) at depths 0..depth-1, scaled so that the first `target_depth` entries
    sum to `mass` (0.98). The defaults, target_depth 8 and std 1.0 for 12 blocks, are A-ViT's (Yin et al.
    2022, the authors' `distr_target_depth`). It is not normalised to 1 (for depth 12, target 8 the entries
    sum to about 2.29); the authors regularise towards exactly this vector. Computed in float64, returned as
    float32.
    """
    check_int("depth", depth, lambda v: v >= 1, "a positive int")
    check_int("target_depth", target_depth, lambda v: 1 <= v <= depth, f"an int in 1..{depth}")
    if not std > 0 or not math.isfinite(std):
        raise ValueError(f"std must be > 0, got {std!r}")
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass!r}")
    depths = torch.arange(depth, dtype=torch.float64)
    pdf = torch.exp(-0.5 * ((depths - target_depth) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    return (pdf / pdf[:target_depth].sum() * mass).float()


def halting_distribution(halting_score_layer: torch.Tensor) -> torch.Tensor:
    """`halting_score_layer`, the per-block mean halting scores (depth,), divided by their sum and clamped to
    [0.01, 0.99], as the authors' code does before the prior's KL."""
    scores = halting_score_layer.float()
    return torch.clamp(scores / scores.sum(), 0.01, 0.99)


def avit_loss(
    logits: Logits,
    labels: torch.Tensor,
    ponder: torch.Tensor,
    halting_score_layer: torch.Tensor,
    prior: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    ponder_weight: float = 5e-4,
    prior_weight: float = 1e-3,
    distill_weight: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The A-ViT objective on tensors; returns (total, parts) with parts = [cls, ponder, prior, distill].

    ponder (B, P + N): per-token ponder cost N_k + R_k, class token included; its mean over images and
    all tokens is the ponder part. halting_score_layer (depth,): per-block mean halting score. prior
    (depth,): `avit_prior(depth, target_depth)`. logits (B, K) or a `(cls, dist)` tuple and labels as in
    `classification_loss`; teacher_logits (B, K), or None without distillation.

    The weights default to A-ViT's DeiT setting (Yin et al. 2022, the authors' code): ponder_weight 5e-4
    (their `ponder_token_scale`), prior_weight 1e-3 (`distr_prior_alpha`); distill_weight 0.0 (off;
    needs teacher_logits when > 0); label_smoothing 0.0 (DeiT's recipe uses 0.1).

    The prior part is `nn.KLDivLoss(reduction='batchmean')(q.log(), prior)` on the 1-D vectors, as
    the authors' code computes it: 'batchmean' divides sum_l prior_l (log prior_l - log q_l) by the
    vector's first dimension, i.e. by depth, not by a batch size. Reproduced on purpose so that the
    authors' prior_weight (1e-3) means what it meant in their runs.
    """
    _distill_weight_needs_teacher(distill_weight, teacher_logits)
    logits = merge_heads(logits).float()
    cls = classification_loss(logits, labels, label_smoothing)
    ponder_cost = ponder.float().mean()
    if halting_score_layer.ndim != 1 or halting_score_layer.shape != prior.shape:
        raise ValueError(
            f"halting_score_layer {tuple(halting_score_layer.shape)} and prior {tuple(prior.shape)} "
            "must both be "
            "(depth,) vectors"
        )
    q = halting_distribution(halting_score_layer)
    prior_kl = F.kl_div(q.log(), prior.to(q.device, torch.float32), reduction="batchmean")  # sum / depth
    distill = logits.new_zeros(()) if teacher_logits is None else logits_kl(logits, teacher_logits)
    total = cls + ponder_weight * ponder_cost + prior_weight * prior_kl + distill_weight * distill
    return total, torch.stack([cls, ponder_cost, prior_kl, distill])


class AViTLoss(Objective):
    """The A-ViT training loss (Yin et al., 2022): CE + ponder cost + distributional prior (+ distillation).

    Reads `ponder` (B, P + N) and `halting_score_layer` (depth,) from `sparsity_info(model).extra`.
    The prior is a Gaussian over blocks centred at `target_depth` (8 for 12 blocks) with std 1 and
    the first `target_depth` entries summing to 0.98 (see `avit_prior`), built for the model's depth
    on first use. distill_weight > 0 adds the logits KL to a teacher (as in DynamicViT).

    Defaults, A-ViT's (Yin et al. 2022, the authors' code): ponder_weight 5e-4, prior_weight 1e-3,
    target_depth 8, prior_std 1.0; distill_weight 0.0 (off) and label_smoothing 0.0 (see
    `classification_loss`). The weights are the coefficients of the unweighted parts in `avit_loss`.

    halting_score_layer averages each block's halting scores over ALL images of the batch (halted
    tokens included). The authors' code averages `h[1:]`, dropping image 0 of every batch: a slip,
    deliberately not reproduced. Every term's gradient equals that of their training code within 1e-4
    (tests/test_avit_grads.py; the prior's reference computed from their pieces over all images).
    """

    def __init__(
        self,
        *,
        ponder_weight: float = 5e-4,
        prior_weight: float = 1e-3,
        target_depth: int = 8,
        prior_std: float = 1.0,
        distill_weight: float = 0.0,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        check_int("target_depth", target_depth, lambda v: v >= 1, "a positive int")
        check_number("prior_std", prior_std, lambda v: v > 0, "> 0")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.ponder_weight = _check_weight("ponder_weight", ponder_weight)
        self.prior_weight = _check_weight("prior_weight", prior_weight)
        self.distill_weight = _check_weight("distill_weight", distill_weight)
        self.target_depth = target_depth
        self.prior_std = float(prior_std)
        self.label_smoothing = float(label_smoothing)
        self._priors: dict[int, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg: TrainConfig, depth: int = 12) -> AViTLoss:
        """The loss of a `TrainConfig` `cfg` for a model of `depth` blocks (target depth 8/12 of it)."""
        loss = cls(
            ponder_weight=cfg.ponder_weight,
            prior_weight=cfg.prior_weight,
            target_depth=cfg.prior_depth or max(1, round(depth * 8 / 12)),  # the paper: block 8 of 12
            distill_weight=cfg.distill_weight,
            label_smoothing=cfg.smoothing,
        )
        if cfg.prior_depth is not None and cfg.prior_depth > depth:  # refused before any file is touched
            raise ValueError(f"--prior-depth {cfg.prior_depth} is deeper than the model's {depth} blocks")
        return loss

    def prior(self, depth: int) -> torch.Tensor:
        """`avit_prior` for a model of `depth` blocks, built once and cached."""
        if depth not in self._priors:
            if self.target_depth > depth:
                raise ValueError(
                    f"target_depth={self.target_depth} is deeper than the model's {depth} blocks"
                )
            self._priors[depth] = avit_prior(depth, self.target_depth, self.prior_std)
        return self._priors[depth]

    def forward(
        self,
        logits: Logits,
        labels: torch.Tensor,
        student_info: SparseInfo | nn.Module,
        teacher_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and {'cls', 'ponder', 'prior', 'distill', 'total'} as floats (unweighted parts).

        `logits` and `labels` as in `avit_loss`; `student_info` the student model (an `avit` model in
        training mode) or its `SparseInfo`; `teacher_logits` the teacher's, or None."""
        extra: Mapping = _resolve_info(student_info).extra
        missing = [key for key in ("ponder", "halting_score_layer") if extra.get(key) is None]
        if missing:
            raise ValueError(
                f"sparsity_info(model).extra lacks {missing}: AViTLoss needs a model made by "
                "tokensparse.avit, "
                "run in training mode"
            )
        halting = extra["halting_score_layer"]
        if isinstance(halting, (list, tuple)):
            halting = torch.stack([torch.as_tensor(h) for h in halting])
        prior = self.prior(halting.shape[0]).to(halting.device)
        total, parts = avit_loss(
            logits,
            labels,
            extra["ponder"],
            halting,
            prior,
            teacher_logits,
            ponder_weight=self.ponder_weight,
            prior_weight=self.prior_weight,
            distill_weight=self.distill_weight,
            label_smoothing=self.label_smoothing,
        )
        return total, _as_floats(AVIT_PARTS, parts, total)

    def extra_repr(self) -> str:
        return (
            f"ponder_weight={self.ponder_weight}, prior_weight={self.prior_weight}, "
            f"target_depth={self.target_depth}, "
            f"distill_weight={self.distill_weight}"
        )
