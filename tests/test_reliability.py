"""After training: every setting a command accepts changes the result or is refused (exit 2), and every
file a command writes appears whole or not at all."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from conftest import make_run, tiny

import tokensparse
import tokensparse.export as export_module
from tokensparse.cli import main as cli_main
from tokensparse.config import TrainConfig
from tokensparse.data import fashion_mnist_dir
from tokensparse.training import train
from tokensparse.viz import save_figure

needs_data = pytest.mark.skipif(
    not any((fashion_mnist_dir() / f"t10k-labels-idx1-ubyte{s}").exists() for s in ("", ".gz")),
    reason="Fashion-MNIST is missing: apt-get install dataset-fashion-mnist",
)


@pytest.mark.parametrize("lr", [math.inf, math.nan, -1.0, 0.0])
def test_a_non_finite_or_non_positive_lr_is_refused(lr):
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=lr).validate()


def _tiny_train(out: Path, **kw) -> TrainConfig:
    return TrainConfig(
        method="avit", model="vit_tiny_patch16_224", img_size=64, train_limit=8, val_limit=8, batch_size=8,
        epochs=1, warmup_epochs=0, device="cpu", output=str(out),
        model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}, **kw,
    )  # fmt: skip


@needs_data
def test_overwrite_validates_everything_before_deleting_the_finished_run(tmp_path):
    run = Path(make_run(tmp_path, "avit"))
    before = (run / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="--prior-depth 100 is deeper than the model's 4 blocks"):
        train(_tiny_train(run, overwrite=True, prior_depth=100))
    assert (run / "model.safetensors").read_bytes() == before


@needs_data
def test_a_folder_left_by_a_failed_start_up_does_not_block_the_next_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")  # what a run that died before its first epoch leaves
    train(_tiny_train(out))
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["method"] == "avit"


@pytest.mark.parametrize(
    ("content", "says"), [({"method": "evit"}, "lacks"), ([1, 2], "expected a JSON object")]
)
def test_a_config_without_the_run_facts_is_a_clear_error(tmp_path, capsys, content, says):
    run = Path(make_run(tmp_path, "evit"))
    (run / "config.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=f"is not a tokensparse run's config: .*{says}"):
        tokensparse.load_run(run)
    assert cli_main(["eval", str(run)]) == 2
    assert "is not a tokensparse run's config" in capsys.readouterr().err


def test_bench_refuses_a_negative_warmup(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["bench", "--warmup", "-5"])
    assert exit_.value.code == 2 and "must be >= 0, got -5" in capsys.readouterr().err


def test_a_figure_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    fig, _ = plt.subplots()
    path = save_figure(fig, tmp_path / "maps")
    assert path == tmp_path / "maps.png" and path.read_bytes().startswith(b"\x89PNG")
    old = path.read_bytes()
    fig, _ = plt.subplots()

    def full_disk(*args, **kwargs):
        Path(args[0]).write_bytes(b"\x89PN")  # a partial write, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fig, "savefig", full_disk)
    with pytest.raises(OSError, match="could not write .*maps.png"):
        save_figure(fig, path)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["maps.png"]


def test_export_keeps_the_old_file_when_it_fails_and_refuses_a_cropping_size(tmp_path, monkeypatch):
    model = tokensparse.evit(tiny(), keep_ratio=0.7).eval()
    with pytest.raises(ValueError, match="not a multiple of the patch size 8x8"):
        tokensparse.export_onnx(model, tmp_path / "m.onnx", image_size=60)
    target = tmp_path / "m.onnx"
    target.write_bytes(b"a good old export")

    def fails(model, method, path, *args):
        path.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "_export", fails)
    with pytest.raises(OSError, match="could not write .*m.onnx"):
        tokensparse.export_onnx(model, target)
    assert target.read_bytes() == b"a good old export" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_export_of_a_run_honours_or_refuses_every_flag(tmp_path, capsys):
    run = make_run(tmp_path, "evit", keep_ratio=0.7)
    out = tmp_path / "out.onnx"
    import onnx

    def exported_tokens(*flags: str) -> int:
        assert cli_main(["export", str(out), "--run", run, "--no-verify", *flags]) == 0
        output = next(o for o in onnx.load(str(out)).graph.output if o.name == "patch_index")
        return output.type.tensor_type.shape.dim[1].dim_value

    assert exported_tokens("--keep-ratio", "0.3") < exported_tokens()  # the run's 0.7
    assert cli_main(["export", str(out), "--run", run, "--method", "tome"]) == 2
    assert "is a evit run, not --method tome" in capsys.readouterr().err
    assert cli_main(["export", str(out), "--run", run, "--tome-r", "4"]) == 2
    assert "--tome-r applies to --method tome" in capsys.readouterr().err
    random_run = make_run(tmp_path, "random", keep_ratio=0.7, seed=1)
    assert cli_main(["export", str(out), "--run", random_run, "--seed", "5", "--no-verify"]) == 0
    assert cli_main(["export", str(out), "--run", str(tmp_path / "nonexistent")]) == 2
    assert "not found" in capsys.readouterr().err


def test_a_run_folder_takes_one_training_process_at_a_time(tmp_path):
    from tokensparse.training.run_dir import RunLock

    held = RunLock(tmp_path / "run")
    with pytest.raises(ValueError, match=rf"in use by another training process \(pid {os.getpid()}\)"):
        RunLock(tmp_path / "run")
    held.release()
    RunLock(tmp_path / "run").release()  # free again once released (and when its process ends)


@needs_data
def test_training_holds_the_lock_and_refuses_a_second_process(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    code = (
        "import sys, time; from tokensparse.training.run_dir import RunLock; "
        f"lock = RunLock(__import__('pathlib').Path({str(out)!r})); print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=f"in use by another training process \\(pid {holder.pid}\\)"):
            train(_tiny_train(out, resume=True))
    finally:
        holder.kill()
        holder.wait()
    train(_tiny_train(out, resume=True))  # the OS dropped the killed holder's lock
    assert (out / "model.safetensors").is_file()


CONVNEXT = {"depths": (1, 1, 4, 1), "dims": (16, 32, 64, 128), "conv_mlp": False}


def _spatial_run(tmp_path: Path) -> str:
    import dataclasses

    import timm

    from tokensparse.training import sparsify_for

    cfg = TrainConfig(
        method="dynamicspatial", model="convnext_atto", img_size=64, model_kwargs=CONVNEXT
    ).resolved()
    model = sparsify_for(cfg, timm.create_model("convnext_atto", num_classes=10, **CONVNEXT))
    out = tmp_path / "spatial"
    out.mkdir()
    tokensparse.save_checkpoint(model, out / "model.safetensors")
    (out / "config.json").write_text(
        json.dumps(dataclasses.asdict(cfg) | {"num_classes": 10, "img_size": 64})
    )
    return str(out)


def test_every_inference_path_takes_a_dynamic_convnext_run(tmp_path, capsys):
    import numpy as np
    import timm
    from PIL import Image

    run = _spatial_run(tmp_path)
    image = tmp_path / "shirt.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype("uint8")).save(image)
    model = tokensparse.load_run(run)
    assert timm.data.resolve_model_data_config(model)["input_size"] == (3, 64, 64)  # the run's, not 224
    assert 0 < tokensparse.gflops(model) < tokensparse.gflops(tokensparse.load_run(run, keep_ratio=0.9))
    assert cli_main(["predict", str(image), "--run", run, "--viz", str(tmp_path / "maps")]) == 0
    assert f"wrote {tmp_path / 'maps.png'}" in capsys.readouterr().out
    assert (tmp_path / "maps.png").read_bytes().startswith(b"\x89PNG")
    assert cli_main(["export", str(tmp_path / "m.onnx"), "--run", run]) == 0
    assert "dynamicspatial" in capsys.readouterr().out
    assert (
        cli_main(["bench", "--run", run, "--rounds", "1", "--warmup", "0", "--batch-size", "2", "--json"])
        == 0
    )
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["method"] for r in rows] == ["dense", "dynamicspatial"] and rows[1]["bound_speedup"] > 1
    # the real convnext_atto uses 1x1-conv MLPs, which the spatial variant does not take: a clear refusal
    assert cli_main(["bench", "--model", "convnext_atto", "--img-size", "64", "--rounds", "1"]) == 2
    assert "conv_mlp=True" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("pixels", "mode"),
    [
        (lambda: (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16), "I;16"),
        (lambda: np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64), "F"),
    ],
)
def test_predict_reads_16_bit_and_float_images_at_their_range(tmp_path, pixels, mode):
    from PIL import Image

    from tokensparse.runs import read_images, to_8bit

    array = pixels()
    grey = to_8bit(Image.fromarray(array), "x")
    assert grey.mode == "L" and np.asarray(grey).min() == 0 and np.asarray(grey).max() == 255
    path = tmp_path / ("x.png" if mode == "I;16" else "x.tif")
    Image.fromarray(array).save(path)
    eight = tmp_path / "eight.png"
    grey.save(eight)
    model = tokensparse.dynamicvit(tiny(), keep_ratio=0.7)
    torch.testing.assert_close(read_images([path], model), read_images([eight], model))
    with pytest.raises(ValueError, match="outside the 0..1"):
        to_8bit(Image.fromarray(np.full((4, 4), -2.0, np.float32)), "neg.tif")


def _folder(root: Path, classes: tuple[str, ...]) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 80, (32, 32, 3), dtype=np.uint8) + np.uint8(100 * c)).save(
                    root / split / name / f"{i}.png"
                )
    return root


def test_an_unreadable_image_is_named_not_replaced_by_another(tmp_path):
    from tokensparse.data import build_dataset

    root = _folder(tmp_path / "data", ("cat", "dog"))
    (root / "val" / "dog" / "1.png").write_bytes(b"not a png")
    dataset = build_dataset("folder", root, "val", img_size=32)
    dataset[0]
    with pytest.raises(ValueError, match=r"cannot read image .*dog/1.png"):
        [dataset[i] for i in range(len(dataset))]


def test_one_class_data_and_a_class_count_mismatch_are_refused(tmp_path, capsys):
    one = _folder(tmp_path / "one", ("cat",))
    cfg = TrainConfig(method="dense", model="deit_tiny_patch16_224", model_kwargs={"patch_size": 8, "embed_dim": 48,
                      "depth": 2, "num_heads": 3}, dataset="folder", data_root=str(one), img_size=32, epochs=1,
                      warmup_epochs=0, batch_size=2, device="cpu", output=str(tmp_path / "run"))  # fmt: skip
    with pytest.raises(ValueError, match="has 1 class: a classifier needs at least two"):
        train(cfg)
    run = make_run(tmp_path, "evit")  # 7 classes
    two = _folder(tmp_path / "two", ("cat", "dog"))
    assert cli_main(["eval", run, "--dataset", "folder", "--data-root", str(two)]) == 2
    assert "classifies 7 classes but folder" in capsys.readouterr().err


def test_a_run_folder_refuses_shape_flags_and_a_pickle_gets_no_advice_to_run_it(tmp_path, capsys):
    run = make_run(tmp_path, "evit")
    assert cli_main(["eval", run, "--img-size", "32"]) == 2
    assert "--img-size describe a weights file" in capsys.readouterr().err
    payload = tmp_path / "model.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": Path("x")}, payload)  # an object beside the tensors
    with pytest.raises(tokensparse.checkpoints.CheckpointError) as err:
        tokensparse.checkpoints.read_state_dict(payload)
    assert "weights_only=False" not in str(err.value) and "re-save its weights alone" in str(err.value)


def test_the_shipped_model_is_nameable_as_model_or_checkpoint():
    from tokensparse.models import pretrained_entry

    entry = pretrained_entry("clutter-vit")
    for given in (dict(model="clutter-vit"), dict(checkpoint="clutter-vit")):
        cfg = TrainConfig(method="dense", dataset="folder", data_root="x", **given).resolved()
        assert (cfg.model, cfg.model_kwargs, cfg.img_size) == (entry.model, entry.model_kwargs, 64)
        assert cfg.checkpoint == str(entry.path)
    with pytest.raises(ValueError, match="--checkpoint clutter-vit is a vit_tiny_patch16_224, not --model"):
        TrainConfig(method="dense", model="deit_small_patch16_224", checkpoint="clutter-vit").resolved()


def test_the_head_mismatch_advice_runs_as_printed(tmp_path, capsys):
    """Fine-tuning the shipped 10-class model on a 2-class folder: the two printed commands run as copied."""
    import shlex

    data = _folder(tmp_path / "data", ("cat", "dog"))
    out = tmp_path / "mine"
    args = ["train", "--method", "dynamicvit", "--checkpoint", "clutter-vit", "--dataset", "folder",
            "--data-root", str(data), "--output", str(out)]  # fmt: skip
    assert cli_main(args) == 2
    advice = [
        line.strip()
        for line in capsys.readouterr().err.splitlines()
        if line.startswith("  tokensparse train")
    ]
    assert len(advice) == 2 and "--img-size 64" in advice[0] and "--model-kwargs" in advice[0]
    short = ["--epochs", "1", "--batch-size", "4", "--val-limit", "2", "--device", "cpu"]
    for command in advice:
        assert cli_main(shlex.split(command)[1:] + short) == 0, command
    assert (out / "model.safetensors").is_file()


def test_under_torchrun_only_rank_0_speaks(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train", "--epochs", "zero"])
    assert exit_.value.code == 2 and capsys.readouterr().err == ""
    assert cli_main(["eval", "/nonexistent/run"]) == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert cli_main(["eval", "/nonexistent/run"]) == 2 and "not found" in capsys.readouterr().err


@needs_data
def test_resume_needs_only_the_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    first = ["train", "--method", "avit", "--model", "vit_tiny_patch16_224", "--img-size", "64",
             "--model-kwargs", '{"patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}',
             "--train-limit", "8", "--val-limit", "8", "--batch-size", "8", "--epochs", "1",
             "--gate-center", "2.5", "--device", "cpu", "--output", str(out)]  # fmt: skip
    assert cli_main(first) == 0
    assert cli_main(["train", "--output", str(out), "--resume", "--epochs", "2"]) == 0
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((out / "config.json").read_text())["gate_center"] == 2.5
    capsys.readouterr()
    assert cli_main(["train", "--output", str(out), "--resume", "--epochs", "3", "--gate-center", "4"]) == 2
    assert "gate_center: 2.5 -> 4.0" in capsys.readouterr().err


def test_a_share_of_a_noisy_bound_is_not_reported():
    from tokensparse.bench import BenchRow, busy_warnings

    steady = BenchRow("dynamicvit", "keep_ratio=0.7", 3.0, 100.0, 1.5, 1.6, spread=0.05, bound_spread=0.04)
    noisy = BenchRow("dynamicvit", "keep_ratio=0.5", 2.0, 120.0, 1.8, 0.99, spread=0.05, bound_spread=0.40)
    assert steady.share_of_bound == pytest.approx(1.5 / 1.6) and noisy.share_of_bound is None
    assert any("keep_ratio=0.5 (40%)" in note for note in busy_warnings([steady, noisy]))


def test_a_run_and_its_onnx_file_carry_their_preprocessing(tmp_path):
    import timm

    from tokensparse.export import data_config

    model = tokensparse.load_run(make_run(tmp_path, "evit"))
    expected = timm.data.resolve_model_data_config(model)
    assert expected["input_size"] == (3, 64, 64) and expected["mean"] == (0.485, 0.456, 0.406)
    tokensparse.export_onnx(model, tmp_path / "m.onnx", verify=False)
    saved = data_config(tmp_path / "m.onnx")
    assert saved["input_size"] == [3, 64, 64] and saved["std"] == list(expected["std"])
