from __future__ import annotations

import pytest
import timm
import torch
from conftest import backbone_state, golden, golden_vit, tiny
from timm.models.vision_transformer import Block

import tokensparse
from tokensparse.attention import PackedLayout, length_buckets, packed_block
from tokensparse.engine import run
from tokensparse.policies.avit import AViTPolicy, avit, avit_stats

CENTERS = [2, 5]


@pytest.fixture(scope="module")
def official():
    return golden("avit_official")


def golden_avit(official, gate_center: float, **kw) -> torch.nn.Module:
    model = avit(golden_vit(), gate_scale=10.0, gate_center=gate_center, **kw)
    model.load_state_dict(backbone_state(official))  # a plain timm state dict, strict
    return model.eval()


def head_depth(depth: torch.Tensor, head_tokens: int = 1) -> torch.Tensor:
    """(B,) blocks an image runs with early exit: until the last of its head tokens halts."""
    return depth[:, :head_tokens].amax(dim=1)


@pytest.mark.parametrize("gate_center", CENTERS)
def test_eval_removes_tokens_and_matches_authors(official, gate_center):
    model = golden_avit(official, gate_center)
    with torch.no_grad():
        logits = model(official["input"])
    torch.testing.assert_close(logits, official[f"eval_logits.gate_center{gate_center}"], atol=1e-4, rtol=0)
    expected = official[f"token_depth.gate_center{gate_center}"].long()
    exit_depth = head_depth(expected)
    stats = avit_stats(model)
    # Early exit: once the class token halts, the image's other tokens stop where they are.
    assert torch.equal(stats.token_depth, expected.minimum(exit_depth[:, None]))
    # Each block computed exactly the tokens still running, in images whose class token still runs.
    blocks = torch.arange(12)
    running = (expected[:, :, None] > blocks).sum(1) * (blocks < exit_depth[:, None])
    assert torch.equal(tokensparse.sparsity_info(model).tokens_per_block, running)
    assert running.sum() < 4 * 12 * 197  # tokens did leave the computation


@pytest.mark.parametrize("gate_center", CENTERS)
def test_eval_without_early_exit_matches_authors_depths_and_ponder(official, gate_center):
    model = golden_avit(official, gate_center, early_exit=False)
    with torch.no_grad():
        logits = model(official["input"])
    torch.testing.assert_close(logits, official[f"eval_logits.gate_center{gate_center}"], atol=1e-4, rtol=0)
    stats = avit_stats(model)
    expected = official[f"token_depth.gate_center{gate_center}"].long()
    assert torch.equal(stats.token_depth, expected)
    torch.testing.assert_close(stats.ponder, official[f"ponder.gate_center{gate_center}"], atol=1e-5, rtol=0)
    running = (expected[:, :, None] > torch.arange(12)).sum(1)
    assert torch.equal(tokensparse.sparsity_info(model).tokens_per_block, running)
    assert torch.equal(stats.depth_map, expected[:, 1:].view(4, 14, 14))
    torch.testing.assert_close(stats.mean_depth, expected.float().mean(1))


@pytest.mark.parametrize("gate_center", CENTERS)
def test_training_form_matches_authors(official, gate_center):
    model = golden_avit(official, gate_center).train()
    with torch.no_grad():
        logits = model(official["input"])
    torch.testing.assert_close(logits, official[f"eval_logits.gate_center{gate_center}"], atol=1e-4, rtol=0)
    stats = avit_stats(model)
    assert torch.equal(stats.token_depth, official[f"token_depth.gate_center{gate_center}"].long())
    torch.testing.assert_close(stats.ponder, official[f"ponder.gate_center{gate_center}"], atol=1e-5, rtol=0)
    assert stats.halting_score_layer.shape == (12,)
    assert torch.equal(tokensparse.sparsity_info(model).tokens_per_block, torch.full((4, 12), 197))


def test_mask_regime_equals_gather_regime(official):
    model = golden_avit(official, 2)
    images = torch.cat([official["input"], official["input"][:2] * 0.3, official["input"][2:] * 3])
    with torch.no_grad():
        masked = model.forward_head(run(model, images, regime="mask"))
        mask_depth = avit_stats(model).token_depth
        gathered = model.forward_head(run(model, images, regime="gather"))
    torch.testing.assert_close(gathered, masked, atol=1e-5, rtol=0)
    assert torch.equal(avit_stats(model).token_depth, mask_depth.minimum(head_depth(mask_depth)[:, None]))


@pytest.mark.parametrize("early_exit", [True, False])
def test_batch_of_one_equals_batched(official, early_exit):
    """Batch 1 takes its own shortcuts (no bucketing, the image's exit read with the running count)."""
    model = golden_avit(official, 2, early_exit=early_exit)
    with torch.no_grad():
        batched = model(official["input"])
        stats = avit_stats(model)
        for i in range(official["input"].shape[0]):
            single = model(official["input"][i : i + 1])
            torch.testing.assert_close(single, batched[i : i + 1], atol=1e-5, rtol=0)
            one = avit_stats(model)
            assert torch.equal(one.token_depth, stats.token_depth[i : i + 1])
            torch.testing.assert_close(one.ponder, stats.ponder[i : i + 1], atol=1e-5, rtol=0)
            counts = tokensparse.sparsity_info(model).tokens_per_block
            assert counts.shape == (1, 12) and counts.sum() == one.token_depth.sum()  # blocks ran its tokens


