from __future__ import annotations

import copy
import re

import pytest
import timm
import torch
from conftest import backbone_state, golden, golden_vit, tiny

import tokensparse
from tokensparse.attention import softmax_with_keep
from tokensparse.engine import run
from tokensparse.policies.dynamicvit import ScorePredictor


@pytest.fixture(scope="module")
def official():
    return golden("dynamicvit_official")


def golden_dynamicvit(official, keep_ratio: float) -> torch.nn.Module:
    model = tokensparse.dynamicvit(golden_vit(), keep_ratio=keep_ratio)
    model.load_state_dict(backbone_state(official))  # the authors' key layout, strict
    return model.eval()


@pytest.mark.parametrize("keep_ratio", [0.7, 0.5])
def test_eval_matches_authors_logits_and_kept_patches(official, keep_ratio):
    model = golden_dynamicvit(official, keep_ratio)
    with torch.no_grad():
        logits = model(official["input"])
    torch.testing.assert_close(logits, official[f"eval_logits.rho{keep_ratio}"], atol=1e-4, rtol=0)
    info = tokensparse.sparsity_info(model)
    for stage in range(3):
        assert torch.equal(info.kept_index[stage], official[f"eval_kept.rho{keep_ratio}.stage{stage}"])
    counts = [int(196 * keep_ratio ** (s + 1)) for s in range(3)]
    assert info.tokens_per_block[0].tolist() == [197] * 3 + [1 + c for c in counts for _ in range(3)]


def test_mask_regime_equals_gather_regime(official):
    """Training's masked form with the inference decisions gives inference's logits."""
    model = golden_dynamicvit(official, 0.7)
    with torch.no_grad():
        gathered = model.forward_head(run(model, official["input"], regime="gather"))
        masked = model.forward_head(run(model, official["input"], regime="mask"))
    torch.testing.assert_close(masked, gathered, atol=1e-5, rtol=0)
    assert torch.equal(
        tokensparse.sparsity_info(model).keep_mask.nonzero(),
        torch.zeros(4, 196).scatter_(1, official["eval_kept.rho0.7.stage2"], 1.0).nonzero(),
    )


def test_batch_of_one_equals_batched(official):
    model = golden_dynamicvit(official, 0.7)
    with torch.no_grad():
        batched = model(official["input"])
        single = model(official["input"][2:3])
    torch.testing.assert_close(single, batched[2:3], atol=1e-5, rtol=0)


def test_softmax_with_keep_matches_authors():
    units = golden("dynamicvit_units")
    out = softmax_with_keep(units["policy_softmax.attn_logits"], units["policy_softmax.policy"])
    torch.testing.assert_close(out, units["policy_softmax.out"], atol=1e-6, rtol=0)


def test_predictor_matches_authors():
    units = golden("dynamicvit_units")
    predictor = ScorePredictor(48)
    weights = backbone_state(units, "predictor.")
    predictor.load_state_dict({k: v for k, v in weights.items() if k.startswith(("in_conv", "out_conv"))})
    out = predictor(units["predictor.x"], units["predictor.policy"])
    torch.testing.assert_close(out, units["predictor.out_log_probs"], atol=1e-6, rtol=0)


def test_inference_score_ranks_as_the_keep_log_probability():
    torch.manual_seed(0)
    predictor = ScorePredictor(48)
    for p in predictor.parameters():
        torch.nn.init.normal_(p, std=0.3)
    tokens = torch.randn(3, 50, 48)
    log_probs = predictor(tokens)[..., 0]
    assert torch.equal(predictor.keep_score(tokens).argsort(dim=1), log_probs.argsort(dim=1))


