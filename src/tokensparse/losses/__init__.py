"""Training objectives of DynamicViT and A-ViT, as their authors' released code computes them.

Two layers each:

- pure functions on tensors (`dynamicvit_loss`, `avit_loss`) returning the total and a vector of the
  unweighted parts, in the order of `DYNAMICVIT_PARTS` / `AVIT_PARTS`;
- modules (`DynamicViTLoss`, `AViTLoss`) that read what they need from `tokensparse.sparsity_info(model)`
  and return the total plus a dict of the parts as Python floats for logging.

The teacher is the frozen dense model; `teacher_outputs(teacher, images)` runs it once per step and
returns what both losses take. Every term is computed in float32, whatever the autocast dtype.

Each module is also a method's training objective (the registry's `Method.objective` builds it with
`from_config`): `step(model, images, labels, teacher)` runs the student, then the teacher, and returns
the loss and its parts. `ClassificationLoss` is the objective of the dense model and of the baselines.

Logits may be a `(cls, dist)` tuple (a distilled DeiT in distilled-training mode): the two heads are
averaged, which is what timm's model returns at inference, so both heads learn the same objective.

One module per objective (`dynamicvit`, `avit`, `spatial`) and `common` for what they share; every
name is importable from here.
"""

from __future__ import annotations

from .avit import AViTLoss, avit_loss, avit_prior, halting_distribution
from .common import (
    AVIT_PARTS,
    DYNAMICVIT_PARTS,
    TOKEN_DISTILL_MODES,
    ClassificationLoss,
    Logits,
    Objective,
    TokenDistill,
    classification_loss,
    logits_kl,
    merge_heads,
    teacher_outputs,
)
from .dynamicvit import DynamicViTLoss, dynamicvit_loss, keep_targets
from .spatial import DynamicSpatialLoss, spatial_teacher_outputs

__all__ = [
    "AVIT_PARTS",
    "AViTLoss",
    "ClassificationLoss",
    "DYNAMICVIT_PARTS",
    "DynamicSpatialLoss",
    "DynamicViTLoss",
    "Logits",
    "Objective",
    "TOKEN_DISTILL_MODES",
    "TokenDistill",
    "avit_loss",
    "avit_prior",
    "classification_loss",
    "dynamicvit_loss",
    "halting_distribution",
    "keep_targets",
    "logits_kl",
    "merge_heads",
    "spatial_teacher_outputs",
    "teacher_outputs",
]
