from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import golden, tiny

import tokensparse
from tokensparse.engine import SparseInfo
from tokensparse.losses import (
    AViTLoss,
    DynamicViTLoss,
    avit_loss,
    avit_prior,
    dynamicvit_loss,
    halting_distribution,
    teacher_outputs,
)

TARGETS = [0.7, 0.49, 0.343]


@pytest.fixture(scope="module")
def units():
    return {k[len("loss.") :]: v for k, v in golden("dynamicvit_units").items() if k.startswith("loss.")}


def decisions(units):
    return [units[f"keep_decision.stage{s}"] for s in range(3)]


def info_from(units, **kw) -> SparseInfo:
    batch, tokens = units["mask"].shape[:2]
    fields = dict(
        keep_decisions=decisions(units),
        keep_mask=units["mask"].squeeze(-1),
        kept_index=[],
        patch_tokens=units["token_pred"],
        patch_index=torch.arange(tokens).expand(batch, tokens),
        tokens_per_block=torch.zeros(batch, 12),
        num_prefix=1,
        extra={},
    )
    fields.update(kw)
    return SparseInfo(**fields)


@pytest.mark.parametrize("mode", ["kl", "mse"])
def test_dynamicvit_loss_equals_authors(units, mode):
    total, parts = dynamicvit_loss(
        units["pred"],
        units["labels"],
        decisions(units),
        units["mask"],
        units["token_pred"],
        units["teacher_logits"],
        units["teacher_tokens"],
        TARGETS,
        token_distill=mode,
    )
    torch.testing.assert_close(parts, units[f"parts.token_{mode}"], atol=1e-6, rtol=0)
    torch.testing.assert_close(total.reshape(1), units[f"total.token_{mode}"], atol=1e-6, rtol=0)

    module_total, logged = DynamicViTLoss(0.7, token_distill=mode)(
        units["pred"], units["labels"], info_from(units), units["teacher_logits"], units["teacher_tokens"]
    )
    torch.testing.assert_close(module_total.reshape(1), units[f"total.token_{mode}"], atol=1e-6, rtol=0)
    assert list(logged) == ["cls", "ratio", "distill", "token", "total"]
    assert all(isinstance(v, float) for v in logged.values())
    assert logged["token"] == pytest.approx(units[f"parts.token_{mode}"][3].item(), abs=1e-6)


def test_default_targets_are_powers_of_keep_ratio():
    assert DynamicViTLoss(0.5).stage_targets(3) == [0.5, 0.25, 0.125]
    assert DynamicViTLoss(targets=[0.9, 0.8]).stage_targets(2) == [0.9, 0.8]
    with pytest.raises(ValueError, match="2 keep targets"):
        DynamicViTLoss(targets=[0.9, 0.8]).stage_targets(3)


