"""The training-free baselines: ToMe (against the authors' numbers), EViT, random and static pruning."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
from conftest import backbone_state, golden, golden_vit, tiny
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import tokensparse
from tokensparse.engine import get_policy, run
from tokensparse.flops import backbone_flops
from tokensparse.policies.baselines import centre_rank, random_prune, static_prune
from tokensparse.policies.evit import authors_keep_counts, evit, evit_flops
from tokensparse.policies.tome import merge_schedule, tome, tome_flops

DYNAMICVIT_TOKENS = [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3  # rho 0.7 on 196 patches


@pytest.fixture(scope="module")
def official():
    return golden("tome_official")


@pytest.fixture(scope="module")
def dense(official):
    return load(golden_vit(), official)


def load(model, official):
    model.load_state_dict(backbone_state(official))
    return model.eval()


def logits(model, images):
    with torch.no_grad():
        return model(images)


def info(model):
    return tokensparse.sparsity_info(model)


# --- ToMe ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prop_attn", [0, 1])
@pytest.mark.parametrize("r", [0, 8, 16])
def test_tome_matches_authors_logits(official, dense, r, prop_attn):
    model = tome(copy.deepcopy(dense), r=r, prop_attn=bool(prop_attn))
    out = logits(model, official["input"])
    torch.testing.assert_close(out, official[f"eval_logits.r{r}.prop_attn{prop_attn}"], atol=1e-4, rtol=0)
    expected = [197]
    for _ in range(11):
        expected.append(expected[-1] - min(r, (expected[-1] - 1) // 2))
    assert info(model).tokens_per_block.tolist() == [expected] * 4


def test_tome_source_matches_authors(official, dense):
    model = tome(copy.deepcopy(dense), r=8, trace_source=True)
    logits(model, official["input"])
    extra = info(model).extra
    assert torch.equal(extra["source"], official["source.r8"].to(extra["source"].dtype))
    torch.testing.assert_close(extra["token_size"], extra["source"].sum(-1))
    assert torch.equal(extra["source"].argmax(1), extra["token_group"])
    # Each output patch token is anchored at a patch it holds; the class token holds only itself.
    anchors = extra["source"][:, 1:].gather(2, (info(model).patch_index + 1).unsqueeze(-1))
    assert anchors.shape == (4, 100, 1) and anchors.eq(1).all()
    assert extra["source"][:, 0, 0].eq(1).all() and extra["source"][:, 0].sum(-1).eq(1).all()
    assert info(model).keep_mask.sum(1).tolist() == [100] * 4


def test_tome_r_is_settable_after_patching_and_r0_is_the_dense_model(official, dense):
    model = tome(copy.deepcopy(dense))
    torch.testing.assert_close(
        logits(model, official["input"]), logits(dense, official["input"]), atol=1e-5, rtol=0
    )
    model.r = 8
    out = logits(model, official["input"])
    torch.testing.assert_close(out, official["eval_logits.r8.prop_attn1"], atol=1e-4, rtol=0)
    assert info(model).extra["merge_schedule"] == [8] * 12
    model.r = [16, 16]
    logits(model, official["input"])
    assert info(model).tokens_per_block[0, :4].tolist() == [197, 181, 165, 165]
    model.r = "many"
    with pytest.raises(ValueError, match="r must be an int >= 0"):
        logits(model, official["input"])


def test_tome_schedules_follow_the_authors():
    assert merge_schedule(13, 12) == [13] * 12
    assert merge_schedule((8, -1.0), 4) == [16, 10, 5, 0]  # ToMe's decreasing schedule
    assert merge_schedule((8, 0), 3) == [8, 8, 8]
    assert merge_schedule([4, 2], 4) == [4, 2, 0, 0]


@pytest.mark.parametrize(
    "arch, kwargs",
    [
        ("deit_small_distilled_patch16_224", {}),
        ("vit_small_patch16_224", dict(reg_tokens=3)),
        ("vit_small_patch16_224", dict(class_token=False, reg_tokens=2, global_pool="avg")),
    ],
)
def test_tome_never_merges_prefix_tokens(arch, kwargs):
    model = tiny(arch, **kwargs).eval()
    prefix = model.num_prefix_tokens
    model = tome(model, r=12, trace_source=True)
    images = torch.randn(2, 3, 64, 64)
    out = logits(model, images)
    assert torch.isfinite(out).all()
    source = info(model).extra["source"]
    assert torch.equal(source[:, :prefix, :prefix], torch.eye(prefix).expand(2, -1, -1))
    assert source[:, :prefix].sum(-1).eq(1).all() and source.sum(1).eq(1).all()
    assert info(model).tokens_per_block[0].tolist()[:3] == [prefix + 64, prefix + 52, prefix + 40]


# --- EViT ---------------------------------------------------------------------------------------------

EVIT_GOLDEN = Path(__file__).resolve().parent / "golden" / "evit_official.safetensors"


@pytest.fixture(scope="module")
def evit_official():
    """Numbers from the authors' evit.py (tests/golden/README.md, tests/golden_tools/make_evit_golden.py)."""
    tensors = load_file(str(EVIT_GOLDEN))
    tensors["input"] = (tensors.pop("pixels").float() / 255 - 0.5) / 0.25
    return tensors


