from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import tokensparse
from tokensparse.engine import TokenPolicy, sparsify
from tokensparse.flops import backbone_flops, flops_from_info, gflops, model_flops

TINY = dict(img_size=112, patch_size=8, embed_dim=48, depth=12, num_heads=3, num_classes=10)
CONFIGS = {
    "vit": ("vit_small_patch16_224", TINY, (112, 112)),
    "distilled": ("deit_small_distilled_patch16_224", TINY, (112, 112)),
    "registers_avg_dynamic": (
        "vit_small_patch16_224",
        dict(TINY, img_size=64, class_token=False, reg_tokens=2, global_pool="avg", dynamic_img_size=True),
        (48, 80),
    ),
}


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    arch, kwargs, (height, width) = CONFIGS[name]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **kwargs).eval()
    return model, torch.randn(2, 3, height, width)


def _cpu_sdpa_macs(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


# FlopCounterMode has no formula for the CPU kernel of fused SDPA and counts it as 0; give it torch's own.
_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
SDPA_MAPPING = {_CPU_SDPA: _cpu_sdpa_macs} if _CPU_SDPA is not None else {}


def counted_macs(model: torch.nn.Module, images: torch.Tensor, fused: bool) -> list[float]:
    """torch's own count per image, in multiply-adds (it reports 2 FLOPs per multiply-add)."""
    blocks = list(model.blocks)
    default = [block.attn.fused_attn for block in blocks]
    for block in blocks:
        block.attn.fused_attn = fused
    try:
        counts = []
        for i in range(images.shape[0]):
            with FlopCounterMode(display=False, custom_mapping=SDPA_MAPPING) as counter, torch.no_grad():
                model(images[i : i + 1])
            counts.append(counter.get_total_flops() / 2)
        return counts
    finally:
        for block, flag in zip(blocks, default, strict=True):
            block.attn.fused_attn = flag


@pytest.mark.parametrize("fused", [True, False], ids=["fused_attn", "unfused_attn"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("method", ["dense", "dynamicvit_eval", "dynamicvit_train"])
def test_matches_torch_flop_counter(config: str, method: str, fused: bool) -> None:
    # Exact, not just within 2%: a missing head or distillation head would hide inside 2%.
    model, images = build(config)
    if method != "dense":
        model = tokensparse.dynamicvit(model, keep_ratio=0.6).train(method == "dynamicvit_train")
    ours = model_flops(model, images)
    assert ours.dtype == torch.float64 and ours.shape == (2,)
    assert ours.tolist() == pytest.approx(counted_macs(model, images, fused), rel=1e-9)
    if method != "dense":
        model(images)
        assert torch.equal(flops_from_info(model), ours)


@pytest.mark.parametrize(
    "config, counts, fuse",
    [("distilled", "authors", True), ("distilled", "authors", False), ("vit", "dynamicvit", True)],
    ids=["authors-fuse", "authors-no_fuse", "dynamicvit-fuse"],
)
def test_evit_matches_torch_flop_counter(config: str, counts: str, fuse: bool) -> None:
    """Both EViT count rules, with and without the fused token; the class-attention row and the MLP on
    fewer tokens than the block's attention are counted exactly."""
    model, images = build(config)
    model = tokensparse.evit(model, keep_ratio=0.5, fuse=fuse, counts=counts)
    ours = model_flops(model, images)
    assert ours.tolist() == pytest.approx(counted_macs(model, images, fused=True), rel=1e-9)
    prefix = 2 if config == "distilled" else 1
    kept = (
        [98, 50, 26]
        if counts == "authors" and fuse
        else [98, 49, 25]
        if counts == "authors"
        else [98, 49, 24]
    )
    assert [k.shape[1] for k in tokensparse.sparsity_info(model).kept_index] == kept
    assert tokensparse.sparsity_info(model).tokens_per_block[0, -1] == prefix + kept[-1] + fuse
    dense = model_flops(build(config)[0], images)
    assert (ours < dense).all()


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_avit_matches_torch_flop_counter(train: bool) -> None:
    """Images halt at different depths, so each image has its own count (eval removes halted tokens)."""
    from tokensparse.policies.avit import avit  # an import error is a failure, not a skip

    model, images = build("distilled")
    model = avit(model, gate_center=0.5).train(train)  # random weights: halt within a few blocks
    ours = model_flops(model, images)
    assert ours.tolist() == pytest.approx(counted_macs(model, images, fused=True), rel=1e-9)
    if not train:
        assert ours[0] != ours[1]


def test_deit_small_matches_the_papers() -> None:
    torch.manual_seed(0)
    dense = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    dim, hidden, tokens, patches = 384, 1536, 197, 196
    block = tokens * dim * (3 * dim + dim + 2 * hidden) + 2 * tokens**2 * dim
    by_hand = 12 * block + patches * (3 * 16 * 16) * dim + dim * 1000
    assert gflops(dense) == pytest.approx(by_hand / 1e9, rel=1e-12)
    assert 4.5 < gflops(dense) < 4.7

    sparse = tokensparse.dynamicvit(dense, keep_ratio=0.7).eval()
    assert 2.8 < gflops(sparse) < 3.0
    info = tokensparse.sparsity_info(sparse)
    assert info.tokens_per_block[0].tolist() == [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3
    # The predictors (counted exactly against torch above) cost about 3% of the dense model here.
    predictors = gflops(sparse) - backbone_flops(sparse, info.tokens_per_block, 196).item() / 1e9
    assert 0.05 < predictors < 0.15


def test_fewer_tokens_fewer_flops() -> None:
    model, images = build("vit")
    dense = model_flops(model, images)
    ratios = [0.25, 0.4, 0.55, 0.7, 0.85, 1.0]
    counts = [
        model_flops(tokensparse.dynamicvit(copy.deepcopy(model), keep_ratio=r).eval(), images) for r in ratios
    ]
    means = [c.mean().item() for c in counts]
    assert means == sorted(means) and len(set(means)) == len(means)
    assert all((c < dense).all() for c in counts[:-1])
    # keep_ratio 1.0 prunes nothing, so inference skips the predictors: exactly the dense count.
    assert torch.equal(counts[-1], dense)
    # Training keeps every token in the tensor: dense work plus the predictors on all patches.
    trained = tokensparse.dynamicvit(copy.deepcopy(model), keep_ratio=0.25).train()
    assert (model_flops(trained, images) > dense).all()


def test_per_image_token_counts() -> None:
    """Images that keep different numbers of tokens (A-ViT) are counted per image, as torch counts them."""
    model, images = build("vit")
    full = 197
    schedule = [full, full, 150, 150, 150, 120, 90, 90, 60, 40, 40, 20]
    tokens = torch.tensor([[full] * 12, schedule])
    ours = backbone_flops(model, tokens, num_patches=196)
    assert ours[0] == model_flops(model, images[:1])[0]

    with FlopCounterMode(display=False, custom_mapping=SDPA_MAPPING) as counter, torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images[1:])))
        for block, n in zip(model.blocks, schedule, strict=True):
            x = block(x[:, :n])
        model.forward_head(model.norm(x))
    assert ours[1].item() == pytest.approx(counter.get_total_flops() / 2, rel=1e-9)
    assert ours[1] < ours[0]


def test_gflops_builds_an_input_of_the_requested_size() -> None:
    model, images = build("registers_avg_dynamic")
    assert gflops(model, img_size=(48, 80), batch=2) == pytest.approx(
        model_flops(model, images).mean().item() / 1e9
    )
    assert gflops(model, img_size=(48, 80)) < gflops(model)  # 60 patches against the model's 64


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="does not run on a Linear"):
        model_flops(torch.nn.Linear(3, 3), torch.randn(1, 3, 8, 8))
    model, images = build("vit")
    with pytest.raises(ValueError, match="does not match the model's 112x112"):
        model_flops(model, torch.randn(1, 3, 96, 96))

    class Uncounted(TokenPolicy, torch.nn.Module):  # a policy that does not say what it computes
        method = "unknown"

    sparse = sparsify(model, Uncounted(), "uncounted").eval()
    with pytest.raises(ValueError, match="no FLOP count for policy method 'unknown'"):
        model_flops(sparse, images)
    with pytest.raises(ValueError, match="not sparsified"):
        flops_from_info(build("vit")[0])