def test_soft_labels_use_soft_target_cross_entropy(units):
    logits, labels = units["pred"], units["labels"]
    one_hot = F.one_hot(labels, logits.shape[1]).float()
    args = (
        decisions(units),
        units["mask"],
        units["token_pred"],
        units["teacher_logits"],
        units["teacher_tokens"],
    )
    hard, _ = dynamicvit_loss(logits, labels, *args, TARGETS)
    soft, _ = dynamicvit_loss(logits, one_hot, *args, TARGETS)
    torch.testing.assert_close(soft, hard, atol=1e-6, rtol=0)
    mixed = 0.6 * one_hot + 0.4 * one_hot.roll(1, dims=0)
    _, parts = dynamicvit_loss(logits, mixed, *args, TARGETS)
    expected = (-mixed * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(parts[0], expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="labels must be"):
        dynamicvit_loss(logits, labels.float(), *args, TARGETS)


def test_distilled_heads_are_averaged(units):
    args = (
        units["labels"],
        decisions(units),
        units["mask"],
        units["token_pred"],
        units["teacher_logits"],
        units["teacher_tokens"],
        TARGETS,
    )
    pred = units["pred"]
    single, _ = dynamicvit_loss(pred, *args)
    pair, _ = dynamicvit_loss((pred + 1.0, pred - 1.0), *args)
    torch.testing.assert_close(pair, single, atol=1e-6, rtol=0)


def test_no_kept_token_gives_zero_token_term(units):
    for mode in ("kl", "mse"):
        total, parts = dynamicvit_loss(
            units["pred"],
            units["labels"],
            decisions(units),
            torch.zeros_like(units["mask"]),
            units["token_pred"],
            units["teacher_logits"],
            units["teacher_tokens"],
            TARGETS,
            token_distill=mode,
        )
        assert parts[3].item() == 0.0
        expected = units[f"total.token_{mode}"] - 0.5 * units[f"parts.token_{mode}"][3]
        torch.testing.assert_close(total.reshape(1), expected, atol=1e-6, rtol=0)


def test_ratio_term_sends_gradient_to_keep_decisions(units):
    keep = [d.clone().requires_grad_(True) for d in decisions(units)]
    total, parts = dynamicvit_loss(
        units["pred"],
        units["labels"],
        keep,
        units["mask"],
        units["token_pred"],
        units["teacher_logits"],
        units["teacher_tokens"],
        TARGETS,
    )
    total.backward()
    for decision, target in zip(keep, TARGETS, strict=True):
        # d/dkeep_bn of 2.0 / 3 * mean_b (mean_n keep - t)^2 = 2.0 / 3 * 2 (mean_n keep_b - t) / (B N)
        batch, tokens = decision.shape
        expected = 2.0 / 3 * 2 * (decision.detach().mean(1, keepdim=True) - target) / (batch * tokens)
        torch.testing.assert_close(decision.grad, expected.expand_as(decision), atol=1e-7, rtol=1e-5)
    assert any(d.grad.abs().sum() > 0 for d in keep)


def test_without_teacher_needs_zero_distill_weight(units):
    info = info_from(units)
    with pytest.raises(ValueError, match="teacher"):
        DynamicViTLoss()(units["pred"], units["labels"], info)
    total, logged = DynamicViTLoss(distill_weight=0.0)(units["pred"], units["labels"], info)
    expected = units["parts.token_kl"][0] + 2.0 * units["parts.token_kl"][1] / 3
    assert total.item() == pytest.approx(expected.item(), abs=1e-6)
    assert logged["distill"] == logged["token"] == 0.0


def test_gather_regime_tokens_are_matched_to_teacher_patches(units):
    """In eval (gather) the student has the kept tokens only; the teacher's are gathered by patch index."""
    mask = units["mask"].squeeze(-1)
    index = torch.stack([row.nonzero().squeeze(1)[:3] for row in mask])  # 3 kept patches per image
    student = units["token_pred"].gather(1, index.unsqueeze(-1).expand(-1, -1, 8))
    info = info_from(units, patch_tokens=student, patch_index=index)
    _, logged = DynamicViTLoss(token_distill="mse")(
        units["pred"], units["labels"], info, units["teacher_logits"], units["teacher_tokens"]
    )
    teacher = units["teacher_tokens"].gather(1, index.unsqueeze(-1).expand(-1, -1, 8))
    assert logged["token"] == pytest.approx((student - teacher).pow(2).mean().item(), abs=1e-6)


def test_dynamicvit_end_to_end_with_teacher():
    torch.manual_seed(0)
    teacher = tiny().eval()
    student = tokensparse.dynamicvit(copy.deepcopy(teacher), keep_ratio=0.7, locations=(1, 3, 4)).train()
    images = torch.randn(2, 3, 64, 64)
    t_logits, t_tokens = teacher_outputs(teacher, images)
    assert t_tokens.shape == (2, 64, 48) and not t_tokens.requires_grad
    logits = student(images)
    loss, logged = DynamicViTLoss()(
        logits, torch.tensor([1, 2]), tokensparse.sparsity_info(student), t_logits, t_tokens
    )
    loss.backward()
    assert math.isfinite(logged["total"])
    assert student.score_predictor[0].out_conv[4].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="dense model"):
        teacher_outputs(student, images)


def test_teacher_outputs_distilled_deit_restores_mode():
    teacher = tiny("deit_tiny_distilled_patch16_224")
    teacher.set_distilled_training(True)
    teacher.train()
    images = torch.randn(2, 3, 64, 64)
    logits, tokens = teacher_outputs(teacher, images)
    assert teacher.training
    teacher.eval()
    with torch.no_grad():
        features = teacher.forward_features(images)
        torch.testing.assert_close(logits, teacher.forward_head(features))
        torch.testing.assert_close(tokens, features[:, 2:])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ratio_weight=-1.0), "ratio_weight"),
        (dict(clf_weight=float("nan")), "clf_weight"),
        (dict(distill_weight=-0.5), "distill_weight"),
        (dict(token_distill="l1"), "token_distill"),
        (dict(keep_ratio=0.0), "keep_ratio"),
        (dict(targets=[1.5]), "targets"),
    ],
)
def test_dynamicvit_loss_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicViTLoss(**kwargs)


def test_pure_dynamicvit_loss_rejects_mismatches(units):
    args = [
        units["pred"],
        units["labels"],
        decisions(units),
        units["mask"],
        units["token_pred"],
        units["teacher_logits"],
        units["teacher_tokens"],
    ]
    with pytest.raises(ValueError, match="token_distill"):
        dynamicvit_loss(*args, TARGETS, token_distill="cos")
    with pytest.raises(ValueError, match="2 keep targets"):
        dynamicvit_loss(*args, TARGETS[:2])
    bad = list(args)
    bad[6] = units["teacher_tokens"][..., :4]
    with pytest.raises(ValueError, match="teacher patch tokens"):
        dynamicvit_loss(*bad, TARGETS)