def evit_model(evit_official, **kw):
    model = golden_vit()
    model.load_state_dict({k: v.float() for k, v in backbone_state(evit_official).items()})
    return evit(model.eval(), **kw)


@pytest.mark.parametrize("fuse", [1, 0])
@pytest.mark.parametrize("keep_ratio", [0.7, 0.5])
def test_evit_matches_authors_logits_and_kept_tokens(evit_official, keep_ratio, fuse):
    model = evit_model(evit_official, keep_ratio=keep_ratio, fuse=bool(fuse))
    out = logits(model, evit_official["input"])
    tag = f"rho{keep_ratio}.fuse{fuse}"
    torch.testing.assert_close(out, evit_official[f"eval_logits.{tag}"], atol=1e-5, rtol=0)
    kept = info(model).kept_index
    assert len(kept) == 3
    for stage, index in enumerate(kept):
        assert torch.equal(index, evit_official[f"eval_kept.{tag}.stage{stage}"])
    counts = authors_keep_counts(196, keep_ratio, 3, bool(fuse))
    assert [k.shape[1] for k in kept] == counts
    # Block 3's attention runs on all 197 tokens, its MLP on the class token, the kept ones (+ fused).
    after = [1 + c + fuse for c in counts]
    assert (
        info(model).extra["mlp_tokens"][0].tolist()
        == [197] * 3 + [after[0]] * 3 + [after[1]] * 3 + [after[2]] * 3
    )
    assert (
        info(model).tokens_per_block[0].tolist()
        == [197] * 4 + [after[0]] * 3 + [after[1]] * 3 + [after[2]] * 2
    )


def test_evit_authors_counts():
    """ceil(rho * tokens present), the previous fused token counted: DeiT's 138, 97, 68 at 0.7."""
    assert authors_keep_counts(196, 0.7, 3, fuse=False) == [138, 97, 68]
    assert authors_keep_counts(196, 0.7, 3, fuse=True) == [138, 98, 70]
    assert authors_keep_counts(196, 0.5, 3, fuse=False) == [98, 49, 25]
    assert authors_keep_counts(196, 0.5, 3, fuse=True) == [98, 50, 26]
    assert authors_keep_counts(196, 1.0, 3, fuse=True) == [196, 196, 196]  # no fused token added
    assert authors_keep_counts(64, 0.7, 3, fuse=True) == [45, 33, 24]
    assert authors_keep_counts(196, 0.1, 3, fuse=True) == [20, 3, 1]  # never none


