"""The main job end to end on a sliver of the data, the CLI's bench, and the pictures."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import tiny

import tokensparse
from tokensparse.cli import main as cli_main
from tokensparse.data import fashion_mnist_dir
from tokensparse.viz import token_maps

needs_data = pytest.mark.skipif(
    not any((fashion_mnist_dir() / f"t10k-labels-idx1-ubyte{s}").exists() for s in ("", ".gz")),
    reason="Fashion-MNIST is missing: apt-get install dataset-fashion-mnist",
)


@pytest.fixture
def tiny_teacher(tmp_path, monkeypatch):
    """A small dense model registered as a shipped one, so the study runs in seconds."""
    import timm

    from tokensparse import models as shipped

    kwargs = {"patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10, **kwargs)
    path = tokensparse.save_checkpoint(model, tmp_path / "tiny_teacher.safetensors")
    entry = shipped.PretrainedEntry(
        name="tiny", model="vit_tiny_patch16_224", model_kwargs=kwargs, weights=str(path)
    )
    monkeypatch.setitem(shipped.PRETRAINED, "tiny", entry)
    return "tiny"


@needs_data
def test_demo_writes_a_report_and_reuses_finished_steps(tmp_path, capsys, tiny_teacher):
    from tokensparse.demo import DemoConfig, run_study

    cfg = DemoConfig(
        work=str(tmp_path / "work"),
        report=str(tmp_path / "report"),
        teacher=tiny_teacher,
        finetune_limit=64,
        batch_size=32,
        val_limit=32,
        test_limit=64,
        dynamicvit_epochs=1,
        dynamicvit_epochs_at=((0.7, 2),),  # per-ratio epochs override the common count (dense-ft: 1)
        seeds=(0, 1),
        avit_epochs=1,
        avit_grid=((5e-4, 1e-3, 0.0), (5e-5, 1e-2, 0.5)),
        avit_grid_epochs=1,
        avit_grid_limit=32,
        baseline_epochs=1,
        bench_rounds=2,
        bench_batch=8,
        curve_ratios=(0.5, 0.7),
        avit_cuts=(0.3,),
        calibration_images=16,
        dense_finetune=True,
    )
    index = run_study(cfg)
    text = index.read_text()
    for row in ("| dense |", "| dense-ft |", "| dynamicvit@0.7 |", "| avit |", "| random@0.7 |", "| static@0.7 |",
                "| random-ft@0.7 |", "| oracle@0.7 |", "| oracle-ft@0.7 |", "| avit-moved@0.3 |"):  # fmt: skip
        assert row in text, row
    assert "## Claims" in text and "| tome@r" in text and "| evit@" in text
    assert "## Fine-tuning curves" in text and "Fashion-MNIST's test split" in text
    assert "- control: the dense model fine-tuned on the same data and schedule" in text
    assert "wall time of this command:" in text and "INTERIM" not in text
    assert "## A-ViT: loss weights chosen on validation" in text and "| chosen |" in text
    assert "- bound: the best object oracle" in text
    for picture in (
        "accuracy_vs_gflops.png",
        "finetune_curves.png",
        "token_maps_dynamicvit.png",
        "token_maps_avit.png",
        "token_maps_tome.png",
    ):
        assert (tmp_path / "report" / picture).stat().st_size > 1000
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    results = saved["results"]
    assert results["dynamicvit@0.7"]["gflops"] < results["dense"]["gflops"]
    assert results["dense"]["images"] == 64  # the test split's first 64 items
    # vs dense: paired on the same items, with its interval; the per-item strings stay in the work folder
    assert results["dense"]["vs_dense"] == 0.0 and results["dense"]["vs_dense_ci"] == 0.0
    dvit = results["dynamicvit@0.7"]
    # two seeds: the row's top-1 is their mean, each listed, and the paired difference is the mean's
    assert set(dvit["seeds"]) == {"0", "1"}
    assert dvit["top1"] == pytest.approx(sum(dvit["seeds"].values()) / 2)
    assert dvit["seed_spread"] == pytest.approx(max(dvit["seeds"].values()) - min(dvit["seeds"].values()))
    assert dvit["vs_dense"] == pytest.approx(dvit["top1"] - results["dense"]["top1"])
    assert dvit["vs_dense_ci"] >= 0 and "correct" not in dvit
    assert "seeds" in results["dense-ft"] and "seeds" in results["avit"] and "seeds" not in results["dense"]
    # A-ViT is read at the gate centre it trained with; the moved-gate row says where it was moved
    avit = results["avit"]
    assert avit["gate_center_trained"] == avit["gate_center_evaluated"] == saved["avit_start"]["gate_center"]
    moved = results["avit-moved@0.3"]
    assert moved["gate_center_trained"] == avit["gate_center_trained"] != moved["gate_center_evaluated"]
    assert sum(m["chosen"] for m in saved["avit_grid"].values()) == 1
    assert avit["grid_run"] in saved["avit_grid"]
    cached = json.loads((tmp_path / "work" / "evaluations.json").read_text())
    assert len(cached["dense"]["correct"]) == 64 and "dynamicvit@0.7-seed1" in cached
    assert "vs dense (pt, 95% CI)" in text
    assert [p["epoch"] for p in saved["curves"]["dynamicvit@0.7"]] == [1, 2]
    assert [p["epoch"] for p in saved["curves"]["dense-ft"]] == [1]
    # halting on and off the object, per epoch, for the A-ViT runs
    assert {"val_object_depth", "val_background_depth"} <= set(saved["curves"]["avit-seed1"][0])
    # every epoch drew its items afresh from the whole training split
    config = json.loads((tmp_path / "work" / "dynamicvit@0.7" / "config.json").read_text())
    assert config["fresh_subset"] is True and config["train_limit"] == 64
    out = capsys.readouterr().out
    assert "| dynamicvit@0.7 |" in out and "report:" in out  # the headline table is printed
    run_study(cfg)
    assert "dynamicvit@0.7: reusing" in capsys.readouterr().out
    # an evaluation is reused only for the same weights: a changed run is evaluated again
    from safetensors.torch import load_file, save_file

    cache = tmp_path / "work" / "evaluations.json"
    before = json.loads(cache.read_text())
    weights = tmp_path / "work" / "dynamicvit@0.7" / "model.safetensors"
    tensors = load_file(weights)
    tensors["head.bias"] = tensors["head.bias"] + 1.0
    save_file(tensors, weights, metadata=safe_open_metadata(weights))
    run_study(cfg)
    after = json.loads(cache.read_text())
    assert after["dynamicvit@0.7"]["source"] != before["dynamicvit@0.7"]["source"]
    assert after["dense"] == before["dense"] and after["random@0.7"] == before["random@0.7"]
    # an interim report from finished runs only names what is missing; without a full-budget A-ViT it
    # reports the chosen grid run, labelled as such
    import shutil

    for name in ("avit", "avit-seed1"):
        shutil.move(tmp_path / "work" / name, tmp_path / f"aside-{name}")
    interim = dataclasses.replace(cfg, train=False, seeds=(0, 1, 2), report=str(tmp_path / "interim"))
    text = run_study(interim).read_text()
    assert "INTERIM: not trained yet" in text and "dynamicvit@0.7-seed2" in text and "avit-seed1" in text
    grid_row = json.loads((tmp_path / "interim" / "results.json").read_text())["results"]["avit"]
    assert grid_row["budget"] == "grid" and "the full-budget runs not trained yet" in grid_row["setting"]
    for name in ("avit", "avit-seed1"):
        shutil.move(tmp_path / f"aside-{name}", tmp_path / "work" / name)
    # a finished run is reused only under the same settings: a changed schedule is refused, not mixed in
    with pytest.raises(ValueError, match="holds a finished run with other settings .*lr"):
        run_study(dataclasses.replace(cfg, dynamicvit_backbone_lr_scale=0.1))
    # a newly shipped teacher (same name and path, other weights) does not reuse runs made from the old one
    teacher = load_file(tmp_path / "tiny_teacher.safetensors")
    teacher["head.bias"] = teacher["head.bias"] + 1.0
    save_file(
        teacher,
        tmp_path / "tiny_teacher.safetensors",
        metadata=safe_open_metadata(tmp_path / "tiny_teacher.safetensors"),
    )
    with pytest.raises(ValueError, match="holds runs fine-tuned from another 'tiny'"):
        run_study(cfg)


def safe_open_metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_gate_centre_calibration_hits_the_target_depth() -> None:
    from tokensparse.demo import calibrate_gate_center

    model = tiny("vit_tiny_patch16_224", depth=6).eval()
    images = torch.randn(4, 3, 64, 64)
    center = calibrate_gate_center(model, images, gate_scale=10.0, target_depth=4.0)
    probe = tokensparse.avit(model, gate_scale=10.0, gate_center=center, early_exit=False).eval()
    with torch.no_grad():
        probe(images)
    assert abs(float(tokensparse.avit_stats(probe).mean_depth.mean()) - 4.0) < 0.5


def test_gate_centre_for_a_flop_cut_hits_it_and_restores_the_model() -> None:
    from tokensparse.demo import gate_center_for_cut

    torch.manual_seed(0)
    model = tokensparse.avit(tiny("vit_tiny_patch16_224", depth=6), gate_scale=10.0, gate_center=0.0).eval()
    images = torch.randn(8, 3, 64, 64)
    dense = tokensparse.gflops(tiny("vit_tiny_patch16_224", depth=6), images)
    center = gate_center_for_cut(model, images, 0.3, dense)
    assert model.halting.gate_center == 0.0
    model.halting.gate_center = center
    ratio = tokensparse.gflops(model, images) / dense
    assert 0.6 < ratio <= 0.7 + 1e-3, ratio
    with pytest.raises(ValueError, match="cut"):
        gate_center_for_cut(model, images, 1.5, dense)


def test_bench_cli_prints_a_table_and_json(capsys):
    args = [
        "bench",
        "--model",
        "vit_tiny_patch16_224",
        "--img-size",
        "64",
        "--batch-size",
        "2",
        "--rounds",
        "2",
        "--warmup",
        "1",
        "--keep-ratios",
        "0.5",
        "0.7",
    ]
    assert cli_main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    methods = [row["method"] for row in result["rows"]]
    assert methods == ["dense", "dynamicvit", "dynamicvit"]
    assert result["rows"][1]["gflops"] < result["rows"][2]["gflops"] < result["rows"][0]["gflops"]
    assert (
        cli_main(
            [
                "bench",
                "--method",
                "avit",
                "--model",
                "vit_tiny_patch16_224",
                "--img-size",
                "64",
                "--batch-size",
                "1",
                "--rounds",
                "1",
                "--warmup",
                "0",
            ]
        )
        == 0
    )
    assert "dense blocks on A-ViT's token counts" in capsys.readouterr().out


def test_bench_cli_rejects_a_bad_ratio(capsys):
    with pytest.raises(SystemExit):
        cli_main(["bench", "--keep-ratios", "1.5"])
    assert "keep ratio must be in (0, 1], got 1.5" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (
            lambda m: tokensparse.dynamicvit(m, locations=(1, 3)),
            ["keep ratio 0.7", "dropped ones greyed", "of 64"],
        ),
        (lambda m: tokensparse.avit(m, gate_center=2.0), ["gate centre 2", "mean"]),
        (lambda m: tokensparse.tome(m, r=8), ["r=8", "each colour is one token"]),
    ],
)
def test_token_maps_draw_every_method_and_say_what_they_show(tmp_path, make, says, monkeypatch):
    import tokensparse.viz as viz

    texts = []
    save = viz.save_figure

    def keep_texts(fig, path, **kwargs):
        texts.append(fig._suptitle.get_text() + " | " + " | ".join(ax.get_title() for ax in fig.axes))
        return save(fig, path, **kwargs)

    monkeypatch.setattr(viz, "save_figure", keep_texts)
    model = make(tiny())
    path = token_maps(model, torch.randn(2, 3, 64, 64), tmp_path / "maps.png")
    assert path.stat().st_size > 1000
    for text in says:  # the setting and how to read the picture, on the picture
        assert text in texts[0], (text, texts[0])


def test_token_maps_need_a_sparsified_model(tmp_path):
    with pytest.raises(ValueError, match="needs a tokensparse model"):
        token_maps(tiny(), torch.randn(1, 3, 64, 64), tmp_path / "x.png")
