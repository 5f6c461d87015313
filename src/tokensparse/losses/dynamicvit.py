"""DynamicViT's objective (the authors' DistillDiffPruningLoss): classification, keep ratio, logits
and token distillation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checks import check_number
from ..engine import SparseInfo

if TYPE_CHECKING:
    from ..config import TrainConfig
from .common import (
    DYNAMICVIT_PARTS,
    TOKEN_DISTILL_MODES,
    Logits,
    Objective,
    TokenDistill,
    _as_floats,
    _check_weight,
    _distill_weight_needs_teacher,
    _resolve_info,
    classification_loss,
    logits_kl,
    merge_heads,
    teacher_outputs,
)


def keep_targets(keep_ratio: float, stages: int) -> list[float]:
    """Per-stage keep targets rho, rho^2, rho^3, ... (the fraction of all patches each stage keeps), for
    rho = `keep_ratio` in (0, 1] and `stages` pruning stages (DynamicViT's, Rao et al. 2021)."""
    return [keep_ratio ** (s + 1) for s in range(stages)]


def dynamicvit_loss(
    logits: Logits,
    labels: torch.Tensor,
    keep_decisions: Sequence[torch.Tensor],
    keep_mask: torch.Tensor,
    student_tokens: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    teacher_tokens: torch.Tensor | None,
    targets: Sequence[float],
    *,
    clf_weight: float = 1.0,
    ratio_weight: float = 2.0,
    distill_weight: float = 0.5,
    token_distill: TokenDistill = "mse",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DynamicViT objective on tensors; returns (total, parts) with parts = [cls, ratio, distill, token].

    logits (B, K); labels (B,) or soft (B, K); keep_decisions: per stage (B, N) keep masks (with gradient);
    keep_mask (B, N) or (B, N, 1): the final keep mask, a token counts as kept where it is > 0.5;
    student_tokens and teacher_tokens (B, N, C): final-norm patch tokens; targets: per-stage keep fraction.

    total = clf * CE + ratio * ratio_sum / stages + distill * logits_KL + distill * token_term, where
    ratio_sum = sum_s mean_b (mean_n keep_s - target_s)^2 (the part is reported undivided, as the
    authors log it) and token_term is computed on the kept tokens only: KL over channels (batch mean
    over kept tokens) or the mean squared error over kept tokens and channels; 0 if none is kept.
    With distill_weight = 0 the teacher's outputs may be None (their parts are then 0); teacher_logits
    (B, K) is the teacher's.

    The weights default to DynamicViT's (Rao et al. 2021, the authors' DistillDiffPruningLoss for DeiT):
    clf_weight 1.0, ratio_weight 2.0, distill_weight 0.5 (on both distillation terms), token_distill
    'mse' (their main.py's mse_token=True; 'kl' is their LV-ViT setting); label_smoothing 0.0 (see
    `classification_loss`).
    """
    if token_distill not in TOKEN_DISTILL_MODES:
        raise ValueError(f"token_distill must be one of {TOKEN_DISTILL_MODES}, got {token_distill!r}")
    if len(keep_decisions) == 0:
        raise ValueError(
            "no pruning stage decided anything: keep_decisions is empty (is this a DynamicViT model?)"
        )
    if len(targets) != len(keep_decisions):
        raise ValueError(f"{len(targets)} keep targets for {len(keep_decisions)} pruning stages")
    _distill_weight_needs_teacher(distill_weight, teacher_logits)
    logits = merge_heads(logits).float()
    cls = classification_loss(logits, labels, label_smoothing)

    ratio = logits.new_zeros(())
    for decision, target in zip(keep_decisions, targets, strict=True):
        ratio = ratio + ((decision.float().mean(1) - target) ** 2).mean()

    zero = logits.new_zeros(())
    if teacher_logits is None:
        distill = token = zero
    else:
        distill = logits_kl(logits, teacher_logits)
        if teacher_tokens is None:
            raise ValueError("teacher_tokens is needed with teacher_logits (token distillation)")
        token = _token_distillation(student_tokens, teacher_tokens, keep_mask, token_distill)

    total = clf_weight * cls + ratio_weight * ratio / len(keep_decisions) + distill_weight * (distill + token)
    return total, torch.stack([cls, ratio, distill, token])


def _token_distillation(
    student: torch.Tensor, teacher: torch.Tensor, keep_mask: torch.Tensor, mode: TokenDistill
) -> torch.Tensor:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student patch tokens {tuple(student.shape)} and teacher patch tokens "
            f"{tuple(teacher.shape)} differ; "
            "the teacher must be the dense model of the same width (its forward_features[:, num_prefix:])"
        )
    batch, tokens, channels = student.shape
    if keep_mask.numel() != batch * tokens:
        raise ValueError(
            f"keep mask {tuple(keep_mask.shape)} does not match the {batch}x{tokens} patch tokens"
        )
    if keep_mask.sum() < 0.1:  # nothing kept anywhere in the batch: the authors' zero
        return student.new_zeros((), dtype=torch.float32)
    kept = keep_mask.reshape(batch * tokens) > 0.5
    student = student.reshape(batch * tokens, channels)[kept].float()
    teacher = teacher.reshape(batch * tokens, channels)[kept].float()
    if mode == "mse":
        return (student - teacher).pow(2).mean()
    return F.kl_div(
        F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), reduction="batchmean", log_target=True
    )


class DynamicViTLoss(Objective):
    """The DynamicViT training loss (Rao et al., 2021) with the authors' default weights.

    keep_ratio gives the per-stage targets rho^(s+1) for as many stages as the model has; `targets`
    sets them explicitly instead. token_distill: 'mse' (the default: the authors' current main.py
    builds every DeiT criterion with mse_token=True; they use ratio_weight=5.0 for DeiT-B) or 'kl'
    (KL over channels, their LV-ViT setting). keep_ratio defaults to 0.7, DynamicViT's headline ratio;
    clf_weight 1.0, ratio_weight 2.0 and distill_weight 0.5 are the authors' DeiT weights (as in
    `dynamicvit_loss`); label_smoothing 0.0 (see `classification_loss`).

        teacher_logits, teacher_tokens = teacher_outputs(teacher, images)
        logits = model(images)
        info = tokensparse.sparsity_info(model)
        loss, parts = criterion(logits, labels, info, teacher_logits, teacher_tokens)
    """

    def __init__(
        self,
        keep_ratio: float = 0.7,
        *,
        targets: Sequence[float] | None = None,
        clf_weight: float = 1.0,
        ratio_weight: float = 2.0,
        distill_weight: float = 0.5,
        token_distill: TokenDistill = "mse",
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        check_number("keep_ratio", keep_ratio, lambda v: 0.0 < v <= 1.0, "in (0, 1]")
        if targets is not None:
            targets = tuple(float(t) for t in targets)
            if not targets or any(not 0.0 <= t <= 1.0 for t in targets):
                raise ValueError(
                    f"targets must be a non-empty sequence of fractions in [0, 1], got {targets!r}"
                )
        if token_distill not in TOKEN_DISTILL_MODES:
            raise ValueError(f"token_distill must be one of {TOKEN_DISTILL_MODES}, got {token_distill!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.keep_ratio = float(keep_ratio)
        self.targets = targets
        self.clf_weight = _check_weight("clf_weight", clf_weight)
        self.ratio_weight = _check_weight("ratio_weight", ratio_weight)
        self.distill_weight = _check_weight("distill_weight", distill_weight)
        self.token_distill = token_distill
        self.label_smoothing = float(label_smoothing)

    @classmethod
    def from_config(cls, cfg: TrainConfig, depth: int = 12) -> DynamicViTLoss:
        """The loss of a `TrainConfig` `cfg` (`depth` unused: the stages are counted on each forward)."""
        return cls(
            cfg.keep_ratio,
            ratio_weight=cfg.ratio_weight,
            distill_weight=cfg.distill_weight,
            token_distill=cfg.token_distill,
            label_smoothing=cfg.smoothing,
        )

    teacher_parts = 2

    def teacher_targets(self, teacher: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The frozen `teacher`'s logits and final-norm patch tokens on `images` (`teacher_outputs`)."""
        return teacher_outputs(teacher, images)  # logits and final-norm patch tokens

    def stage_targets(self, stages: int) -> list[float]:
        """The keep targets of a model with `stages` pruning stages (`targets`, or rho^(s+1))."""
        if self.targets is None:
            return keep_targets(self.keep_ratio, stages)
        if len(self.targets) != stages:
            raise ValueError(
                f"{len(self.targets)} keep targets given for a model with {stages} pruning stages"
            )
        return list(self.targets)

    def forward(
        self,
        logits: Logits,
        labels: torch.Tensor,
        student_info: SparseInfo | nn.Module,
        teacher_logits: torch.Tensor | None = None,
        teacher_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and {'cls', 'ratio', 'distill', 'token', 'total'} as floats (unweighted parts).

        logits and labels as in `dynamicvit_loss`; teacher_logits (B, K): the teacher's (None: no
        distillation, only with distill_weight 0).
        student_info: `tokensparse.sparsity_info(model)` of the forward that gave `logits` (or the model).
        teacher_tokens: (B, N, C) the dense teacher's final-norm patch tokens. In the training (mask)
        regime the student carries all N patch tokens; in the gather regime (eval) the teacher's tokens
        are gathered at the student's surviving patches, all of which count as kept.
        """
        info = _resolve_info(student_info)
        student_tokens, keep_mask = info.patch_tokens, info.keep_mask
        if teacher_tokens is not None and student_tokens.shape[1] != teacher_tokens.shape[1]:
            if info.patch_index.shape[:2] != student_tokens.shape[:2] or teacher_tokens.ndim != 3:
                raise ValueError(
                    f"student patch tokens {tuple(student_tokens.shape)} and teacher patch tokens "
                    f"{tuple(teacher_tokens.shape)} cannot be matched"
                )
            index = info.patch_index.unsqueeze(-1).expand(-1, -1, teacher_tokens.shape[-1])
            teacher_tokens = teacher_tokens.gather(1, index)
            keep_mask = student_tokens.new_ones(student_tokens.shape[:2])
        total, parts = dynamicvit_loss(
            logits,
            labels,
            info.keep_decisions,
            keep_mask,
            student_tokens,
            teacher_logits,
            teacher_tokens,
            self.stage_targets(len(info.keep_decisions)),
            clf_weight=self.clf_weight,
            ratio_weight=self.ratio_weight,
            distill_weight=self.distill_weight,
            token_distill=self.token_distill,
            label_smoothing=self.label_smoothing,
        )
        return total, _as_floats(DYNAMICVIT_PARTS, parts, total)

    def extra_repr(self) -> str:
        targets = self.targets if self.targets is not None else f"rho={self.keep_ratio}"
        return (
            f"targets={targets}, clf_weight={self.clf_weight}, ratio_weight={self.ratio_weight}, "
            f"distill_weight={self.distill_weight}, token_distill={self.token_distill!r}"
        )
