"""Every backbone family x method: exact at identity, executed FLOPs equal torch's count at reduction,
positions carried with the kept tokens, and a clear refusal where a method does not run.

`SUPPORT` is the source of README's "Which models work" table (`scripts/model_table.py` writes it from
here; `test_readme_model_table_is_generated_from_these_tests` holds them equal).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import tokensparse
from tokensparse.engine import run
from tokensparse.flops import flops_from_info, model_flops

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)
LOCATIONS = (1, 2)

# family: (what the README calls it, timm model, the small model's arguments)
FAMILIES = {
    "deit": ("DeiT / ViT (timm `VisionTransformer`)", "deit_small_patch16_224", SMALL),
    "dinov2": (
        "DINOv2 with registers (timm)",
        "vit_small_patch14_reg4_dinov2",
        dict(SMALL, reg_tokens=4, init_values=1e-1, dynamic_img_size=False),
    ),
    "clip": ("CLIP (timm, pre-norm)", "vit_base_patch16_clip_224", SMALL),
    "siglip": ("SigLIP (timm, attention-pool head)", "vit_base_patch16_siglip_224", SMALL),
    "eva": ("EVA02 (timm `Eva`, rotary)", "eva02_tiny_patch14_224", dict(SMALL, mlp_ratio=2.0)),
    "beit": ("BEiT (timm `Beit`, relative position)", "beit_base_patch16_224", dict(SMALL, init_values=0.1)),
}
METHODS = ("tome", "evit", "random_prune", "static_prune", "dynamicvit", "avit", "diffrate")
NEEDS_TIMM_BLOCKS = "its search and merge run on timm's Attention"
NEEDS_TIMM_POOLING = "its head and halting read timm's pooling"
NO_CLASS_TOKEN = "no class token"

# (family, method): None where it runs, else the start of the refusal's message
SUPPORT: dict[tuple[str, str], str | None] = {(f, m): None for f in FAMILIES for m in METHODS}
SUPPORT.update(
    {
        ("siglip", "evit"): NO_CLASS_TOKEN,
        ("siglip", "diffrate"): "it needs one class token and no registers",
        ("dinov2", "diffrate"): "it needs one class token and no registers",
        **{(f, "diffrate"): NEEDS_TIMM_BLOCKS for f in ("eva", "beit")},
    }
)


def build(family: str) -> torch.nn.Module:
    _, name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    with torch.no_grad():  # zero-initialised biases and tables would hide a misplaced position
        for parameter in model.parameters():
            if parameter.abs().sum() == 0 or parameter.ndim == 1:
                parameter.normal_(0, 0.05)
    return model.eval()


def sparsify(method: str, model: torch.nn.Module, reduce: bool) -> torch.nn.Module:
    """The method at identity (reduce=False: it keeps every token) or reducing about a third of the FLOPs."""
    if method == "tome":
        return tokensparse.tome(model, r=3 if reduce else 0)
    if method == "diffrate":
        tokens = tokensparse.engine.num_patches(model) + 1
        counts = [tokens, tokens, 9, 5] if reduce else [tokens] * 4
        return tokensparse.diffrate(model, prune_kept=counts, merge_kept=counts)
    if method == "avit":
        return tokensparse.avit(model)
    ratio = 0.6 if reduce else 1.0
    return getattr(tokensparse, method)(model, keep_ratio=ratio, locations=LOCATIONS)


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


CASES = [case for case, refusal in SUPPORT.items() if refusal is None and case[1] != "avit"]


@pytest.mark.parametrize("family, method", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_identity_is_the_dense_model(family: str, method: str) -> None:
    dense = build(family)
    sparse = sparsify(method, copy.deepcopy(dense), reduce=False)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(sparse.forward_features(x), dense.forward_features(x), atol=1e-5, rtol=0)


REFUSED = [case for case, refusal in SUPPORT.items() if refusal is not None]


@pytest.mark.parametrize("family, method", REFUSED, ids=[f"{f}-{m}" for f, m in REFUSED])
def test_unsupported_pairs_are_refused_by_name(family: str, method: str) -> None:
    with pytest.raises(ValueError, match=SUPPORT[family, method]):
        sparsify(method, build(family), reduce=True)


def _cpu_sdpa_macs(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
SDPA_MAPPING = {_CPU_SDPA: _cpu_sdpa_macs} if _CPU_SDPA is not None else {}
RUNS = [case for case, refusal in SUPPORT.items() if refusal is None]


def torch_count(model: torch.nn.Module, image: torch.Tensor) -> float:
    """torch's multiply-adds of one forward (grad mode: torch's module tracker fails on timm's attention-pool
    head under no_grad)."""
    with FlopCounterMode(display=False, custom_mapping=SDPA_MAPPING) as counter:
        model(image)
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("family, method", RUNS, ids=[f"{f}-{m}" for f, m in RUNS])
def test_executed_flops_are_torchs_count_at_reduction(family: str, method: str) -> None:
    dense = build(family)
    sparse = sparsify(method, copy.deepcopy(dense), reduce=True)
    image = images(1)
    counted = torch_count(sparse, image)
    ours = flops_from_info(sparse).item()
    assert ours == pytest.approx(counted, rel=1e-9)
    assert model_flops(dense, image).item() == pytest.approx(torch_count(dense, image), rel=1e-9)
    if method != "avit":  # A-ViT's FLOPs follow its untrained halting; the others' settings reduce a third
        assert ours < 0.85 * model_flops(dense, image).item()


POSITIONAL = [(f, m) for f in ("eva", "beit", "siglip", "dinov2") for m in ("static_prune", "random_prune")]


@pytest.mark.parametrize("family, method", POSITIONAL, ids=[f"{f}-{m}" for f, m in POSITIONAL])
def test_kept_tokens_carry_their_positions(family: str, method: str) -> None:
    """Gathering the kept tokens (inference) gives what masking the dropped ones gives (training), token
    by token: the rotary rows / relative-position bias / pool weights went with each kept token."""
    if method == "random_prune":  # one draw, the same in both forwards
        model = tokensparse.random_prune(build(family), keep_ratio=0.6, locations=LOCATIONS, seed=0)
    else:
        model = sparsify(method, build(family), reduce=True)
    x = images()
    with torch.no_grad():
        gathered = run(model, x, regime="gather")
        kept = tokensparse.sparsity_info(model).patch_index
        masked = run(model, x, regime="mask")
    prefix = model.num_prefix_tokens
    rows = masked[:, prefix:].gather(1, kept.unsqueeze(-1).expand(-1, -1, masked.shape[-1]))
    torch.testing.assert_close(rows, gathered[:, prefix:], atol=1e-5, rtol=0)
    torch.testing.assert_close(masked[:, :prefix], gathered[:, :prefix], atol=1e-5, rtol=0)
    with torch.no_grad():  # the head (average or attention pool) reads the kept tokens only, in both forms
        pooled_gathered = model.forward_head(run(model, x, regime="gather"))
        pooled_masked = model.forward_head(run(model, x, regime="mask"))
    torch.testing.assert_close(pooled_masked, pooled_gathered, atol=1e-5, rtol=0)


def test_a_merged_token_counts_by_its_size_in_an_attention_pool() -> None:
    model = tokensparse.tome(build("siglip"), r=3)
    x = images()
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        size = tokensparse.tome_stats(model).token_size
        unweighted = model.attn_pool(features)
        weighted = model.attn_pool(features, attn_mask=size.log()[:, None, None, :])
    assert size.max() > 1
    torch.testing.assert_close(pooled, weighted, atol=1e-6, rtol=0)
    assert not torch.allclose(pooled, unweighted, atol=1e-4)


def test_unsupported_architectures_are_named() -> None:
    with pytest.raises(ValueError, match="does not run on a ResNet; it supports timm VisionTransformer"):
        tokensparse.tome(timm.create_model("resnet10t"))
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    with pytest.raises(ValueError, match="does not run on a SwinTransformer"):
        tokensparse.evit(swin)
    eva = build("eva")
    eva.blocks[1].attn = torch.nn.Identity()
    with pytest.raises(ValueError, match="Identity"):
        tokensparse.tome(eva)


DENSE = [(f, m) for f in ("deit", "eva", "beit") for m in ("tome", "evit", "static_prune", "dynamicvit")]
DENSE = [case for case in DENSE if SUPPORT[case] is None]


@pytest.mark.parametrize("family, method", DENSE, ids=[f"{f}-{m}" for f, m in DENSE])
def test_dense_features_are_the_full_grid(family: str, method: str) -> None:
    dense = build(family)
    x = images()
    prefix = dense.num_prefix_tokens
    with torch.no_grad():
        reference = dense.forward_features(x)[:, prefix:]
        at_identity = tokensparse.dense_features(sparsify(method, copy.deepcopy(dense), reduce=False), x)
        torch.testing.assert_close(at_identity, reference, atol=1e-5, rtol=0)

        sparse = sparsify(method, copy.deepcopy(dense), reduce=True)
        full = tokensparse.dense_features(sparse, x)
        info = tokensparse.sparsity_info(sparse)
    assert full.shape == reference.shape
    kept = info.patch_index  # the final tokens' patches: each is its own token's features
    real = kept < full.shape[1]
    rows = full.gather(1, kept.clamp(max=full.shape[1] - 1).unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(rows[real], info.patch_tokens[real], atol=1e-6, rtol=0)
    if method == "tome":  # every patch carries the features of the token it was merged into
        group = tokensparse.tome_stats(sparse).token_group[:, prefix:] - prefix
        expected = info.patch_tokens.gather(1, group.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
        torch.testing.assert_close(full, expected, atol=0, rtol=0)


def test_a_pruned_patch_keeps_the_features_it_had_when_dropped() -> None:
    """Static pruning before block 1 and 2: a patch dropped before block 1 holds block 0's output (final norm
    applied), computed here with the dense model's own blocks."""
    dense = build("deit")
    sparse = tokensparse.static_prune(copy.deepcopy(dense), keep_ratio=0.6, locations=LOCATIONS)
    x = images()
    with torch.no_grad():
        full = tokensparse.dense_features(sparse, x)
        first_stage = tokensparse.sparsity_info(sparse).kept_index[0]
        after_block0 = dense.blocks[0](dense.norm_pre(dense._pos_embed(dense.patch_embed(x))))
    dropped = torch.ones(full.shape[:2], dtype=torch.bool).scatter_(1, first_stage, False)
    expected = dense.norm(after_block0)[:, dense.num_prefix_tokens :]
    assert dropped.any()
    torch.testing.assert_close(full[dropped], expected[dropped], atol=1e-5, rtol=0)


