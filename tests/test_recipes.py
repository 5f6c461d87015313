"""The authors' training recipes are the defaults, each visible in config.json and overridable."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

import tokensparse
from tokensparse.cli import main as cli_main
from tokensparse.data import fashion_mnist_dir
from tokensparse.policies.dynamicvit import ScorePredictor
from tokensparse.train import METHOD_DEFAULTS, TrainConfig, apply_fixed_epochs, parameter_groups, train

TINY = {"patch_size": 8, "depth": 4, "embed_dim": 48, "num_heads": 3}
BASE = dict(
    model="vit_tiny_patch16_224",
    model_kwargs=TINY,
    train_limit=64,
    val_limit=32,
    batch_size=32,
    warmup_epochs=0,
)
needs_data = pytest.mark.skipif(
    not any((fashion_mnist_dir() / f"t10k-labels-idx1-ubyte{s}").exists() for s in ("", ".gz")),
    reason="Fashion-MNIST is missing: apt-get install dataset-fashion-mnist",
)


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10, **TINY)


def test_method_defaults_are_the_authors_recipes() -> None:
    dvit = TrainConfig(method="dynamicvit").resolved()
    assert (dvit.token_distill, dvit.distill_weight, dvit.ratio_weight) == ("mse", 0.5, 2.0)
    assert (dvit.backbone_lr_scale, dvit.backbone_fixed_epochs, dvit.freeze_embeddings) == (0.01, 5, True)
    assert dvit.keep_ratio == 0.7 and dvit.gate_center is None and dvit.tome_r is None
    avit = TrainConfig(method="avit").resolved()
    assert avit.distill_weight == 0.0 and avit.straight_through_zeroing is True
    assert (avit.gate_scale, avit.gate_center, avit.ponder_weight, avit.prior_weight) == (
        10.0,
        30.0,
        5e-4,
        1e-3,
    )
    assert (avit.backbone_lr_scale, avit.backbone_fixed_epochs, avit.freeze_embeddings) == (1.0, 0, False)
    assert avit.keep_ratio is None
    # An explicit setting wins over the method's default.
    kl = TrainConfig(method="dynamicvit", token_distill="kl", backbone_fixed_epochs=0).resolved()
    assert (kl.token_distill, kl.backbone_fixed_epochs) == ("kl", 0)
    spatial = TrainConfig(method="dynamicspatial").resolved()  # the authors' ConvNeXt / Swin runs
    assert (spatial.keep_ratio, spatial.ratio_weight, spatial.distill_weight) == (0.7, 10.0, 0.5)
    assert (spatial.backbone_lr_scale, spatial.backbone_fixed_epochs, spatial.freeze_embeddings) == (
        0.2,
        5,
        False,
    )
    assert set(METHOD_DEFAULTS) == {
        "dense",
        "dynamicvit",
        "avit",
        "evit",
        "tome",
        "random",
        "static",
        "dynamicspatial",
        "diffrate",
    }
    search = TrainConfig(method="diffrate", target_gflops=1.0).resolved()  # DiffRate's README search
    assert (search.epochs, search.lr, search.min_lr, search.weight_decay, search.warmup_epochs) == (
        3,
        0.01,
        0.001,
        0.0,
        0,
    )
    assert (search.mixup, search.cutmix, search.smoothing, search.distill_weight) == (0.8, 1.0, 0.1, 0.0)
    assert search.method_settings == {"granularity": 4, "flop_weight": 5.0}
    assert TrainConfig(method="diffrate", epochs=5, lr=0.02).resolved().epochs == 5  # what you set stays


@pytest.mark.parametrize(
    ("method", "setting", "flag"),
    [
        ("dynamicvit", {"gate_center": 3.0}, "--gate-center applies to --method avit, not dynamicvit"),
        ("avit", {"keep_ratio": 0.5}, "--keep-ratio applies to --method dynamicvit / evit / random / static"),
        ("dense", {"distill_weight": 0.5}, "--distill-weight applies to"),
        ("evit", {"tome_r": 4}, "--tome-r applies to --method tome"),
        ("tome", {"token_distill": "kl"}, "--token-distill applies to --method dynamicvit"),
    ],
)
def test_a_setting_of_another_method_is_an_error_that_names_it(method, setting, flag) -> None:
    with pytest.raises(ValueError, match=flag):
        TrainConfig(method=method, **setting).validate()


def test_cli_rejects_a_foreign_flag_with_exit_2(capsys, tmp_path) -> None:
    code = cli_main(
        ["train", "--method", "dynamicvit", "--gate-center", "3", "--output", str(tmp_path / "r")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "--gate-center applies to --method avit" in err and "not dynamicvit" in err
    assert not (tmp_path / "r").exists()


def test_parameter_groups_follow_dynamicvits_optim_factory() -> None:
    model = tokensparse.dynamicvit(tiny_vit(), keep_ratio=0.7, locations=[1, 2, 3])
    cfg = TrainConfig(method="dynamicvit", weight_decay=0.05).resolved()
    groups = parameter_groups(model, cfg)
    by_name = {g["group"]: g for g in groups}
    assert set(by_name) == {"policy", "policy_no_decay", "backbone", "backbone_no_decay"}
    predictor = {id(p) for p in model.score_predictor.parameters()}
    assert {id(p) for g in ("policy", "policy_no_decay") for p in by_name[g]["params"]} == predictor
    for name in ("policy", "policy_no_decay"):
        assert (by_name[name]["lr_scale"], by_name[name]["fixed_epochs"]) == (1.0, 0)
    for name in ("backbone", "backbone_no_decay"):
        assert (by_name[name]["lr_scale"], by_name[name]["fixed_epochs"]) == (0.01, 5)
    assert by_name["backbone"]["weight_decay"] == 0.05 and by_name["backbone_no_decay"]["weight_decay"] == 0
    assert by_name["policy_no_decay"]["weight_decay"] == 0
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    assert id(model.cls_token) not in in_optimizer and id(model.pos_embed) not in in_optimizer
    assert not model.cls_token.requires_grad and not model.pos_embed.requires_grad
    assert all(p.ndim > 1 for p in by_name["backbone"]["params"])  # biases and norms never decay
    optimizer = create_optimizer_v2(groups, opt="adamw", lr=1e-3, weight_decay=0.05)
    apply_fixed_epochs(optimizer, epoch=4)
    lrs = {g["group"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["backbone"] == 0.0 and lrs["policy"] == 1e-3
    # A-ViT trains every parameter, cls_token and pos_embed included.
    avit_model = tokensparse.avit(tiny_vit())
    groups = parameter_groups(avit_model, TrainConfig(method="avit").resolved())
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in avit_model.parameters()}


@needs_data
def test_dynamicvit_run_records_its_recipe_and_fixes_the_backbone(tmp_path) -> None:
    dense = tmp_path / "dense.safetensors"
    tokensparse.save_checkpoint(tiny_vit(), dense)
    out = tmp_path / "dvit"
    train(
        TrainConfig(
            method="dynamicvit",
            checkpoint=str(dense),
            locations=[1, 2, 3],
            epochs=2,
            backbone_fixed_epochs=1,
            lr=1e-3,
            output=str(out),
            **BASE,
        )
    )
    config = json.loads((out / "config.json").read_text())
    assert config["token_distill"] == "mse" and config["freeze_embeddings"] is True
    assert config["backbone_lr_scale"] == 0.01 and config["backbone_fixed_epochs"] == 1
    assert config["gate_center"] is None
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["lr_groups"]["backbone"] == 0.0 and lines[0]["lr_groups"]["policy"] > 0
    assert lines[1]["lr_groups"]["backbone"] > 0
    assert lines[0]["lr"] == lines[0]["lr_groups"]["policy"]  # the logged lr is the predictors'
    start = tokensparse.load_checkpoint(tiny_vit(), dense).state_dict()
    after_one = tokensparse.checkpoints.read_state_dict(out / "checkpoints" / "epoch0000.safetensors")
    final = tokensparse.checkpoints.read_state_dict(out / "model.safetensors")
    assert torch.equal(after_one["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])  # lr 0
    assert not torch.equal(final["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])
    assert torch.equal(final["pos_embed"], start["pos_embed"]) and torch.equal(
        final["cls_token"], start["cls_token"]
    )
    assert not torch.equal(
        after_one["score_predictor.0.in_conv.1.weight"],
        final["score_predictor.0.in_conv.1.weight"],
    )


def test_untrained_predictor_is_initialised_as_the_authors_and_scores_tokens_alike() -> None:
    torch.manual_seed(0)
    predictor = ScorePredictor(192)
    for layer in (predictor.in_conv[1], predictor.out_conv[0], predictor.out_conv[2], predictor.out_conv[4]):
        assert abs(layer.weight.std().item() - 0.02) < 0.003 and not layer.bias.any()
    log_probs = predictor(torch.randn(2, 50, 192))
    assert (log_probs - math.log(0.5)).abs().max() < 0.01  # no ranking before training


def test_predictor_is_finite_when_an_images_keep_mask_empties() -> None:
    torch.manual_seed(0)
    predictor = ScorePredictor(48)
    x = torch.randn(3, 16, 48)
    keep = torch.ones(3, 16, 1)
    keep[1] = 0  # image 1 kept nothing
    keep[2, 5:] = 0
    out = predictor(x, keep)
    assert torch.isfinite(out).all()
    # Where the authors' division is finite, the same numbers as theirs.
    h = predictor.in_conv(x)
    local, image = h[..., :24], h[..., 24:]
    authors_mean = (image * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True)
    expected = predictor.out_conv(torch.cat([local, authors_mean.expand_as(local)], -1))
    assert torch.isnan(expected[1]).all()
    torch.testing.assert_close(out[[0, 2]], expected[[0, 2]], rtol=0, atol=0)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in predictor.parameters())


@needs_data
def test_dynamicvit_on_16_patches_never_skips_a_step(tmp_path) -> None:
    """vit_tiny_patch16_224 on 64x64 canvases: 16 patches, so keep masks empty often (rho 0.5: 8, 4, 2)."""
    out = tmp_path / "dvit16"
    metrics = train(
        TrainConfig(
            method="dynamicvit",
            model="vit_tiny_patch16_224",
            model_kwargs={"depth": 4, "embed_dim": 48, "num_heads": 3},
            keep_ratio=0.5,
            locations=[1, 2, 3],
            train_limit=256,
            val_limit=32,
            batch_size=16,
            epochs=1,
            warmup_epochs=0,
            lr=1e-2,
            output=str(out),
        )
    )
    assert metrics["nan_skipped"] == 0 and math.isfinite(metrics["train_loss"])


def test_a_short_run_scales_its_schedule_and_says_so() -> None:
    given = TrainConfig(method="dynamicvit", epochs=1)  # warm-up 5 and DynamicViT's frozen 5 by default
    cfg = given.resolved()
    assert (cfg.warmup_epochs, cfg.backbone_fixed_epochs) == (0, 0)  # --epochs 1 trained nothing before
    notes = given.schedule_notes(cfg)
    assert len(notes) == 2 and "--backbone-fixed-epochs 5 is not shorter than --epochs 1; using 0" in notes[1]
    long = TrainConfig(method="dynamicvit", epochs=30)
    assert long.resolved().backbone_fixed_epochs == 5 and not long.schedule_notes(long.resolved())
    with pytest.raises(ValueError, match="--backbone-fixed-epochs 3 is not shorter than --epochs 2"):
        TrainConfig(method="dynamicvit", epochs=2, backbone_fixed_epochs=3).resolved()