def test_state_dict_is_timms(official):
    dense = golden_vit()
    reference = {k: v.clone() for k, v in dense.state_dict().items()}
    model = avit(dense)
    assert list(model.state_dict()) == list(reference)
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in reference.values())


def test_no_halting_is_the_dense_model(official):
    """A gate centre so high that h = 0 until the last block: every token runs every block."""
    dense = golden_vit()
    dense.load_state_dict(backbone_state(official))
    model = golden_avit(official, 1000.0)
    with torch.no_grad():
        expected = dense.eval()(official["input"])
        for regime in ("gather", "mask"):
            torch.testing.assert_close(
                model.forward_head(run(model, official["input"], regime=regime)), expected
            )
            assert torch.equal(avit_stats(model).token_depth, torch.full((4, 197), 12))
            assert torch.equal(tokensparse.sparsity_info(model).tokens_per_block, torch.full((4, 12), 197))


def test_first_block_halting_score_is_the_mean_over_all_tokens(official):
    dense = golden_vit()
    dense.load_state_dict(backbone_state(official))
    with torch.no_grad():
        y = dense.blocks[0](dense._pos_embed(dense.patch_embed(official["input"])))
        expected = torch.sigmoid(10.0 * y[..., 0] - 2.0).mean()
        model = golden_avit(official, 2)
        for regime in ("gather", "mask"):
            run(model, official["input"], regime=regime)
            scores = avit_stats(model).halting_score_layer
            assert scores.shape == (12,)
            torch.testing.assert_close(scores[0], expected)


def test_gradient_reaches_backbone_through_ponder(official):
    model = golden_avit(official, 2).train()
    logits = model(official["input"])
    stats = avit_stats(model)
    assert stats.ponder.requires_grad and stats.halting_score_layer.requires_grad
    stats.ponder.mean().backward(retain_graph=True)
    for name in ("blocks.0.attn.qkv.weight", "blocks.5.mlp.fc1.weight", "patch_embed.proj.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    model.zero_grad()
    loss = logits.logsumexp(-1).mean() + stats.halting_score_layer.sum()
    loss.backward()
    assert model.blocks[11].attn.qkv.weight.grad.abs().sum() > 0


def test_image_whose_class_token_halted_costs_nothing_more(official):
    model = golden_avit(official, 2)
    with torch.no_grad():
        model(official["input"])
    tokens = tokensparse.sparsity_info(model).tokens_per_block
    assert avit_stats(model).token_depth[0, 0] == 11  # the class token of image 0 halts after block 10
    assert tokens[0, 11] == 0 and (tokens[1:, 11] > 0).all()
    # Everything halts after the first block: every later block runs on nothing.
    model = golden_avit(official, -30.0)
    with torch.no_grad():
        logits = model(official["input"])
        tokens = tokensparse.sparsity_info(model).tokens_per_block
        scores = avit_stats(model).halting_score_layer  # blocks that computed no token have no mean
        masked = model.forward_head(run(model, official["input"], regime="mask"))
    torch.testing.assert_close(logits, masked, atol=1e-5, rtol=0)
    assert tokens[:, 0].tolist() == [197] * 4 and not tokens[:, 1:].any()
    assert scores.shape == (12,) and scores[0].isfinite() and scores[1:].isnan().all()


def test_distilled_deit_runs_and_exits_on_both_head_tokens():
    dense = tiny("deit_tiny_distilled_patch16_224", depth=8)
    with torch.no_grad():  # two head tokens that differ, whatever timm initialises them to
        dense.dist_token.copy_(
            torch.randn(dense.dist_token.shape, generator=torch.Generator().manual_seed(0))
        )
    model = avit(dense, gate_center=0.0).eval()  # the class token halts early, the distillation token runs on
    images = torch.randn(3, 3, 64, 64)
    images[0] *= 0.1
    with torch.no_grad():
        gathered = model(images)
        depth = avit_stats(model).token_depth
        masked = model.forward_head(run(model, images, regime="mask"))
        mask_depth = avit_stats(model).token_depth
    assert gathered.shape == (3, 7)
    torch.testing.assert_close(gathered, masked, atol=1e-5, rtol=0)
    exit_depth = head_depth(mask_depth, head_tokens=2)
    assert torch.equal(depth, mask_depth.minimum(exit_depth[:, None]))
    assert (depth[:, 1] > depth[:, 0]).any() or (depth[:, 0] > depth[:, 1]).any()
    with torch.no_grad():
        model(images)
    blocks = torch.arange(8)
    running = (mask_depth[:, :, None] > blocks).sum(1) * (blocks < exit_depth[:, None])
    assert torch.equal(tokensparse.sparsity_info(model).tokens_per_block, running)
    stats = avit_stats(model)
    assert stats.token_depth.shape == (3, 66) and stats.depth_map.shape == (3, 8, 8)
    model.set_distilled_training(True)
    class_logits, distill_logits = model.train()(images)
    assert class_logits.shape == distill_logits.shape == (3, 7)


def test_average_pooled_model_exits_only_when_all_patches_halted():
    model = avit(tiny("vit_small_patch16_224", global_pool="avg", class_token=False), gate_center=2.0).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        gathered = model(images)
        depth = avit_stats(model).token_depth
        masked = model.forward_head(run(model, images, regime="mask"))
    torch.testing.assert_close(gathered, masked, atol=1e-5, rtol=0)
    assert torch.equal(depth, avit_stats(model).token_depth)


def test_packed_block_equals_timm_block_per_image():
    torch.manual_seed(0)
    block = Block(48, 3, qkv_bias=True).eval()
    lengths = [197, 180, 60, 3, 0, 59]
    images = [torch.randn(n, 48) for n in lengths]
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    layout = PackedLayout.from_image_ids(ids, len(lengths))
    assert len(layout.buckets) > 1 and layout.counts.tolist() == lengths
    with torch.no_grad():
        packed = packed_block(block, torch.cat(images), layout)
        expected = torch.cat([block(x[None])[0] for x in images if len(x)])
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=0)


