"""Dynamic ConvNeXt / Swin against the authors' code (tests/golden/dynconv_official.safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import tokensparse
from tokensparse.policies.dynconvnext import authors_convnext_state_dict
from tokensparse.policies.dynswin import authors_swin_state_dict

GOLDEN = Path(__file__).resolve().parent / "golden" / "dynconv_official.safetensors"


@pytest.fixture(scope="module")
def golden() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(GOLDEN), "pt") as f:
        meta = f.metadata()
    return load_file(str(GOLDEN)), meta


def part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def tiny_convnext(cfg: dict) -> torch.nn.Module:
    return timm.create_model(
        "convnext_tiny",
        pretrained=False,
        depths=cfg["depths"],
        dims=cfg["dims"],
        num_classes=cfg["num_classes"],
    )


def tiny_swin(cfg: dict) -> torch.nn.Module:
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=cfg["img_size"],
        patch_size=cfg["patch_size"],
        embed_dim=cfg["embed_dim"],
        depths=cfg["depths"],
        num_heads=cfg["num_heads"],
        window_size=cfg["window_size"],
        num_classes=cfg["num_classes"],
        drop_path_rate=0.0,  # timm's SwinTransformer defaults to 0.1, the authors' golden run used 0
    )


def authors_model(arch: str, golden) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Our dynamic model of `arch` with the authors' golden weights, loaded through the key mapping."""
    tensors, meta = golden
    cfg = json.loads(meta[arch])
    keep_ratio = float(meta["keep_ratio"])
    if arch == "convnext":
        model = tokensparse.dynamic_convnext(tiny_convnext(cfg), keep_ratio=keep_ratio)
        convert = authors_convnext_state_dict
    else:
        model = tokensparse.dynamic_swin(tiny_swin(cfg), keep_ratio=keep_ratio)
        convert = authors_swin_state_dict
    state = {k: v.float() for k, v in part(tensors, f"{arch}.state.").items()}
    model.load_state_dict(convert(state, model), strict=True)
    return model, part(tensors, f"{arch}.")


@pytest.mark.parametrize("arch", ["convnext", "swin"])
def test_eval_matches_authors(arch: str, golden) -> None:
    model, ref = authors_model(arch, golden)
    with torch.no_grad():
        logits = model.eval()(ref["images"])
    torch.testing.assert_close(logits, ref["eval_logits"], atol=1e-4, rtol=0)
    info = tokensparse.dynamic_spatial_info(model)
    assert len(info.kept_index) == 3
    for s, kept in enumerate(info.kept_index):
        assert torch.equal(kept.sort(dim=1).values, ref[f"eval_kept.stage{s}"]), f"stage {s}"
        decisions = info.keep_decisions[s]
        assert decisions.sum(1).tolist() == [kept.shape[1]] * kept.shape[0]


@pytest.mark.parametrize("arch", ["convnext", "swin"])
def test_training_two_streams_match_authors(arch: str, golden) -> None:
    """Same seed, same Gumbel draws: the two-stream training forward gives their logits and decisions."""
    model, ref = authors_model(arch, golden)
    model.train()
    torch.manual_seed(int(golden[1]["train_seed"]))
    logits = model(ref["images"])
    torch.testing.assert_close(logits, ref["train_logits"], atol=1e-4, rtol=0)
    info = tokensparse.dynamic_spatial_info(model)
    for s, keep in enumerate(info.keep_decisions):
        assert torch.equal(keep.detach(), ref[f"train_decision.stage{s}"]), f"stage {s}"
    torch.testing.assert_close(info.features, ref["train_features"], atol=1e-4, rtol=0)
    logits.sum().backward()
    for name in ("score_predictor.0.out_conv.4.weight", "blocks.4.fast_path.1.weight"):
        stage = model.stages[2] if arch == "convnext" else model.layers[2]
        grad = stage.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ["convnext", "swin"])