def test_evit_authors_fused_token_is_ranked_with_the_patches(evit_official):
    """The previous fused token competes with the patches: kept (as index N) or fused into the new one."""
    model = evit_model(evit_official, keep_ratio=0.5)
    logits(model, evit_official["input"])
    kept = info(model).kept_index
    assert kept[0].lt(196).all()  # the first stage ranks patches only
    assert kept[2].eq(196).sum(1).tolist() == [2, 2, 2, 1]  # images keep different numbers of patches
    final = info(model).patch_index
    assert final.shape == (4, 27) and final[:, -1].eq(196).all()  # the last fused token
    assert info(model).keep_mask.sum(1).tolist() == [24.0, 24.0, 24.0, 25.0]
    assert info(model).patch_tokens.shape == (4, 27, 48)


def reference_evit(model, images, keep_ratio, locations=(3, 6, 9)):
    """EViT in the authors' form on timm's modules: explicit attention, kept tokens in descending
    attention order, the fused token from the complement's indices (weights not renormalised)."""
    x = model._pos_embed(model.patch_embed(images))
    batch, patches = x.shape[0], x.shape[1] - 1
    patch_ids, kept_sets = torch.arange(patches).expand(batch, -1), []
    for index, block in enumerate(model.blocks):
        if index not in locations:
            x = block(x)
            continue
        attn, h = block.attn, block.norm1(x)
        tokens, channels = h.shape[1:]
        q, k, v = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        probs = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
        x = x + attn.proj((probs @ v).transpose(1, 2).reshape(batch, tokens, channels))
        class_attention = probs[:, :, 0, 1:].mean(dim=1)
        fused = index != locations[0]
        present = tokens - 1 - fused
        count = int(patches * keep_ratio ** (locations.index(index) + 1))
        top = class_attention[:, :present].topk(count, dim=1).indices  # descending, as EViT keeps them
        rest = torch.stack(
            [torch.tensor([i for i in range(present) if i not in set(t.tolist())]) for t in top]
        )
        if fused:
            rest = torch.cat([rest, torch.full((batch, 1), present)], dim=1)
        others = x[:, 1:].gather(1, rest.unsqueeze(-1).expand(-1, -1, channels))
        extra = (others * class_attention.gather(1, rest).unsqueeze(-1)).sum(dim=1, keepdim=True)
        x = torch.cat(
            [x[:, :1], x[:, 1:].gather(1, top.unsqueeze(-1).expand(-1, -1, channels)), extra], dim=1
        )
        patch_ids = patch_ids.gather(1, top)
        kept_sets.append(patch_ids.sort(dim=1).values)
        x = x + block.mlp(block.norm2(x))
    return model.forward_head(model.norm(x)), kept_sets


@pytest.mark.parametrize("keep_ratio", [0.7, 0.5])
def test_evit_keeps_the_most_attended_tokens_and_fuses_the_rest(official, dense, keep_ratio):
    model = evit(copy.deepcopy(dense), keep_ratio=keep_ratio, counts="dynamicvit")
    out = logits(model, official["input"])
    with torch.no_grad():
        expected, kept_sets = reference_evit(dense, official["input"], keep_ratio)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    for stage, kept in enumerate(kept_sets):
        assert torch.equal(info(model).kept_index[stage], kept)


def test_evit_first_stage_by_hand(official, dense):
    """On one image: the 137 patches kept before block 3's MLP are the top ones by the class token's
    attention in block 3 (a real ranking: the 137th and 138th differ clearly)."""
    image = official["input"][1:2]
    with torch.no_grad():
        x = dense._pos_embed(dense.patch_embed(image))
        for block in dense.blocks[:3]:
            x = block(x)
        attn = dense.blocks[3].attn
        q, k, _ = attn.qkv(dense.blocks[3].norm1(x)).reshape(1, 197, 3, 3, 16).permute(2, 0, 3, 1, 4)
        scores = ((q[0, :, :1] @ k[0].transpose(-2, -1)) * attn.scale).softmax(-1).mean(0)[0, 1:]
    ranked = scores.argsort(descending=True)
    assert scores[ranked[136]] - scores[ranked[137]] > 1e-6
    model = evit(copy.deepcopy(dense), keep_ratio=0.7, counts="dynamicvit")
    logits(model, image)
    assert info(model).kept_index[0][0].tolist() == sorted(ranked[:137].tolist())