# ------------------------------------------------------------------------------------------------ A-ViT


def test_prior_equals_authors():
    prior = avit_prior(12, 8)
    expected = golden("avit_official")["prior_target"]
    torch.testing.assert_close(prior, expected, atol=1e-6, rtol=0)
    assert prior[:8].sum().item() == pytest.approx(0.98, abs=1e-6)
    torch.testing.assert_close(AViTLoss().prior(12), expected, atol=1e-6, rtol=0)


def test_avit_loss_on_hand_made_tensors():
    torch.manual_seed(1)
    batch, tokens, depth, classes = 3, 5, 12, 4
    logits = torch.randn(batch, classes)
    labels = torch.tensor([0, 3, 1])
    ponder = torch.rand(batch, tokens) * 11 + 1
    halting = torch.rand(depth) * 0.5
    halting[0] = 1e-4  # clamps up to 0.01 after normalising
    teacher = torch.randn(batch, classes)

    # independent arithmetic, no torch losses
    log_p = logits - logits.exp().sum(1, keepdim=True).log()
    ce = -log_p[torch.arange(batch), labels].mean()
    q = (halting / halting.sum()).clamp(0.01, 0.99)
    prior = [math.exp(-0.5 * (d - 8) ** 2) / math.sqrt(2 * math.pi) for d in range(depth)]
    prior = torch.tensor([p / sum(prior[:8]) * 0.98 for p in prior], dtype=torch.float64)
    kl_prior = (prior * (prior.log() - q.double().log())).sum() / depth  # KLDivLoss 'batchmean' on 1-D
    log_t = teacher - teacher.exp().sum(1, keepdim=True).log()
    kl_logits = (log_t.exp() * (log_t - log_p)).sum() / batch
    expected = ce + 5e-4 * ponder.mean() + 1e-3 * kl_prior.float() + 0.3 * kl_logits

    info = SparseInfo(
        [],
        torch.ones(batch, tokens - 1),
        [],
        torch.zeros(batch, tokens - 1, 2),
        torch.zeros(batch, tokens - 1, dtype=torch.long),
        torch.zeros(batch, depth),
        1,
        {"ponder": ponder, "halting_score_layer": halting},
    )
    total, logged = AViTLoss(distill_weight=0.3)(logits, labels, info, teacher)
    assert total.item() == pytest.approx(expected.item(), abs=1e-6)
    assert logged["ponder"] == pytest.approx(ponder.mean().item(), rel=1e-6)
    assert logged["prior"] == pytest.approx(kl_prior.item(), abs=1e-6)
    assert logged["distill"] == pytest.approx(kl_logits.item(), abs=1e-6)

    q_module = halting_distribution(halting)
    assert q_module[0].item() == pytest.approx(0.01)

    soft = F.one_hot(labels, classes).float()
    soft_total, _ = avit_loss(logits, soft, ponder, halting, avit_prior(depth), teacher, distill_weight=0.3)
    assert soft_total.item() == pytest.approx(expected.item(), abs=1e-6)


def test_avit_loss_gradients_reach_ponder_and_halting():
    ponder = (torch.rand(2, 6) * 5).requires_grad_(True)
    halting = (torch.rand(12) * 0.3 + 0.05).requires_grad_(True)
    logits = torch.randn(2, 3, requires_grad=True)
    total, _ = avit_loss(logits, torch.tensor([0, 1]), ponder, halting, avit_prior(12))
    total.backward()
    torch.testing.assert_close(ponder.grad, torch.full_like(ponder, 5e-4 / 12))
    assert halting.grad.abs().sum() > 0 and logits.grad.abs().sum() > 0


def test_avit_loss_errors():
    with pytest.raises(ValueError, match="ponder_weight"):
        AViTLoss(ponder_weight=-1e-3)
    with pytest.raises(ValueError, match="prior_weight"):
        AViTLoss(prior_weight=float("inf"))
    with pytest.raises(ValueError, match="target_depth"):
        AViTLoss(target_depth=0)
    with pytest.raises(ValueError, match="target_depth"):
        AViTLoss(target_depth=13).prior(12)
    info = SparseInfo(
        [],
        torch.ones(1, 4),
        [],
        torch.zeros(1, 4, 2),
        torch.zeros(1, 4, dtype=torch.long),
        torch.zeros(1, 12),
        1,
        {},
    )
    with pytest.raises(ValueError, match="halting_score_layer"):
        AViTLoss()(torch.randn(1, 3), torch.tensor([0]), info)
    info.extra.update(ponder=torch.ones(1, 5), halting_score_layer=torch.full((12,), 0.1))
    with pytest.raises(ValueError, match="teacher"):
        AViTLoss(distill_weight=1.0)(torch.randn(1, 3), torch.tensor([0]), info)
