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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_int, check_number
from .engine import SparseInfo, get_policy, sparsity_info

if TYPE_CHECKING:
    from .config import TrainConfig

TokenDistill = Literal["kl", "mse"]
TOKEN_DISTILL_MODES = ("kl", "mse")
DYNAMICVIT_PARTS = ("cls", "ratio", "distill", "token")
AVIT_PARTS = ("cls", "ponder", "prior", "distill")

Logits = torch.Tensor | tuple[torch.Tensor, ...]


# --------------------------------------------------------------------------------------------------
# shared pieces


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
    """Cross-entropy for hard labels (B,) or soft targets (B, classes), e.g. from timm's Mixup/CutMix.

    Soft targets give mean_b(-sum_c y_bc log softmax(x)_bc), timm's SoftTargetCrossEntropy.
    """
    logits = logits.float()
    if labels.ndim == logits.ndim and labels.shape == logits.shape and labels.is_floating_point():
        return F.cross_entropy(logits, labels.float(), label_smoothing=label_smoothing)
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
        """What the loss takes from the frozen teacher: by default its logits."""
        return (teacher_outputs(teacher, images)[0],)

    def step(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, teacher: nn.Module | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(images)  # the student first: its random draws come before the teacher's forward
        targets = (
            self.teacher_targets(teacher, images) if teacher is not None else (None,) * self.teacher_parts
        )
        return self(logits, labels, model, *targets)


class ClassificationLoss(Objective):
    """Cross-entropy, plus distill_weight x KL to the teacher's logits when there is a teacher (as
    DynamicViT distils them): the training objective of the dense model and of the baselines."""

    def __init__(self, distill_weight: float = 0.0, label_smoothing: float = 0.0):
        super().__init__()
        self.distill_weight = _check_weight("distill_weight", distill_weight)
        self.label_smoothing = float(label_smoothing)

    @classmethod
    def from_config(cls, cfg: TrainConfig, depth: int = 12) -> ClassificationLoss:
        return cls(distill_weight=cfg.distill_weight or 0.0, label_smoothing=cfg.smoothing)

    def forward(
        self,
        logits: Logits,
        labels: torch.Tensor,
        student: nn.Module | None = None,
        teacher_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and {'cls', 'distill' (with a teacher), 'total'} as floats (`student` is not read)."""
        merged = logits if not isinstance(logits, tuple) else sum(logits) / 2
        loss = classification_loss(merged, labels, label_smoothing=self.label_smoothing)
        parts = {"cls": loss.item()}
        if teacher_logits is not None:
            distill = logits_kl(merged, teacher_logits)
            loss = loss + self.distill_weight * distill
            parts["distill"] = distill.item()
        return loss, parts | {"total": loss.item()}


# --------------------------------------------------------------------------------------------------
# DynamicViT


def keep_targets(keep_ratio: float, stages: int) -> list[float]:
    """Per-stage keep targets rho, rho^2, rho^3, ... (the fraction of all patches each stage keeps)."""
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
    With distill_weight = 0 the teacher's outputs may be None (their parts are then 0).
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


def _resolve_info(student_info: SparseInfo | nn.Module) -> SparseInfo:
    return student_info if isinstance(student_info, SparseInfo) else sparsity_info(student_info)


class DynamicViTLoss(Objective):
    """The DynamicViT training loss (Rao et al., 2021) with the authors' default weights.

    keep_ratio gives the per-stage targets rho^(s+1) for as many stages as the model has; `targets`
    sets them explicitly instead. token_distill: 'mse' (the default: the authors' current main.py
    builds every DeiT criterion with mse_token=True; they use ratio_weight=5.0 for DeiT-B) or 'kl'
    (KL over channels, their LV-ViT setting).

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
        return cls(
            cfg.keep_ratio,
            ratio_weight=cfg.ratio_weight,
            distill_weight=cfg.distill_weight,
            token_distill=cfg.token_distill,
            label_smoothing=cfg.smoothing,
        )

    teacher_parts = 2

    def teacher_targets(self, teacher: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return teacher_outputs(teacher, images)  # logits and final-norm patch tokens

    def stage_targets(self, stages: int) -> list[float]:
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


def _as_floats(names: Sequence[str], parts: torch.Tensor, total: torch.Tensor) -> dict[str, float]:
    values = torch.cat([parts.detach().float(), total.detach().float().reshape(1)]).tolist()  # one sync
    return dict(zip((*names, "total"), values, strict=True))


# --------------------------------------------------------------------------------------------------
# A-ViT


def avit_prior(depth: int = 12, target_depth: int = 8, std: float = 1.0, mass: float = 0.98) -> torch.Tensor:
    """The A-ViT distributional prior over blocks, as the authors' code builds it.

    Gaussian pdf N(target_depth, std) at depths 0..depth-1, scaled so that the first `target_depth`
    entries sum to `mass` (0.98). It is not normalised to 1 (for depth 12, target 8 the entries sum
    to about 2.29); the authors regularise towards exactly this vector. Computed in float64, returned
    as float32.
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
    """Per-block mean halting scores (depth,) divided by their sum, clamped to [0.01, 0.99]."""
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
    (depth,): `avit_prior(depth, target_depth)`.

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
        """Total loss and {'cls', 'ponder', 'prior', 'distill', 'total'} as floats (unweighted parts)."""
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


# --------------------------------------------------------------------------------------------------
# teacher


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, K), final-norm patch tokens (B, N, C)) of the frozen dense teacher, without gradient.

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


# --------------------------------------------------------------------------------------------------
# Dynamic ConvNeXt / Swin (the DynamicViT journal version)


class DynamicSpatialLoss(Objective):
    """The authors' `ConvNextDistillDiffPruningLoss` (losses.py), used for dynamic ConvNeXt and Swin.

    clf * CE + ratio * sum_s mean_b (mean_n keep_s - target_s)^2 / stages + distill * KL(teacher ||
    student logits) + distill * MSE(student, teacher final-norm features over every position and
    channel). Targets are (rho, rho - 0.2, rho - 0.4); their main.py uses ratio weight 10 (not
    DynamicViT's 2), clf 1 and distill 0.5. Unlike DynamicViT, the feature distillation covers all
    positions (none is dropped), and the parts are reported as the authors log them (ratio undivided).

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
        from .policies.dynspatial import stage_keep_ratios

        self.targets = stage_keep_ratios(keep_ratio)
        self.clf_weight = _check_weight("clf_weight", clf_weight)
        self.ratio_weight = _check_weight("ratio_weight", ratio_weight)
        self.distill_weight = _check_weight("distill_weight", distill_weight)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)

    @classmethod
    def from_config(cls, cfg: TrainConfig, depth: int = 12) -> DynamicSpatialLoss:
        return cls(
            cfg.keep_ratio,
            ratio_weight=cfg.ratio_weight,
            distill_weight=cfg.distill_weight,
            label_smoothing=cfg.smoothing,
        )

    teacher_parts = 2

    def teacher_targets(self, teacher: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
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

        student_info: `tokensparse.dynamic_spatial_info(model)` of the training forward that gave
        `logits` (or the model); teacher_features (B, M, C) from `spatial_teacher_outputs`.
        """
        from .policies.dynspatial import SpatialInfo, dynamic_spatial_info

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
    """(logits (B, K), final-norm features per position (B, M, C)) of a frozen dense timm ConvNeXt or
    SwinTransformer, in eval mode (restored after): the authors' ConvNeXt_Teacher / SwinTransformer_Teacher."""
    from timm.models.convnext import ConvNeXt
    from timm.models.swin_transformer import SwinTransformer

    from .policies.dynconvnext import DynamicConvNeXt, convnext_feature_map
    from .policies.dynswin import DynamicSwinTransformer, swin_feature_map

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
