"""The shipped dense model loads, is a plain timm ViT, and classifies the built-in data."""

from __future__ import annotations

import json

import pytest
import torch

import tokensparse
from tokensparse.data import build_dataset, fashion_mnist_dir
from tokensparse.models import PRETRAINED, pretrained_entry

needs_data = pytest.mark.skipif(
    not any((fashion_mnist_dir() / f"t10k-labels-idx1-ubyte{s}").exists() for s in ("", ".gz")),
    reason="Fashion-MNIST is missing: apt-get install dataset-fashion-mnist",
)


def test_shipped_model_is_a_small_fp32_file_with_its_card() -> None:
    entry = pretrained_entry("clutter-vit")
    assert entry.path.stat().st_size < 4_000_000
    card = entry.card.read_text()
    assert "Command:" in card and "Machine:" in card and "make teacher" in card
    metrics = [json.loads(x) for x in entry.path.with_suffix(".metrics.jsonl").read_text().splitlines()]
    assert metrics and all("val_top1" in m for m in metrics)


@needs_data
def test_shipped_model_loads_and_classifies_validation_canvases() -> None:
    model = tokensparse.pretrained("clutter-vit")
    assert not model.training and next(model.parameters()).dtype == torch.float32
    val = build_dataset("fashion-mnist-clutter", split="val", limit=256)
    images = torch.stack([val[i][0] for i in range(len(val))])
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        top1 = (model(images).argmax(1) == labels).float().mean().item()
    final = json.loads(
        pretrained_entry("clutter-vit").path.with_suffix(".metrics.jsonl").read_text().splitlines()[-1]
    )
    assert abs(100 * top1 - final["val_top1"]) < 8  # 256 of the 5000 validation canvases it was measured on
    sparse = tokensparse.dynamicvit(tokensparse.pretrained("clutter-vit"), keep_ratio=0.7).eval()
    with torch.no_grad():
        assert sparse(images[:4]).shape == (4, 10)


def test_unknown_shipped_model_names_the_choices() -> None:
    with pytest.raises(ValueError, match="available: clutter-vit"):
        tokensparse.pretrained("imagenet-vit")
    assert "clutter-vit" in PRETRAINED


def test_a_stage_that_continues_the_shipped_model_extends_its_curve(tmp_path) -> None:
    """ship_pretrained --continues-shipped: the shipped stages come first, the new run is the next stage."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "ship_pretrained.py"
    spec = importlib.util.spec_from_file_location("ship_pretrained", path)
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    shipped = pretrained_entry("clutter-vit").path.with_suffix(".metrics.jsonl").read_text()
    before = [json.loads(line) for line in shipped.splitlines() if line.strip()]
    run = tmp_path / "stage"
    run.mkdir()
    run.joinpath("metrics.jsonl").write_text(
        "".join(json.dumps({"epoch": e, "val_top1": 70.0 + e}) + "\n" for e in (1, 2))
    )
    metrics = ship.stage_metrics(shipped, [run])
    assert metrics[: len(before)] == before
    added = metrics[len(before) :]
    assert [m["epoch"] for m in added] == [len(before) + 1, len(before) + 2]
    assert [m["stage"] for m in added] == [before[-1]["stage"] + 1] * 2
    assert [m["stage_epoch"] for m in added] == [1, 2]
    assert [m["stage"] for m in ship.stage_metrics(None, [run])] == [1, 1]  # a first stage alone
