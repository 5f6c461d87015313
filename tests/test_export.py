"""ONNX export (checked with onnxruntime) and torch.compile(fullgraph=True) of every method with fixed
token counts; A-ViT's refusal. Export and compile are slow on CPU: the tests use a 4-block 32x32 model
and carry the `compile` marker (`pytest -m "not compile"` skips them)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny

import tokensparse
from tokensparse.cli import main
from tokensparse.export import export_onnx, run_onnx

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

LOCATIONS = (1, 2, 3)
METHODS = {
    "dense": lambda m: m,
    "dynamicvit": lambda m: tokensparse.dynamicvit(m, keep_ratio=0.7, locations=LOCATIONS),
    "evit": lambda m: tokensparse.evit(m, keep_ratio=0.7, locations=LOCATIONS),
    "random": lambda m: tokensparse.random_prune(m, keep_ratio=0.7, locations=LOCATIONS, seed=3),
    "static": lambda m: tokensparse.static_prune(m, keep_ratio=0.7, locations=LOCATIONS),
    "tome": lambda m: tokensparse.tome(m, r=3),
    "diffrate": lambda m: tokensparse.diffrate(m, [17, 15, 13, 11], [17, 13, 10, 8]),
}


def small(method: str) -> torch.nn.Module:
    model = METHODS[method](tiny(depth=4, img_size=32)).eval()
    if method == "dynamicvit":  # random predictors: make their ranking differ from the patch order
        torch.manual_seed(1)
        for p in model.score_predictor.parameters():
            p.data.normal_(0, 0.5)
    return model


@pytest.mark.compile
@pytest.mark.parametrize("method", list(METHODS))
def test_onnxruntime_matches_eager(method, tmp_path):
    model = small(method)
    result = export_onnx(model, tmp_path / f"{method}.onnx", batch_size=2)
    assert result.method == method and result.max_abs_diff <= 1e-4
    # Fresh images, not the ones export verified on: logits and kept patches agree with eager PyTorch.
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    outputs = run_onnx(result.path, images)
    with torch.no_grad():
        logits = model(images)
    assert torch.allclose(torch.from_numpy(outputs[0]), logits, atol=1e-4, rtol=0)
    if method == "dense":
        assert result.output_names == ("logits",) and len(outputs) == 1
        return
    assert result.same_patches is True
    patch_index = tokensparse.sparsity_info(model).patch_index
    assert torch.equal(torch.from_numpy(outputs[1]), patch_index)
    if method in ("dynamicvit", "static", "random"):  # DynamicViT's counts (EViT: the authors' ceil counts)
        assert patch_index.shape == (2, int(16 * 0.7**3))
    if method in ("dynamicvit", "evit"):  # data-dependent choices: the two images keep different patches
        assert not torch.equal(patch_index[0], patch_index[1])


@pytest.mark.compile
def test_export_cli_writes_a_checked_file(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    argv = ["export", str(out), "--model", "deit_tiny_patch16_224", "--method", "static", "--img-size", "64"]
    assert main([*argv, "--keep-ratio", "0.7", "--num-classes", "5"]) == 0
    assert out.is_file()
    printed = capsys.readouterr().out
    assert "same kept patches: True" in printed and "static" in printed


def test_avit_refuses_with_the_reason(tmp_path):
    model = tokensparse.avit(tiny(depth=2, img_size=32)).eval()
    with pytest.raises(ValueError, match="data-dependent shapes"):
        export_onnx(model, tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()


def test_unseeded_random_refuses(tmp_path):
    model = tokensparse.random_prune(tiny(depth=4, img_size=32), locations=LOCATIONS).eval()
    with pytest.raises(ValueError, match="seed"):
        export_onnx(model, tmp_path / "r.onnx")


def test_fixed_draws_are_the_seeded_draws():
    model = small("random")
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        model(images)
        eager = tokensparse.sparsity_info(model).patch_index
        model.random_prune.fix_draws(3, 16)
        model(images)
        fixed = tokensparse.sparsity_info(model).patch_index
        model.random_prune.fix_draws(None)
    assert torch.equal(eager, fixed)


@pytest.mark.compile
@pytest.mark.parametrize("method", list(METHODS))
def test_compile_fullgraph_captures_every_method(method):
    """fullgraph=True fails on any graph break; aot_eager keeps the check to graph capture (fast)."""
    torch._dynamo.reset()
    model = small(method)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        if method == "random":  # a seeded torch.Generator cannot be traced: fix the seed's draws first
            model.random_prune.fix_draws(2, 16)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(images)
    assert torch.allclose(compiled, expected, atol=1e-5, rtol=0)


@pytest.mark.compile
def test_dynamicvit_compiles_with_inductor():
    torch._dynamo.reset()
    model = small("dynamicvit")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        compiled = torch.compile(model, fullgraph=True)(images)
    assert torch.allclose(compiled, expected, atol=1e-4, rtol=0)


def test_a_policy_says_itself_why_it_cannot_be_exported(tmp_path):
    """export asks the policy (`export_refusal`), not its method's name."""
    model = tokensparse.static_prune(tiny(), keep_ratio=0.7).eval()
    policy = tokensparse.get_policy(model)
    policy.export_refusal = lambda: "this policy keeps a Python-side cache"
    with pytest.raises(ValueError, match="keeps a Python-side cache"):
        tokensparse.export_onnx(model, tmp_path / "m.onnx", batch_size=1)