MODELS = {
    "deit": dict(name="deit_tiny_patch16_224"),
    "deit_distilled": dict(name="deit_tiny_distilled_patch16_224"),
    "deit3": dict(name="deit3_small_patch16_224"),
    "registers_avgpool": dict(name="vit_medium_patch16_reg4_gap_256"),
    "vit_384_patch12": dict(name="vit_base_patch16_384", img_size=96, patch_size=12),
    "avgpool": dict(name="vit_small_patch16_224", global_pool="avg", class_token=False, fc_norm=True),
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_keep_ratio_one_is_the_dense_model(kind):
    kw = dict(MODELS[kind])
    dense = tiny(kw.pop("name"), **kw).eval()
    images = torch.randn(2, 3, *dense.patch_embed.img_size)
    with torch.no_grad():
        expected = dense(images)
        sparse = tokensparse.dynamicvit(copy.deepcopy(dense), keep_ratio=1.0, locations=(1, 3)).eval()
        torch.testing.assert_close(sparse(images), expected, atol=1e-5, rtol=0)
        sparse.train()  # mask regime: every token computed, binary Gumbel decisions, nested by stage
        logits = sparse(images)
        assert isinstance(logits, torch.Tensor) and logits.shape == expected.shape
        info = tokensparse.sparsity_info(sparse)
        patches = dense.patch_embed.num_patches
        assert info.patch_tokens.shape[:2] == (2, patches)
        assert [tuple(d.shape) for d in info.keep_decisions] == [(2, patches), (2, patches)]
        assert set(torch.cat(info.keep_decisions).unique().tolist()) <= {0.0, 1.0}
        assert (info.keep_decisions[1] <= info.keep_decisions[0]).all()


@pytest.mark.parametrize("kind", list(MODELS))
def test_pruned_models_run_and_keep_prefix_tokens(kind):
    kw = dict(MODELS[kind])
    model = tokensparse.dynamicvit(tiny(kw.pop("name"), **kw), keep_ratio=0.5, locations=(1, 3)).eval()
    images = torch.randn(3, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()
    info = tokensparse.sparsity_info(model)
    patches = model.patch_embed.num_patches
    counts = [int(patches * 0.5), int(patches * 0.25)]
    assert [k.shape[1] for k in info.kept_index] == counts
    assert info.tokens_per_block[0, -1].item() == model.num_prefix_tokens + counts[-1]
    assert info.patch_tokens.shape == (3, counts[-1], model.embed_dim)


def test_training_masks_keeps_all_tokens_and_trains_predictors(official):
    model = golden_dynamicvit(official, 0.7).train()
    torch.manual_seed(0)
    logits = model(official["input"])
    info = tokensparse.sparsity_info(model)
    assert info.patch_tokens.shape == (4, 196, 48)
    decisions = info.keep_decisions
    assert len(decisions) == 3 and set(torch.cat(decisions).unique().tolist()) <= {0.0, 1.0}
    for earlier, later in zip(decisions, decisions[1:]):
        assert (later <= earlier).all(), "a dropped token came back"
    assert torch.equal(info.keep_mask, decisions[-1].detach())
    (logits.sum() + sum(d.mean() for d in decisions)).backward()
    for stage in range(3):
        grad = model.score_predictor[stage].in_conv[1].weight.grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reached predictor {stage}"


def test_training_attention_mask_isolates_dropped_tokens(official):
    """With masking, changing a token dropped before block 0 cannot change the kept tokens' outputs."""
    model = tokensparse.dynamicvit(golden_vit(), keep_ratio=0.5, locations=(0, 6, 9))
    model.load_state_dict(backbone_state(official))
    model.eval()
    images = official["input"][:1]
    with torch.no_grad():
        run(model, images, regime="mask")
        keep = tokensparse.sparsity_info(model).keep_decisions[0][0]
        base = tokensparse.sparsity_info(model).patch_tokens.clone()
    dropped = int((keep == 0).nonzero()[0])
    row, col = divmod(dropped, 14)
    perturbed = images.clone()
    perturbed[..., row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] += 5.0
    # The first predictor sees the perturbed token itself: hold its scores at the unperturbed ones, so
    # the decisions can only differ if a dropped token leaks into the kept ones (which must not happen).
    first = model.score_predictor[0]
    scores: list[torch.Tensor] = []
    original = first.forward
    first.forward = lambda *a, **k: scores[0] if scores else scores.append(original(*a, **k)) or scores[0]
    with torch.no_grad():
        run(model, images, regime="mask")  # records the unperturbed scores
        run(model, perturbed, regime="mask")
        info = tokensparse.sparsity_info(model)
    del first.forward
    assert torch.equal(info.keep_decisions[0][0], keep)
    kept = info.keep_mask[0].bool()
    torch.testing.assert_close(info.patch_tokens[0][kept], base[0][kept], atol=1e-5, rtol=0)


def test_state_dict_keys_are_timm_plus_predictors():
    dense = tiny()
    keys = set(dense.state_dict())
    sparse = tokensparse.dynamicvit(dense, keep_ratio=0.7, locations=(1, 3))
    new = set(sparse.state_dict()) - keys
    assert keys <= set(sparse.state_dict())
    assert new and all(k.startswith(("score_predictor.0.", "score_predictor.1.")) for k in new)
    assert "score_predictor.1.out_conv.4.weight" in new


def test_model_can_be_deep_copied_after_a_training_forward():
    model = tokensparse.dynamicvit(tiny(), locations=(1, 3)).train()
    model(torch.randn(2, 3, 64, 64)).sum()
    clone = copy.deepcopy(model)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(clone.eval()(images), model.eval()(images), atol=0, rtol=0)
    assert tokensparse.sparsity_info(clone).kept_index[0].shape == (
        2,
        int(clone.patch_embed.num_patches * 0.7),
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(keep_ratio=0.0), "keep_ratio must be in (0, 1], got 0.0"),
        (dict(keep_ratio=1.5), "keep_ratio must be in (0, 1], got 1.5"),
        (dict(keep_ratio="0.7"), "keep_ratio must be in (0, 1], got '0.7'"),
        (dict(locations=(3, 3)), "strictly increasing, got (3, 3)"),
        (dict(locations=(2, 9)), "must lie inside the model's depth: 0..5 for 6 blocks"),
        (dict(locations=()), "at least one block"),
        (dict(keep_ratio=0.01, locations=(1, 2, 3)), "keeps no patch token of 64"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError) as err:
        tokensparse.dynamicvit(tiny(), **kwargs)
    assert message in str(err.value)


def test_non_vit_and_unsupported_models_are_refused():
    with pytest.raises(ValueError, match="does not run on a ResNet; it supports timm VisionTransformer"):
        tokensparse.dynamicvit(timm.create_model("resnet10t"))
    model = tiny()
    model.blocks[2].attn = torch.nn.Identity()
    with pytest.raises(ValueError, match="block 2 uses attention class Identity"):
        tokensparse.dynamicvit(model)
    with pytest.raises(ValueError, match="global_pool='max' is not supported"):
        tokensparse.dynamicvit(tiny("vit_small_patch16_224", global_pool="max"))
    sparse = tokensparse.dynamicvit(tiny())
    with pytest.raises(ValueError, match="already sparsified with dynamicvit"):
        tokensparse.dynamicvit(sparse)


def test_bad_images_are_named():
    model = tokensparse.dynamicvit(tiny(), locations=(1, 3)).eval()
    with pytest.raises(ValueError, match="image size 224x224 does not match the model's 64x64"):
        model(torch.randn(1, 3, 224, 224))
    with pytest.raises(ValueError, match="expected 3 image channels, got 1"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 64, 64))


def test_sparsity_info_before_any_forward():
    with pytest.raises(RuntimeError, match="no forward has run"):
        tokensparse.sparsity_info(tokensparse.dynamicvit(tiny()))


def test_a_timm_that_renamed_what_the_engine_runs_on_is_named_with_its_version():
    model = tiny()
    del model.blocks[2].attn.q_norm
    with pytest.raises(
        ValueError, match=rf"timm {re.escape(timm.__version__)} changed the internals .*Attention\.q_norm"
    ):
        tokensparse.dynamicvit(model)