def test_evit_token_counts_are_dynamicvits_plus_the_fused_token(official, dense):
    model = evit(copy.deepcopy(dense), keep_ratio=0.7, counts="dynamicvit")
    logits(model, official["input"])
    # Block 3's attention runs on all tokens; its MLP and later blocks on the kept ones + 1 fused.
    mlp = info(model).extra["mlp_tokens"][0].tolist()
    assert mlp == DYNAMICVIT_TOKENS[:3] + [n + 1 for n in DYNAMICVIT_TOKENS[3:]]
    assert info(model).tokens_per_block[0].tolist() == [197] * 4 + [139] * 3 + [98] * 3 + [69] * 2
    assert [k.shape[1] for k in info(model).kept_index] == [137, 96, 67]
    assert info(model).patch_tokens.shape[1] == 67 and info(model).keep_mask.sum(1).eq(67).all()
    assert info(model).extra["fused_token"].shape == (4, 1, 48)

    unfused = evit(copy.deepcopy(dense), keep_ratio=0.7, fuse=False, counts="dynamicvit")
    logits(unfused, official["input"])
    assert info(unfused).extra["mlp_tokens"][0].tolist() == DYNAMICVIT_TOKENS[:3] + DYNAMICVIT_TOKENS[3:]
    assert info(unfused).extra["fused_token"] is None


# --- random and static pruning -------------------------------------------------------------------------


def test_random_differs_across_forwards_but_not_with_a_seed(official, dense):
    images = official["input"]
    model = random_prune(copy.deepcopy(dense), keep_ratio=0.7)
    logits(model, images)
    first = info(model).kept_index
    logits(model, images)
    assert not torch.equal(first[0], info(model).kept_index[0])
    assert info(model).tokens_per_block[0].tolist() == DYNAMICVIT_TOKENS
    seeded = random_prune(copy.deepcopy(dense), keep_ratio=0.7, seed=3).eval()
    a = logits(seeded, images)
    kept = info(seeded).kept_index
    b = logits(seeded, images)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(kept, info(seeded).kept_index))
    assert not torch.equal(kept[0][0], kept[0][1])  # per image
    for before, after in zip(kept, kept[1:]):  # a dropped token stays dropped
        assert all(set(a.tolist()) >= set(b.tolist()) for a, b in zip(before, after))
    seeded.train()  # training draws afresh every step, seed or not
    first = run(seeded, images, regime="gather")
    assert not torch.equal(first, run(seeded, images, regime="gather"))


def test_static_keeps_the_centre_for_every_image(official, dense):
    model = static_prune(copy.deepcopy(dense), keep_ratio=0.7)
    logits(model, official["input"])
    kept = info(model).kept_index
    assert [k.shape[1] for k in kept] == [137, 96, 67]
    rows, cols = torch.arange(196) // 14, torch.arange(196) % 14
    distance = (rows - 6.5) ** 2 + (cols - 6.5) ** 2
    for stage in kept:
        assert stage.eq(stage[0]).all()
        inside, outside = distance[stage[0]], distance[~torch.isin(torch.arange(196), stage[0])]
        assert inside.max() <= outside.min()
    assert kept[2][0].tolist() == torch.sort(centre_rank((14, 14)).argsort()[:67]).values.tolist()