def test_readme_model_table_is_generated_from_these_tests() -> None:
    pytest.importorskip("transformers")  # the table's Hugging Face rows come from test_hf_backbones
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("model_table", root / "scripts" / "model_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (root / "README.md").read_text()
    start, end = readme.index(module.BEGIN) + len(module.BEGIN), readme.index(module.END)
    assert readme[start:end].strip() == module.table(), "run: python scripts/model_table.py --write"


@pytest.mark.parametrize("method", ["tome", "evit", "dynamicvit"])
def test_bench_cli_times_an_eva(method: str, capsys) -> None:
    import json

    from tokensparse.cli import main as cli_main

    args = ["bench", "--method", method, "--model", "eva02_tiny_patch14_224", "--img-size", "56"]
    args += ["--batch-size", "2", "--rounds", "1", "--warmup", "0", "--json"]
    assert cli_main(args) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[0]["method"] == "dense" and {row["method"] for row in rows[1:]} == {method}
    assert min(row["gflops"] for row in rows[1:]) < 0.7 * rows[0]["gflops"]


def test_bench_cli_refuses_diffrate_on_eva_by_name(capsys) -> None:
    from tokensparse.cli import main as cli_main

    args = ["bench", "--method", "diffrate", "--model", "eva02_tiny_patch14_224", "--img-size", "56"]
    assert cli_main([*args, "--rounds", "1"]) == 2
    assert "DiffRate needs a timm VisionTransformer" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["deit", "eva", "beit", "siglip"])
def test_a_vit_packed_inference_is_its_training_form(family: str) -> None:
    """A-ViT's inference packs the live tokens of all images (padded per length bucket); each packed token
    keeps its rotary rows / relative-position bias: the same logits and depths as the masked form."""
    model = tokensparse.avit(build(family), gate_scale=10.0, gate_center=0.0, early_exit=False)
    x = torch.cat([images(3), images(3) * 0.2, images(2) * 4])
    with torch.no_grad():
        masked = model.forward_head(run(model, x, regime="mask"))
        mask_depth = tokensparse.avit_stats(model).token_depth
        gathered = model.forward_head(run(model, x, regime="gather"))
        depth = tokensparse.avit_stats(model).token_depth
    assert torch.equal(depth, mask_depth)
    assert len(set(depth.sum(1).tolist())) > 2 and depth.min() < 4  # images halt at their own depths
    torch.testing.assert_close(gathered, masked, atol=1e-5, rtol=0)
