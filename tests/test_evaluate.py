"""Per-item evaluation and the paired confidence interval the study reports next to "vs dense"."""

from __future__ import annotations

import pytest
import timm
import torch

from tokensparse.evaluate import evaluate, paired_difference


def test_per_item_correctness_matches_top1_in_loader_order():
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=4, img_size=16, patch_size=8, depth=1, embed_dim=16, num_heads=2
    ).eval()
    images = torch.randn(10, 3, 16, 16)
    with torch.no_grad():
        predicted = model(images).argmax(1)
    labels = predicted.clone()
    labels[[1, 4, 7]] = (labels[[1, 4, 7]] + 1) % 4  # exactly these three wrong
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4)
    result = evaluate(model, loader, progress=False, per_item=True)
    assert result["correct"] == "1011011011"
    assert result["top1"] == pytest.approx(70.0)
    assert "correct" not in evaluate(model, loader, progress=False)


def test_paired_difference_and_its_interval():
    # identical predictions: no difference and no spread
    assert paired_difference("1010", "1010") == (0.0, 0.0)
    # 100 items; the model gains 10 and loses 20 against the reference: -10 pt
    ref = "1" * 20 + "0" * 10 + "1" * 70
    mod = "0" * 20 + "1" * 10 + "1" * 70
    diff, half = paired_difference(mod, ref)
    d = torch.tensor([-1.0] * 20 + [1.0] * 10 + [0.0] * 70)
    assert diff == pytest.approx(-10.0)
    assert half == pytest.approx(100 * 1.96 * d.std().item() / 10)
    # the same -10 pt with more items in disagreement (30 gained, 40 lost): a wider interval
    wide = paired_difference("0" * 40 + "1" * 30 + "1" * 30, "1" * 40 + "0" * 30 + "1" * 30)
    assert wide[0] == pytest.approx(-10.0) and wide[1] > half
    with pytest.raises(ValueError, match="same items"):
        paired_difference("101", "10")


def test_paired_difference_over_seeds_averages_each_items_answers():
    diff, half = paired_difference(["1100", "1000"], "1000")  # per item: 0, +0.5, 0, 0
    assert diff == pytest.approx(12.5) and half > 0
    assert paired_difference(["1010"], "1010") == paired_difference("1010", "1010")
    with pytest.raises(ValueError, match="same items"):
        paired_difference(["101", "10"], "101")