@pytest.mark.parametrize("build", [static_prune, lambda m, **kw: random_prune(m, seed=0, **kw)])
def test_mask_regime_is_the_training_form(official, dense, build):
    """Masks like DynamicViT in training; with the same decisions the masked form gives the gathered logits."""
    model = build(copy.deepcopy(dense), keep_ratio=0.7)
    with torch.no_grad():
        gathered = model.forward_head(run(model, official["input"], regime="gather"))
        masked = model.forward_head(run(model, official["input"], regime="mask"))
    torch.testing.assert_close(masked, gathered, atol=1e-5, rtol=0)
    model.train()
    loss = model(official["input"]).logsumexp(-1).sum()
    loss.backward()
    decisions = info(model).keep_decisions
    assert [d.shape for d in decisions] == [(4, 196)] * 3
    assert [d.sum(1).tolist() for d in decisions] == [[137.0] * 4, [96.0] * 4, [67.0] * 4]
    assert info(model).tokens_per_block.eq(197).all()  # every token stays in the tensor


def test_tome_and_evit_train_with_tokens_removed(official, dense):
    for model in (tome(copy.deepcopy(dense), r=8, prop_attn=False), evit(copy.deepcopy(dense))):
        model.train()
        model(official["input"]).logsumexp(-1).sum().backward()
        assert model.blocks[0].attn.qkv.weight.grad is not None
        assert info(model).tokens_per_block[0, -1] < 197


# --- shared behaviour ------------------------------------------------------------------------------------

BUILDERS = {
    "tome": lambda m: tome(m, r=8),
    "evit": lambda m: evit(m, keep_ratio=0.7),
    "evit-dynamicvit": lambda m: evit(m, keep_ratio=0.7, counts="dynamicvit"),
    "evit-unfused": lambda m: evit(m, keep_ratio=0.5, fuse=False),
    "random": lambda m: random_prune(m, keep_ratio=0.7, seed=0),
    "static": lambda m: static_prune(m, keep_ratio=0.7),
}


@pytest.mark.parametrize("method", list(BUILDERS))
def test_method_state_dict_and_batch_of_one(official, dense, method):
    model = BUILDERS[method](copy.deepcopy(dense))
    assert get_policy(model).method == method.split("-")[0]
    assert model.state_dict().keys() == dense.state_dict().keys()
    model.load_state_dict(dense.state_dict())  # strict: plain timm checkpoints load
    batched = logits(model, official["input"])
    single = logits(model, official["input"][2:3])
    assert single.shape == (1, 10) and torch.isfinite(single).all()
    if method != "random":  # random draws per batch, so image 2 alone draws differently
        torch.testing.assert_close(single, batched[2:3], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "build",
    [
        lambda m: evit(m, keep_ratio=1.0),
        lambda m: evit(m, keep_ratio=1.0, counts="dynamicvit"),
        lambda m: random_prune(m, keep_ratio=1.0),
        lambda m: static_prune(m, keep_ratio=1.0),
        lambda m: tome(m, r=0),
    ],
    ids=["evit", "evit-dynamicvit", "random", "static", "tome"],
)
def test_keeping_everything_is_the_dense_model(official, dense, build):
    model = build(copy.deepcopy(dense))
    torch.testing.assert_close(
        logits(model, official["input"]), logits(dense, official["input"]), atol=1e-5, rtol=0
    )
    assert info(model).tokens_per_block.eq(197).all()