def test_gather_equals_two_streams_under_one_decision(arch: str, golden, monkeypatch) -> None:
    """With one fixed decision at every predictor, inference (gathered paths) and training (two streams
    mixed by the mask) compute the same function. (With decisions that change between predictors they
    differ, in the authors' code too: a stream carries its own values at positions it did not own.)"""
    from tokensparse.policies import dynspatial

    model, ref = authors_model(arch, golden)
    images = ref["images"]
    batch = images.shape[0]
    grid = 36 if arch == "convnext" else 64
    g = torch.Generator().manual_seed(0)
    order = torch.stack([torch.randperm(grid, generator=g) for _ in range(batch)])
    kept, rest = order[:, : grid // 2], order[:, grid // 2 :]
    keep = torch.zeros(batch, grid).scatter_(1, kept, 1.0)
    monkeypatch.setattr(dynspatial, "rank_positions", lambda score, ratio: (kept, rest))
    monkeypatch.setattr(dynspatial, "gumbel_keep", lambda log_probs, channels_first: keep)
    with torch.no_grad():
        gathered = model.eval()(images)
        masked = model.train()(images)
    torch.testing.assert_close(masked, gathered, atol=1e-5, rtol=0)
    assert (gathered - ref["eval_logits"]).abs().max() > 1e-3  # the fixed decision did take effect


def test_timm_keys_unchanged_and_dense_forward_untouched() -> None:
    torch.manual_seed(0)
    model = atto().eval()
    images = torch.randn(2, 3, 64, 64)
    before = dict(model.state_dict())
    with torch.no_grad():
        dense = model(images)
    tokensparse.dynamic_convnext(model, keep_ratio=1.0)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    new = set(after) - set(before)
    assert new and all(
        k.startswith("stages.2.") and ("score_predictor" in k or "fast_path" in k) for k in new
    )
    # keep_ratio 1.0 sends every position through the MLP at the first predictor: dense output then.
    # (The later predictors keep 0.8 and 0.6 of them, so only compare through the timm block forward.)
    block = model.stages[2].blocks[1]
    x = torch.randn(2, 32, 4, 4)
    everything = (torch.arange(16).expand(2, 16), torch.empty(2, 0, dtype=torch.long))
    torch.testing.assert_close(block.forward_split(x, everything), block(x), atol=1e-6, rtol=0)
    assert dense.shape == model(images).shape


def test_load_checkpoint_reads_authors_layout(tmp_path: Path, golden) -> None:
    from safetensors.torch import save_file

    tensors, meta = golden
    state = {k: v.float().contiguous() for k, v in part(tensors, "swin.state.").items()}
    save_file(state, str(tmp_path / "theirs.safetensors"))
    model = tokensparse.dynamic_swin(
        tiny_swin(json.loads(meta["swin"])), keep_ratio=float(meta["keep_ratio"])
    )
    tokensparse.load_checkpoint(model, tmp_path / "theirs.safetensors")
    with torch.no_grad():
        logits = model.eval()(tensors["swin.images"])
    torch.testing.assert_close(logits, tensors["swin.eval_logits"], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------ bad input


def atto(name: str = "convnext_atto", **kw) -> torch.nn.Module:
    args = dict(pretrained=False, depths=(1, 1, 4, 1), dims=(8, 16, 32, 64), conv_mlp=False, num_classes=5)
    return timm.create_model(name, **(args | kw))


def test_rejects_unsupported_variants() -> None:
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    with pytest.raises(ValueError, match="GlobalResponseNormMlp"):
        tokensparse.dynamic_convnext(atto("convnextv2_atto"))
    with pytest.raises(ValueError, match="conv_mlp=True"):
        tokensparse.dynamic_convnext(atto(conv_mlp=True))
    with pytest.raises(ValueError, match="needs a timm ConvNeXt.*VisionTransformer"):
        tokensparse.dynamic_convnext(
            timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, embed_dim=8, num_heads=1)
        )
    v2 = SwinTransformerV2(
        img_size=32, embed_dim=8, depths=(1, 1, 4, 1), num_heads=(1, 1, 1, 1), window_size=2
    )
    with pytest.raises(ValueError, match="needs a timm SwinTransformer.*SwinTransformerV2"):
        tokensparse.dynamic_swin(v2)
    swin = tiny_swin(
        dict(
            img_size=32,
            patch_size=2,
            embed_dim=8,
            depths=[1, 1, 4, 1],
            num_heads=[1, 1, 1, 1],
            window_size=2,
            num_classes=5,
        )
    )
    with pytest.raises(ValueError, match="needs a timm ConvNeXt.*SwinTransformer"):
        tokensparse.dynamic_convnext(swin)
    with pytest.raises(ValueError, match="stage 2, which has 2 blocks"):
        tokensparse.dynamic_convnext(atto(depths=(1, 1, 2, 1)))
    with pytest.raises(ValueError, match="width 30 must be a multiple of 4"):
        tokensparse.dynamic_convnext(atto(dims=(8, 16, 30, 64)))
    with pytest.raises(ValueError, match="keep_ratio must be in \\(0.4, 1\\]"):
        tokensparse.dynamic_convnext(atto(), keep_ratio=0.3)
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        tokensparse.dynamic_swin(swin, keep_ratio=1.5)
    model = tokensparse.dynamic_convnext(atto())
    with pytest.raises(ValueError, match="already a dynamic ConvNeXt"):
        tokensparse.dynamic_convnext(model)
    with pytest.raises(ValueError, match="not a dynamic ConvNeXt / Swin"):
        tokensparse.dynamic_spatial_info(swin)
    assert isinstance(tokensparse.dynamic_swin(swin), torch.nn.Module)


def test_default_locations_follow_the_authors() -> None:
    from tokensparse.policies.dynspatial import default_locations

    assert default_locations(9) == (1, 2, 3)  # ConvNeXt-T
    assert default_locations(27) == (3, 6, 9)  # ConvNeXt-S/B
    assert default_locations(6) == (1, 2, 3)  # Swin-T
    assert default_locations(18) == (2, 4, 6)  # Swin-S/B


# ------------------------------------------------------------------------------------ FLOPs


def torch_macs(model: torch.nn.Module, images: torch.Tensor) -> float:
    """torch's own count for one image, in multiply-adds (it reports 2 FLOPs per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False  # FlopCounterMode has no formula for the CPU SDPA kernel
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("mode", ["dense", "eval", "train"])
@pytest.mark.parametrize("arch", ["convnext", "swin"])
def test_flops_match_torch_flop_counter(arch: str, mode: str) -> None:
    from tokensparse.policies.dynspatial import spatial_flops

    torch.manual_seed(0)
    if arch == "convnext":
        model, size = atto(depths=(1, 1, 9, 1)), (64, 48)
    else:  # 40x36 at patch 2: stage grids 20x18, 10x9, 5x5 (windows padded), 3x3
        cfg = dict(
            img_size=(40, 36),
            patch_size=2,
            embed_dim=8,
            depths=[1, 1, 6, 1],
            num_heads=[1, 2, 2, 4],
            window_size=4,
            num_classes=5,
        )
        model, size = tiny_swin(cfg), (40, 36)
    dense = spatial_flops(model, size)
    if mode != "dense":
        model = (tokensparse.dynamic_convnext if arch == "convnext" else tokensparse.dynamic_swin)(model, 0.7)
    model.train(mode == "train")
    images = torch.randn(1, 3, *size)
    ours = spatial_flops(model, size)
    assert ours == torch_macs(model, images)
    assert (ours == dense) if mode == "dense" else (ours < dense if mode == "eval" else ours > dense)


# ------------------------------------------------------------------------------------ loss


@pytest.mark.parametrize("arch", ["convnext", "swin"])
def test_loss_matches_authors(arch: str, golden) -> None:
    """Their ConvNextDistillDiffPruningLoss (ratio weight 10, MSE feature distillation) on the seeded
    training forward, with the dense timm model of the same weights as teacher."""
    from tokensparse.losses import DynamicSpatialLoss, spatial_teacher_outputs

    model, ref = authors_model(arch, golden)
    cfg = json.loads(golden[1][arch])
    teacher = tiny_convnext(cfg) if arch == "convnext" else tiny_swin(cfg)
    teacher.load_state_dict(model.state_dict(), strict=False)
    teacher_logits, teacher_features = spatial_teacher_outputs(teacher, ref["images"])
    model.train()
    torch.manual_seed(int(golden[1]["train_seed"]))
    logits = model(ref["images"])
    criterion = DynamicSpatialLoss(float(golden[1]["keep_ratio"]))
    loss, parts = criterion(logits, ref["labels"], model, teacher_logits, teacher_features)
    theirs = ref["train_loss_parts"].tolist()
    assert [parts[k] for k in ("cls", "ratio", "distill", "token")] == pytest.approx(
        theirs, rel=1e-4, abs=1e-5
    )
    assert loss.item() == pytest.approx(ref["train_loss"].item(), rel=1e-4)
    loss.backward()
    stage = model.stages[2] if arch == "convnext" else model.layers[2]
    assert stage.score_predictor[0].in_conv[1].weight.grad.abs().sum() > 0  # the ratio term reaches it
    with pytest.raises(ValueError, match="training-mode forward"):
        with torch.no_grad():
            model.eval()(ref["images"])
        criterion(logits, ref["labels"], model, teacher_logits, teacher_features)


def test_param_groups_follow_the_authors() -> None:
    """The training loop's groups for dynamicspatial are the authors' (optim_factory, --lr_scale 0.2, fix_step 5)."""
    from tokensparse.config import TrainConfig
    from tokensparse.training import parameter_groups

    model = tokensparse.dynamic_convnext(atto())
    groups = parameter_groups(model, TrainConfig(method="dynamicspatial", weight_decay=0.05).resolved())
    by_id = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(named)
    new = by_id[id(named["stages.2.score_predictor.0.in_conv.1.weight"])]
    assert (new["lr_scale"], new["fixed_epochs"], new["weight_decay"]) == (1.0, 0, 0.05)
    gamma = by_id[id(named["stages.2.blocks.3.fast_path_gamma"])]
    assert (gamma["lr_scale"], gamma["weight_decay"]) == (1.0, 0.0)
    backbone = by_id[id(named["stages.2.blocks.3.mlp.fc1.weight"])]
    assert (backbone["lr_scale"], backbone["fixed_epochs"], backbone["weight_decay"]) == (0.2, 5, 0.05)
    assert by_id[id(named["stem.0.bias"])]["weight_decay"] == 0.0


TRAINABLE = {
    "convnext": dict(model="convnext_tiny", model_kwargs={"depths": [1, 1, 4, 1], "dims": [8, 16, 24, 32]}),
    "swin": dict(
        model="swin_tiny_patch4_window7_224",
        model_kwargs={
            "patch_size": 4,
            "window_size": 4,
            "embed_dim": 8,
            "depths": [1, 1, 4, 1],
            "num_heads": [1, 1, 2, 2],
        },
    ),
}


@pytest.mark.parametrize("arch", sorted(TRAINABLE))
def test_tokensparse_train_runs_dynamic_spatial_with_the_authors_recipe(arch: str, tmp_path: Path) -> None:
    """`tokensparse train --method dynamicspatial` on a ConvNeXt / Swin: the authors' loss and groups,
    fewer executed FLOPs than the dense model, and a run folder that loads back to the same logits."""
    from tokensparse.data import fashion_mnist_dir

    if not any((fashion_mnist_dir() / f"t10k-labels-idx1-ubyte{s}").exists() for s in ("", ".gz")):
        pytest.skip("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist")
    from tokensparse.cli import main as cli_main
    from tokensparse.train import TrainConfig, build_criterion, load_trained, train

    common = dict(epochs=2, warmup_epochs=0, batch_size=16, train_limit=32, val_limit=16, **TRAINABLE[arch])
    dense = train(TrainConfig(method="dense", output=str(tmp_path / "dense"), **common))
    cfg = TrainConfig(
        method="dynamicspatial",
        checkpoint=str(tmp_path / "dense" / "model.safetensors"),
        backbone_fixed_epochs=1,
        output=str(tmp_path / "dyn"),
        **common,
    )
    sparse = train(cfg)
    assert sparse["val_gflops"] < dense["val_gflops"]
    lines = [json.loads(x) for x in (tmp_path / "dyn" / "metrics.jsonl").read_text().splitlines()]
    first = lines[0]["lr_groups"]
    assert first["backbone"] == 0.0 and first["policy"] > 0  # backbone fixed for its first epoch
    second = lines[1]["lr_groups"]
    assert second["backbone"] == pytest.approx(0.2 * second["policy"])  # the authors' --lr_scale 0.2
    criterion = build_criterion(cfg.resolved())
    assert isinstance(criterion, tokensparse.losses.DynamicSpatialLoss) and criterion.ratio_weight == 10.0
    model, saved = load_trained(tmp_path / "dyn")
    assert saved.method == "dynamicspatial" and type(model).__name__.startswith("Dynamic")
    images = torch.randn(2, 3, 64, 64)
    again = load_trained(tmp_path / "dyn")[0].eval()
    with torch.no_grad():
        assert torch.equal(model.eval()(images), again(images))
    assert cli_main(["eval", str(tmp_path / "dyn"), "--val-limit", "16", "--json"]) == 0


def test_token_methods_refuse_convnext_and_dynamicspatial_refuses_vits(tmp_path: Path) -> None:
    from tokensparse.train import TrainConfig, build_model

    with pytest.raises(ValueError, match="cannot drop tokens.*dynamicspatial"):
        build_model(TrainConfig(method="avit", **TRAINABLE["convnext"]), 10, 64)
    with pytest.raises(ValueError, match="needs a timm ConvNeXt or Swin.*dynamicvit"):
        build_model(
            TrainConfig(method="dynamicspatial", model="vit_tiny_patch16_224", model_kwargs={"depth": 1}),
            10,
            64,
        )
