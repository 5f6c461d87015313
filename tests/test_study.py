"""The study's protocol: its budget against the teacher's, A-ViT's choice on validation, the oracle."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny

import tokensparse
from tokensparse.models import pretrained_entry
from tokensparse.study.config import TEACHER_CANVASES, DemoConfig, study_config
from tokensparse.study.oracle import object_oracle
from tokensparse.study.runs import choose_avit


def test_the_study_fine_tunes_at_the_authors_share_of_the_teachers_budget():
    card = pretrained_entry("clutter-vit").path.with_name("clutter_vit.metrics.jsonl")
    epochs = [json.loads(line)["epoch"] for line in card.read_text().splitlines() if line.strip()]
    assert TEACHER_CANVASES == len(epochs) * 55000  # 34 epochs of the 55000 training canvases
    cfg = study_config()
    assert cfg.dynamicvit_epochs * cfg.finetune_limit >= TEACHER_CANVASES / 10  # DynamicViT: 30 of 300
    assert cfg.avit_epochs * cfg.finetune_limit >= TEACHER_CANVASES / 3  # A-ViT: 100 of 300
    # the authors' schedule shape: warm-up and frozen backbone 1/6 (5 of 30), A-ViT's warm-up 1/20 (5 of 100)
    assert cfg.dynamicvit_warmup_epochs / cfg.dynamicvit_epochs == pytest.approx(5 / 30, abs=0.01)
    assert cfg.backbone_fixed_epochs / cfg.dynamicvit_epochs == pytest.approx(5 / 30, abs=0.01)
    assert cfg.avit_warmup_epochs / cfg.avit_epochs == pytest.approx(5 / 100, abs=0.01)
    assert cfg.avit_lr == pytest.approx(5e-4 * cfg.batch_size / 512)  # DeiT's linear scaling rule
    assert (5e-4, 1e-3, 0.0) in cfg.avit_grid and len(cfg.seeds) == 3


def test_avit_is_chosen_inside_the_flop_window_on_validation_top1():
    cfg = DemoConfig(avit_target_cut=(0.25, 0.35))
    grid = {
        "deep": {"val_top1": 80.0, "val_gflops": 0.9},  # 10% fewer: outside, however accurate
        "a": {"val_top1": 70.0, "val_gflops": 0.7},
        "b": {"val_top1": 72.0, "val_gflops": 0.66},
        "shallow": {"val_top1": 60.0, "val_gflops": 0.4},
    }
    assert choose_avit(cfg, grid, 1.0) == "b"
    assert grid["b"]["chosen"] and grid["a"]["in_window"] and not grid["deep"]["in_window"]
    assert grid["deep"]["fewer_flops"] == pytest.approx(0.1)
    # none inside: the one closest to the window's middle
    assert choose_avit(cfg, {"deep": grid["deep"], "shallow": grid["shallow"]}, 1.0) == "deep"


def test_the_oracle_keeps_the_objects_patches_first():
    model = tokensparse.dynamicvit(tiny(), keep_ratio=0.5, locations=(1, 3)).eval()
    on_object = torch.zeros(2, 64, dtype=torch.bool)
    on_object[0, [0, 9, 18, 27, 63]] = True  # image 0: five patches; image 1: 40 (more than stage 2 keeps)
    on_object[1, :40] = True
    oracle = object_oracle(model, lambda indices: on_object[indices])
    with pytest.raises(ValueError, match="needs image_indices"):
        oracle(torch.randn(2, 3, 64, 64))
    tokensparse.engine.get_policy(oracle).image_indices = torch.tensor([0, 1])
    with torch.no_grad():
        oracle(torch.randn(2, 3, 64, 64))
    kept = tokensparse.sparsity_info(oracle).kept_index
    assert [k.shape[1] for k in kept] == [32, 16]
    assert {0, 9, 18, 27, 63} <= set(kept[1][0].tolist())  # every object patch survives both stages
    assert set(kept[0][1].tolist()) <= set(range(40)) and set(kept[1][1].tolist()) <= set(range(40))
    oracle.train()
    with pytest.raises(ValueError, match="no training"):
        oracle(torch.randn(2, 3, 64, 64))


def test_fine_tuning_curves_share_a_colour_per_run_and_a_line_style_per_seed():
    from tokensparse.study.report import curve_style

    names = ["dense-ft", "dynamicvit@0.7", "avit", "dense-ft-seed1", "dynamicvit@0.7-seed1", "avit-seed2",
             "dynamicvit@0.5", "random-ft@0.7"]  # fmt: skip
    styles = {n: curve_style(n, names) for n in names}
    assert styles["dense-ft"][0] == styles["dense-ft-seed1"][0] != styles["dynamicvit@0.7"][0]
    assert styles["avit"][1] == "-" and styles["dense-ft-seed1"][1] == "--" and styles["avit-seed2"][1] == ":"
    assert len({c for c, _ in styles.values()}) == 5  # five runs, each its colour (tab10 has ten)
