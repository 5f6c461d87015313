"""A method added from outside the package: a toy policy registered here, and nowhere else, runs
through the engine, train, evaluate, gflops, bench and the CLI (the README's "Adding a method")."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torch.nn as nn
from conftest import tiny

import tokensparse
from tokensparse.bench import bench_dynamicvit
from tokensparse.cli import main as cli_main
from tokensparse.data import fashion_mnist_dir
from tokensparse.engine import SparseInfo, TokenPolicy, TokenState, check_vit, no_extra_flops, run, sparsify
from tokensparse.flops import backbone_flops
from tokensparse.policies.registry import Method, get_method, method_names, register_method, unregister_method
from tokensparse.train import TrainConfig, train


class EveryOtherPatch(TokenPolicy, nn.Module):
    """Before block `location`, keep the patches of even index (0, 2, 4, ...) and drop the others."""

    method = "every-other"

    def __init__(self, location: int):
        super().__init__()
        self.location = location

    def before_block(self, index: int, state: TokenState) -> None:
        if index != self.location:
            return
        count = (state.num_patches + 1) // 2
        if state.regime == "gather":
            state.keep_top(count, lambda: (state.patch_index % 2 == 0).float())
        else:
            every_patch = torch.arange(state.num_patches, device=state.x.device).expand(state.batch_size, -1)
            state.mask_top(count, (every_patch % 2 == 0).float())

    def extra_flops(self, info: SparseInfo, num_patches: int) -> torch.Tensor:
        return no_extra_flops(info)  # the ranking reads no token: no multiply-add of its own


def every_other_patch(model: nn.Module, location: int = 1) -> nn.Module:
    check_vit(model)
    return sparsify(model, EveryOtherPatch(location), "every_other")


@pytest.fixture
def toy_method():
    method = register_method(
        Method(
            "every-other",
            sparsify=lambda model, cfg: every_other_patch(model),
            recipe={"distill_weight": 0.0},
            settings=("distill_weight",),
        )
    )
    yield method
    unregister_method("every-other")


def test_registration_is_checked_and_undone(toy_method):
    assert method_names()[-1] == "every-other" and get_method("every-other") is toy_method
    with pytest.raises(ValueError, match="registered already"):
        register_method(Method("every-other"))
    unregister_method("every-other")
    with pytest.raises(ValueError, match="method must be one of .*'dynamicvit'.*got 'every-other'"):
        TrainConfig(method="every-other").resolved()
    register_method(toy_method)


def test_engine_runs_the_toy_policy_in_both_regimes(toy_method):
    model = every_other_patch(tiny(depth=4)).eval()  # 8x8 patches of 64x64 images
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        gathered = model.forward_head(run(model, images, regime="gather"))
        info = tokensparse.sparsity_info(model)
        assert info.kept_index[0].tolist() == [list(range(0, 64, 2))] * 3
        assert info.tokens_per_block[0].tolist() == [65, 33, 33, 33]
        masked = model.forward_head(run(model, images, regime="mask"))
    torch.testing.assert_close(masked, gathered, atol=1e-5, rtol=0)
    assert tokensparse.sparsity_info(model).keep_mask[0].tolist() == [1.0, 0.0] * 32


def test_gflops_count_what_the_toy_policy_ran(toy_method):
    dense = tiny(depth=4)
    expected = backbone_flops(dense, torch.tensor([[65, 33, 33, 33]]), 64).item() / 1e9
    sparse = every_other_patch(tiny(depth=4)).eval()
    assert tokensparse.gflops(sparse) == pytest.approx(expected, rel=1e-12)
    assert tokensparse.gflops(sparse) < tokensparse.gflops(dense)


def test_bench_times_the_registered_method(toy_method):
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2)
    result = bench_dynamicvit(
        model, keep_ratios=[None], method="every-other", batch_size=2, rounds=1, warmup=0, progress=False
    )
    assert [(row.method, row.setting) for row in result.rows] == [("dense", "-"), ("every-other", "-")]
    assert result.rows[1].gflops < result.rows[0].gflops


@pytest.mark.skipif(
    not any((fashion_mnist_dir() / f"t10k-labels-idx1-ubyte{s}").exists() for s in ("", ".gz")),
    reason="Fashion-MNIST is missing: apt-get install dataset-fashion-mnist",
)
def test_train_and_evaluate_the_registered_method(toy_method, tmp_path, capsys):
    base = dict(
        model="vit_tiny_patch16_224",
        model_kwargs={"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3},
        train_limit=32,
        val_limit=16,
        batch_size=16,
        warmup_epochs=0,
        epochs=1,
    )
    dense = train(TrainConfig(method="dense", output=str(tmp_path / "dense"), **base))
    out = tmp_path / "toy"
    last = train(
        TrainConfig(
            method="every-other",
            checkpoint=str(tmp_path / "dense" / "model.safetensors"),
            output=str(out),
            **base,
        )
    )
    assert json.loads((out / "config.json").read_text())["distill_weight"] == 0.0  # the registered recipe
    assert last["val_gflops"] < dense["val_gflops"] and math.isfinite(last["train_loss"])
    assert cli_main(["eval", str(out), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["top1"] == pytest.approx(last["val_top1"])
    assert evaluated["gflops"] == pytest.approx(last["val_gflops"])