def _cpu_sdpa_macs(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
SDPA_MAPPING = {_CPU_SDPA: _cpu_sdpa_macs} if _CPU_SDPA is not None else {}


@pytest.mark.parametrize(
    "method, extra",
    [
        ("tome", tome_flops),
        ("evit", evit_flops),
        ("evit-dynamicvit", evit_flops),
        ("evit-unfused", evit_flops),
    ],
)
def test_flops_match_torch_counter(official, dense, method, extra):
    """backbone_flops on the tokens each block started with, plus the policy's term, is torch's count."""
    model = BUILDERS[method](copy.deepcopy(dense))
    image = official["input"][:1]
    with FlopCounterMode(display=False, custom_mapping=SDPA_MAPPING) as counter, torch.no_grad():
        model(image)
    ours = backbone_flops(model, info(model).tokens_per_block, 196) + extra(
        get_policy(model), info(model), 196
    )
    assert ours.item() == pytest.approx(counter.get_total_flops() / 2, rel=1e-9)


def test_errors_name_the_problem(dense):
    def fresh():
        return copy.deepcopy(dense)

    def evit_dynamicvit(model, **kw):
        return evit(model, counts="dynamicvit", **kw)

    for build in (evit, evit_dynamicvit, random_prune, static_prune):
        with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\], got 0"):
            build(fresh(), keep_ratio=0)
        with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\], got True"):
            build(fresh(), keep_ratio=True)
        with pytest.raises(ValueError, match=r"must lie inside the model's depth: 0..11 for 12 blocks"):
            build(fresh(), locations=(3, 12))
        with pytest.raises(ValueError, match="strictly increasing"):
            build(fresh(), locations=(6, 3))
        if build is not evit:  # the authors' ceil keeps at least one token
            with pytest.raises(ValueError, match="keeps no patch token of 196 after stage 2"):
                build(fresh(), keep_ratio=0.1)
        with pytest.raises(ValueError, match="does not run on a Linear"):
            build(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="r must be an int >= 0"):
        tome(fresh(), r=-1)
    with pytest.raises(ValueError, match="r must be an int >= 0"):
        tome(fresh(), r=2.5)
    with pytest.raises(ValueError, match="at most 12 ints >= 0"):
        tome(fresh(), r=[1] * 13)
    with pytest.raises(ValueError, match="prop_attn must be True or False"):
        tome(fresh(), prop_attn=1)
    with pytest.raises(ValueError, match="counts must be one of"):
        evit(fresh(), counts="paper")
    with pytest.raises(ValueError, match="seed must be an int or None"):
        random_prune(fresh(), seed="0")
    with pytest.raises(ValueError, match="has no class token"):
        evit(
            timm.create_model(
                "vit_small_patch16_224",
                img_size=32,
                patch_size=8,
                embed_dim=48,
                depth=4,
                num_heads=3,
                class_token=False,
                global_pool="avg",
            )
        )
    with pytest.raises(ValueError, match="already sparsified with tome"):
        evit(tome(fresh()))


def test_seeded_random_pruning_does_not_depend_on_the_evaluation_batch_size():
    """Each image's draw comes from (seed, its data set index): batches of 3 and of 8 prune alike."""
    from tokensparse.data import build_loader
    from tokensparse.evaluate import evaluate

    torch.manual_seed(1)
    images, labels = torch.randn(8, 3, 64, 64), torch.randint(0, 7, (8,))
    dataset = torch.utils.data.TensorDataset(images, labels)
    model = random_prune(tiny(), keep_ratio=0.5, locations=(1, 3), seed=5)
    answers = {
        batch: evaluate(model, build_loader(dataset, batch, is_training=False), progress=False, per_item=True)
        for batch in (3, 8)
    }
    assert answers[3]["correct"] == answers[8]["correct"] and answers[3]["gflops"] == answers[8]["gflops"]
    # the same seeded draws as one forward of the whole batch outside evaluate (indices = positions)
    model.eval()
    with torch.no_grad():
        whole = model(images)
    kept = info(model).kept_index
    model.get_submodule(model._tokensparse_policy_name).image_indices = torch.arange(4, 8)
    with torch.no_grad():
        tail = model(images[4:])
    torch.testing.assert_close(tail, whole[4:], atol=1e-5, rtol=0)
    assert torch.equal(info(model).kept_index[1], kept[1][4:])
    model.get_submodule(model._tokensparse_policy_name).image_indices = torch.arange(3)
    with pytest.raises(ValueError, match="image_indices names 3 images but the forward has 4"):
        model(images[4:])
