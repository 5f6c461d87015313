"""The dynamic spatial (ConvNeXt / Swin) objective of DynamicViT's journal version."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from ..config import TrainConfig
from .common import (
    DYNAMICVIT_PARTS,
    Objective,
    _as_floats,
    _check_weight,
    _distill_weight_needs_teacher,
    classification_loss,
    logits_kl,
)


class DynamicSpatialLoss(Objective):
    """The authors' `ConvNextDistillDiffPruningLoss` (losses.py), used for dynamic ConvNeXt and Swin.

    clf * CE + ratio * sum_s mean_b (mean_n keep_s - target_s)^2 / stages + distill * KL(teacher ||
    student logits) + distill * MSE(student, teacher final-norm features over every position and
    channel). Targets are (rho, rho - 0.2, rho - 0.4); their main.py uses ratio weight 10 (not
    DynamicViT's 2), clf 1 and distill 0.5. Unlike DynamicViT, the feature distillation covers all
    positions (none is dropped), and the parts are reported as the authors log them (ratio undivided).

    keep_ratio rho defaults to 0.7, the journal version's headline ratio (Rao et al. 2023); clf_weight
    1.0, ratio_weight 10.0 and distill_weight 0.5 are their main.py's; label_smoothing 0.0 (see
    `classification_loss`).

        teacher_logits, teacher_features = spatial_teacher_outputs(teacher, images)
        logits = model(images)  # train mode
        loss, parts = criterion(logits, labels, tokensparse.dynamic_spatial_info(model),
                                teacher_logits, teacher_features)
    """

    def __init__(
        self,
        keep_ratio: float = 0.7,
        *,
        clf_weight: float = 1.0,
        ratio_weight: float = 10.0,
        distill_weight: float = 0.5,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        from ..policies.dynspatial import stage_keep_ratios

        self.targets = stage_keep_ratios(keep_ratio)
        self.clf_weight = _check_weight("clf_weight", clf_weight)
        self.ratio_weight = _check_weight("ratio_weight", ratio_weight)
        self.distill_weight = _check_weight("distill_weight", distill_weight)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)

    @classmethod
    def from_config(cls, cfg: TrainConfig, depth: int = 12) -> DynamicSpatialLoss:
        """The loss of a `TrainConfig` `cfg` (`depth` unused)."""
        return cls(
            cfg.keep_ratio,
            ratio_weight=cfg.ratio_weight,
            distill_weight=cfg.distill_weight,
            label_smoothing=cfg.smoothing,
        )

    teacher_parts = 2

    def teacher_targets(self, teacher: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The frozen `teacher`'s logits and features on `images` (`spatial_teacher_outputs`)."""
        return spatial_teacher_outputs(teacher, images)  # logits and final-norm features per position

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        student_info,
        teacher_logits: torch.Tensor | None = None,
        teacher_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and {'cls', 'ratio', 'distill', 'token', 'total'} as floats (unweighted parts).

        logits (B, K) and labels as in `classification_loss`; teacher_logits (B, K), the teacher's (None:
        no distillation, only with distill_weight 0).
        student_info: `tokensparse.dynamic_spatial_info(model)` of the training forward that gave
        `logits` (or the model); teacher_features (B, M, C) from `spatial_teacher_outputs`.
        """
        from ..policies.dynspatial import SpatialInfo, dynamic_spatial_info

        info = student_info if isinstance(student_info, SpatialInfo) else dynamic_spatial_info(student_info)
        decisions = info.keep_decisions
        if len(decisions) != len(self.targets) or info.kept_index:
            raise ValueError(
                "the loss needs the keep decisions of a training-mode forward (model.train()), "
                f"got {len(decisions)} decisions{' of an eval forward' if info.kept_index else ''}"
            )
        _distill_weight_needs_teacher(self.distill_weight, teacher_logits)
        logits = logits.float()
        cls = classification_loss(logits, labels, self.label_smoothing)
        ratio = logits.new_zeros(())
        for decision, target in zip(decisions, self.targets, strict=True):
            ratio = ratio + ((decision.float().mean(1) - target) ** 2).mean()
        distill = token = logits.new_zeros(())
        if teacher_logits is not None:
            if teacher_features is None or info.features is None:
                raise ValueError(
                    "feature distillation needs the teacher's features and a training-mode forward"
                )
            if teacher_features.shape != info.features.shape:
                raise ValueError(
                    f"student features {tuple(info.features.shape)} and teacher features "
                    f"{tuple(teacher_features.shape)} differ: the teacher must be the same architecture"
                )
            distill = logits_kl(logits, teacher_logits)
            token = (info.features.float() - teacher_features.float()).pow(2).mean()
        total = (
            self.clf_weight * cls
            + self.ratio_weight * ratio / len(decisions)
            + self.distill_weight * (distill + token)
        )
        return total, _as_floats(DYNAMICVIT_PARTS, torch.stack([cls, ratio, distill, token]), total)

    def extra_repr(self) -> str:
        return (
            f"targets={self.targets}, clf_weight={self.clf_weight}, ratio_weight={self.ratio_weight}, "
            f"distill_weight={self.distill_weight}"
        )


@torch.no_grad()
def spatial_teacher_outputs(teacher: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, K), final-norm features per position (B, M, C)) of a frozen dense `teacher`, a timm
    ConvNeXt or SwinTransformer, on `images` (B, 3, H, W), in eval mode (restored after): the authors'
    ConvNeXt_Teacher / SwinTransformer_Teacher."""
    from timm.models.convnext import ConvNeXt
    from timm.models.swin_transformer import SwinTransformer

    from ..policies.dynconvnext import DynamicConvNeXt, convnext_feature_map
    from ..policies.dynswin import DynamicSwinTransformer, swin_feature_map

    inner = getattr(teacher, "module", teacher)
    if isinstance(inner, (DynamicConvNeXt, DynamicSwinTransformer)):
        raise ValueError("the teacher is a dynamic model; use the dense model (a copy taken before patching)")
    if isinstance(inner, ConvNeXt):
        feature_map = convnext_feature_map
    elif isinstance(inner, SwinTransformer):
        feature_map = swin_feature_map
    else:
        raise ValueError(
            f"the teacher must be a timm ConvNeXt or SwinTransformer, got {type(inner).__name__}"
        )
    was_training = inner.training
    inner.eval()
    try:
        features = inner.forward_features(images)
        logits = inner.forward_head(features)
    finally:
        inner.train(was_training)
    return logits, feature_map(inner, features)
