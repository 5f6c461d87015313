"""bf16 inference (A-ViT) and the DynamicViT predictor bound of the benchmark."""

from __future__ import annotations

import json

import torch
from conftest import tiny

import tokensparse
from tokensparse.bench import bench_dynamicvit, predictor_bound_forward, truncated_forward
from tokensparse.cli import main as cli_main


def test_predictor_bound_runs_the_predictors_and_returns_the_truncated_logits():
    model = tokensparse.dynamicvit(tiny(depth=4, img_size=32), locations=(1, 2, 3)).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(images)
    counts = tokensparse.sparsity_info(model).tokens_per_block[0].tolist()
    seen = []
    for predictor in model.score_predictor:
        predictor.keep_score = (lambda f: lambda x: seen.append(x.shape[1]) or f(x))(predictor.keep_score)
    logits = predictor_bound_forward(model, model.score_predictor, images, counts)
    # Each predictor sees the patch tokens present before its location: all 16, then the last stage's kept.
    assert seen == [16, counts[1] - 1, counts[2] - 1] and counts[1] - 1 == int(16 * 0.7)
    assert torch.allclose(logits, truncated_forward(model, images, counts))


def test_truncated_forward_stops_where_the_image_exits():
    """A count of 0 (A-ViT's early exit) runs no later block: the A-ViT bound at batch 1."""
    torch.manual_seed(0)
    model = tiny(depth=4, img_size=32).eval()
    images = torch.randn(1, 3, 32, 32)
    ran = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, a, out, i=i: ran.append((i, out.shape[1])))
    with torch.no_grad():
        logits = truncated_forward(model, images, [17, 9, 0, 0])
        assert ran == [(0, 17), (1, 9)]  # blocks 2 and 3 never ran
        x = model.blocks[1](model.blocks[0](tokensparse.engine.embed(model, images))[:, :9])
        expected = model.forward_head(model.norm(x))
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)


def test_bench_reports_the_share_of_the_predictor_bound():
    result = bench_dynamicvit(
        tiny(depth=4, img_size=32), keep_ratios=[0.7], batch_size=2, rounds=1, warmup=0, progress=False
    )
    row = result.to_dict()["rows"][1]
    assert row["method"] == "dynamicvit" and row["predictor_bound_speedup"] > 0
    assert row["share_of_predictor_bound"] == row["speedup"] / row["predictor_bound_speedup"]
    assert "share of predictor bound" in result.table()


def test_avit_runs_in_bfloat16_and_agrees_with_float32():
    torch.manual_seed(0)
    model = tokensparse.avit(tiny(depth=4, img_size=32), gate_center=1000.0).eval()  # no token halts early
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        got = model.to(torch.bfloat16)(images.bfloat16())
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), expected, atol=0.05 * expected.abs().max().item(), rtol=0)
    torch.manual_seed(0)
    halting = tokensparse.avit(tiny(depth=4, img_size=32), gate_center=2.0).eval()
    with torch.no_grad():
        halting(images)
        depth32 = tokensparse.avit_stats(halting).token_depth
        out = halting.to(torch.bfloat16)(images.bfloat16())
        depth16 = tokensparse.avit_stats(halting).token_depth
    assert torch.isfinite(out.float()).all()
    assert (depth16 == depth32).float().mean() > 0.8  # halting decisions mostly the same in bf16


def test_bench_cli_avit_in_bfloat16(capsys):
    args = ["bench", "--method", "avit", "--model", "vit_tiny_patch16_224", "--img-size", "32"]
    args += ["--batch-size", "2", "--rounds", "1", "--warmup", "0", "--dtype", "bfloat16", "--json"]
    assert cli_main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "bfloat16"
    assert [row["method"] for row in result["rows"]] == ["dense", "avit"]
