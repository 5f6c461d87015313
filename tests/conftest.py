from __future__ import annotations

import os
from pathlib import Path

# No test sends network traffic: the Hugging Face Hub client reads its cache only (set before it is imported)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import timm
import torch
from safetensors.torch import load_file

torch.set_num_threads(min(2, os.cpu_count() or 1))

GOLDEN = Path(os.environ.get("TOKENSPARSE_GOLDEN", Path(__file__).resolve().parents[2] / "shared" / "golden"))
if not GOLDEN.is_dir():
    GOLDEN = Path(__file__).resolve().parent / "golden"


def golden(name: str) -> dict[str, torch.Tensor]:
    path = GOLDEN / f"{name}.safetensors"
    if not path.is_file():
        pytest.fail(f"golden file {path} missing: run the tests with ../shared beside the checkout")
    return load_file(str(path))


def golden_vit(**kw) -> torch.nn.Module:
    """The ViT of the golden files: 112x112, patch 8 (14x14 grid), dim 48, depth 12, 3 heads, 10 classes."""
    args = dict(img_size=112, patch_size=8, embed_dim=48, depth=12, num_heads=3, num_classes=10)
    args.update(kw)
    return timm.create_model("vit_small_patch16_224", **args)


def backbone_state(tensors: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def tiny(name: str = "deit_tiny_patch16_224", **kw) -> torch.nn.Module:
    """A small random-weight timm model of a registered architecture (no download)."""
    args = dict(img_size=64, patch_size=8, embed_dim=48, depth=6, num_heads=3, num_classes=7)
    args.update(kw)
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **args)


TINY_KWARGS = {"patch_size": 8, "embed_dim": 48, "depth": 6, "num_heads": 3}


def make_run(tmp_path: Path, method: str, **settings) -> str:
    """A run folder as `tokensparse train` leaves it (config.json + weights) for `tiny()`, without training."""
    import dataclasses
    import json

    import tokensparse
    from tokensparse.config import TrainConfig
    from tokensparse.training import sparsify_for

    cfg = TrainConfig(
        method=method, model="deit_tiny_patch16_224", model_kwargs=TINY_KWARGS, img_size=64, **settings
    ).resolved()
    model = sparsify_for(cfg, tiny(num_classes=7))
    out = tmp_path / method
    out.mkdir()
    tokensparse.save_checkpoint(model, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg) | {"num_classes": 7, "img_size": 64}))
    return str(out)