def test_length_buckets():
    assert length_buckets([197] * 8) == [(0, 8)]
    assert length_buckets([197, 190, 100, 98, 10]) == [(0, 2), (2, 4), (4, 5)]
    assert length_buckets([197, 190, 100, 98, 10], max_buckets=2) == [(0, 2), (2, 5)]
    assert length_buckets([]) == []


def test_token_exactly_on_threshold_halts_without_remainder():
    """The authors' strict comparisons: c == 1 - eps is neither 'reached' nor 'runs on'."""
    policy = AViTPolicy(10.0, 2.0, 0.01)
    threshold = torch.tensor(1 - 0.01, dtype=torch.float32)
    h = torch.tensor([0.5, 0.2, 0.7])
    cumulative = torch.stack([threshold - 0.5, torch.tensor(0.1), torch.tensor(0.6)])
    remainder = torch.tensor([0.3, 0.9, 0.4])
    cumulative, remainder, weight, ponder_step, runs_on = policy.halting_step(cumulative, remainder, h)
    assert cumulative[0] == threshold
    assert runs_on.tolist() == [0.0, 1.0, 0.0]
    torch.testing.assert_close(weight, torch.tensor([0.0, 0.2, 0.4]))
    torch.testing.assert_close(ponder_step, torch.tensor([0.0, 0.0, 0.4]))
    torch.testing.assert_close(remainder, torch.tensor([0.3, 0.7, 0.4]))
    # the in-place form the inference pack uses gives the same values
    cumulative_ = torch.stack([threshold - 0.5, torch.tensor(0.1), torch.tensor(0.6)])
    remainder_ = torch.tensor([0.3, 0.9, 0.4])
    ponder_step_ = torch.full((3,), float("nan"))
    weight_, runs_on_ = policy.halting_step_(cumulative_.add_(h), remainder_, h, ponder_step_)
    assert torch.equal(cumulative_, cumulative) and torch.equal(weight_, weight)
    assert torch.equal(ponder_step_, ponder_step) and runs_on_.tolist() == [False, True, False]
    assert torch.equal(remainder_[runs_on_], remainder[runs_on_])  # the others leave the pack


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gate_scale": 0.0}, "gate_scale must be > 0, got 0.0"),
        ({"gate_scale": -10}, "gate_scale must be > 0, got -10"),
        ({"gate_scale": float("inf")}, "gate_scale must be a finite number, got inf"),
        ({"gate_scale": True}, "gate_scale must be a finite number, got True"),
        ({"gate_center": float("nan")}, "gate_center must be a finite number, got nan"),
        ({"gate_center": "30"}, "gate_center must be a finite number, got '30'"),
        ({"eps": 0.0}, r"eps must be in \(0, 1\), got 0.0"),
        ({"eps": 1}, r"eps must be in \(0, 1\), got 1"),
        ({"eps": -0.5}, r"eps must be in \(0, 1\), got -0.5"),
        ({"early_exit": 1}, "early_exit must be True or False, got 1"),
        ({"straight_through_zeroing": None}, "straight_through_zeroing must be True or False, got None"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        avit(golden_vit(), **kwargs)


def test_non_vit_and_twice_sparsified_are_refused():
    with pytest.raises(ValueError, match="does not run on a ResNet"):
        avit(timm.create_model("resnet18"))
    model = avit(golden_vit())
    with pytest.raises(ValueError, match="already sparsified with avit"):
        avit(model)
    with pytest.raises(ValueError, match="avit_stats needs a model made by tokensparse.avit"):
        avit_stats(tokensparse.dynamicvit(golden_vit()))
    with pytest.raises(RuntimeError, match="no forward has run"):
        avit_stats(avit(golden_vit()))
