"""What every objective shares: classification, logits distillation, the teacher's outputs, the
`Objective` interface."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checks import check_number
from ..engine import SparseInfo, get_policy, sparsity_info

if TYPE_CHECKING:
    from ..config import TrainConfig

TokenDistill = Literal["kl", "mse"]
TOKEN_DISTILL_MODES = ("kl", "mse")
DYNAMICVIT_PARTS = ("cls", "ratio", "distill", "token")
AVIT_PARTS = ("cls", "ponder", "prior", "distill")

Logits = torch.Tensor | tuple[torch.Tensor, ...]


def _check_weight(name: str, value: float) -> float:
    return check_number(name, value, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def merge_heads(logits: Logits) -> torch.Tensor:
    """A distilled model's `(cls, dist)` logits averaged into one tensor (as timm does at inference)."""
    if isinstance(logits, (tuple, list)):
        if not logits:
            raise ValueError("got an empty tuple of logits")
        return torch.stack([torch.as_tensor(head) for head in logits]).mean(0)
    return logits


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy of `logits` (B, classes) for `labels`: hard labels (B,) or soft targets (B, classes),
    e.g. from timm's Mixup/CutMix.

    Soft targets give mean_b(-sum_c y_bc log softmax(x)_bc), timm's SoftTargetCrossEntropy.
    `label_smoothing` (default 0.0: off) is torch's, for hard labels only (timm's Mixup smooths the soft
    targets it makes); DeiT's recipe, which DynamicViT and A-ViT train with, uses 0.1 (Touvron et al. 2021).
    """
    logits = logits.float()
    if labels.ndim == logits.ndim and labels.shape == logits.shape and labels.is_floating_point():
        return F.cross_entropy(logits, labels.float())  # soft targets (Mixup) carry their smoothing already
    if (
        labels.ndim == logits.ndim - 1
        and labels.shape == logits.shape[:-1]
        and not labels.is_floating_point()
    ):
        return F.cross_entropy(logits, labels.long(), label_smoothing=label_smoothing)
    raise ValueError(
        f"labels must be class indices of shape {tuple(logits.shape[:-1])} (integer) or soft targets of "
        f"shape {tuple(logits.shape)} (float); got {tuple(labels.shape)} {labels.dtype}"
    )


def logits_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the class distributions, batch mean: the authors' logits distillation."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ; "
            "the teacher must predict the same classes"
        )
    return F.kl_div(
        F.log_softmax(student.float(), dim=-1),
        F.log_softmax(teacher.float(), dim=-1),
        reduction="batchmean",
        log_target=True,
    )


def _distill_weight_needs_teacher(weight: float, teacher_logits) -> None:
    if weight > 0 and teacher_logits is None:
        raise ValueError(
            "distill_weight > 0 needs the teacher's outputs: pass teacher_logits (and, for DynamicViT, "
            "teacher_tokens) from tokensparse.losses.teacher_outputs(teacher, images), "
            "or set distill_weight=0"
        )


class Objective(nn.Module):
    """A training objective: `forward(logits, labels, student, *teacher_targets)` gives (loss, parts);
    `step` runs the student on a batch, then the teacher (when there is one), then the loss."""

    teacher_parts = 1  # how many targets `teacher_targets` gives (None each without a teacher)

    def teacher_targets(self, teacher: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What the loss takes from the frozen `teacher` on a batch of `images`: by default its logits."""
        return (teacher_outputs(teacher, images)[0],)

    def step(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, teacher: nn.Module | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, parts) of one training step: `model` (the student) on `images`, then `teacher` (the
        frozen dense model, or None for no distillation) on them, then the loss against `labels`."""
        logits = model(images)  # the student first: its random draws come before the teacher's forward
        targets = (
            self.teacher_targets(teacher, images) if teacher is not None else (None,) * self.teacher_parts
        )
        return self(logits, labels, model, *targets)


class ClassificationLoss(Objective):
    """Cross-entropy, plus distill_weight x KL to the teacher's logits when there is a teacher (as
    DynamicViT distils them): the training objective of the dense model and of the baselines.

    `distill_weight` defaults to 0.0 (no distillation); `label_smoothing` to 0.0 (see
    `classification_loss`)."""

    def __init__(self, distill_weight: float = 0.0, label_smoothing: float = 0.0):
        super().__init__()
        self.distill_weight = _check_weight("distill_weight", distill_weight)
        self.label_smoothing = float(label_smoothing)

    @classmethod
    def from_config(cls, cfg: TrainConfig, depth: int = 12) -> ClassificationLoss:
        """The loss of a `TrainConfig` `cfg`: its distill_weight (None: 0) and smoothing (`depth` unused)."""
        return cls(distill_weight=cfg.distill_weight or 0.0, label_smoothing=cfg.smoothing)

    def forward(
        self,
        logits: Logits,
        labels: torch.Tensor,
        student: nn.Module | None = None,
        teacher_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and {'cls', 'distill' (with a teacher), 'total'} as floats (`student` is not read).

        `logits` are the student's (a `(cls, dist)` tuple is averaged), `labels` as in
        `classification_loss`, `teacher_logits` the teacher's (None: no distillation term)."""
        merged = logits if not isinstance(logits, tuple) else sum(logits) / 2
        loss = classification_loss(merged, labels, label_smoothing=self.label_smoothing)
        parts = {"cls": loss.item()}
        if teacher_logits is not None:
            distill = logits_kl(merged, teacher_logits)
            loss = loss + self.distill_weight * distill
            parts["distill"] = distill.item()
        return loss, parts | {"total": loss.item()}


def _as_floats(names: Sequence[str], parts: torch.Tensor, total: torch.Tensor) -> dict[str, float]:
    values = torch.cat([parts.detach().float(), total.detach().float().reshape(1)]).tolist()  # one sync
    return dict(zip((*names, "total"), values, strict=True))


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, K), final-norm patch tokens (B, N, C)) of the frozen dense `teacher` on `images`
    (B, 3, H, W), without gradient.

    Runs `forward_features` then `forward_head` in eval mode (restoring the teacher's mode after), so
    dropout and drop-path are off. A distilled DeiT's two heads are averaged. The teacher must be a
    dense timm ViT: a tokensparse-modified model would return pruned tokens.
    """
    inner = getattr(teacher, "module", teacher)  # DDP / DataParallel
    if get_policy(inner) is not None:
        raise ValueError(
            f"the teacher is a tokensparse model ({get_policy(inner).method}); use the dense model "
            "(e.g. a copy of the backbone taken before tokensparse.dynamicvit) as the teacher"
        )
    for name in ("forward_features", "forward_head", "num_prefix_tokens"):
        if not hasattr(inner, name):
            raise ValueError(
                f"the teacher must be a timm VisionTransformer; {type(inner).__name__} lacks {name}"
            )
    was_training = inner.training
    inner.eval()
    try:
        features = inner.forward_features(images)
        logits = merge_heads(inner.forward_head(features))
    finally:
        inner.train(was_training)
    return logits, features[:, inner.num_prefix_tokens :]


def _resolve_info(student_info: SparseInfo | nn.Module) -> SparseInfo:
    return student_info if isinstance(student_info, SparseInfo) else sparsity_info(student_info)
