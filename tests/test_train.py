from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tokensparse.training.loop as train_module
from tokensparse import CheckpointError
from tokensparse.cli import main as cli_main
from tokensparse.data import fashion_mnist_dir
from tokensparse.train import TrainConfig, train

if (
    not (fashion_mnist_dir() / "t10k-labels-idx1-ubyte.gz").exists()
    and not (fashion_mnist_dir() / "t10k-labels-idx1-ubyte").exists()
):
    pytest.skip("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist", allow_module_level=True)

TINY = {"patch_size": 8, "depth": 4, "embed_dim": 48, "num_heads": 3}
BASE = dict(
    model="vit_tiny_patch16_224",
    model_kwargs=TINY,
    train_limit=128,
    val_limit=64,
    batch_size=32,
    warmup_epochs=0,
    workers=0,
)


def cli_args(cfg: dict) -> list[str]:
    args = []
    for key, value in cfg.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, dict):
            args += [flag, json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dense")
    train(TrainConfig(method="dense", epochs=6, lr=2e-3, output=str(out), **{**BASE, "train_limit": 64}))
    return out


def test_dense_training_lowers_the_loss(dense_run):
    losses = [m["train_loss"] for m in metrics(dense_run)]
    assert losses[-1] < losses[0] - 0.05, losses
    config = json.loads((dense_run / "config.json").read_text())
    assert config["num_classes"] == 10 and config["img_size"] == 64
    assert (dense_run / "model.safetensors").is_file()


def test_dynamicvit_finetune_from_dense_and_eval(dense_run, tmp_path, capsys):
    out = tmp_path / "dvit"
    cfg = TrainConfig(
        method="dynamicvit",
        checkpoint=str(dense_run / "model.safetensors"),
        locations=[1, 2, 3],
        epochs=1,
        output=str(out),
        **BASE,
    )
    last = train(cfg)
    assert last["val_keep_ratio_per_stage"] == pytest.approx([44 / 64, 31 / 64, 21 / 64], abs=1e-4)
    assert (
        last["val_gflops"]
        < json.loads((dense_run / "metrics.jsonl").read_text().splitlines()[-1])["val_gflops"]
    )
    assert (out / "teacher.safetensors").is_file()
    assert cli_main(["eval", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["top1"] == pytest.approx(last["val_top1"]) and result["method"] == "dynamicvit"


def test_nan_losses_are_skipped_then_abort(monkeypatch, tmp_path):
    real = train_module.compute_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] in (2, 3) else loss), parts

    monkeypatch.setattr(train_module, "compute_loss", flaky)
    last = train(TrainConfig(method="dense", epochs=1, output=str(tmp_path / "a"), **BASE))
    assert last["nan_skipped"] == 2 and math.isfinite(last["train_loss"])

    monkeypatch.setattr(
        train_module, "compute_loss", lambda *a, **k: (torch.tensor(float("inf"), requires_grad=True), {})
    )
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite losses"):
        train(TrainConfig(method="dense", epochs=1, max_nan_streak=3, output=str(tmp_path / "b"), **BASE))


def test_killed_run_resumes_to_the_same_metrics(tmp_path):
    cfg = dict(BASE, method="dense", epochs=3, train_limit=256, lr=1e-3, seed=3)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "tokensparse", "train"]
    whole = tmp_path / "whole"
    subprocess.run(command + cli_args(dict(cfg, output=str(whole))), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        command + cli_args(dict(cfg, output=str(killed))),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pointer = killed / "checkpoints" / "last.json"
    deadline = time.time() + 120
    while not pointer.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert pointer.exists() and json.loads(pointer.read_text())["epoch"] < 2, (
        "the run finished before the kill"
    )
    subprocess.run(
        command + cli_args(dict(cfg, output=str(killed), resume=True)),
        check=True,
        env=env,
        capture_output=True,
    )
    expected, got = metrics(whole), metrics(killed)
    assert [m["epoch"] for m in got] == [1, 2, 3]
    for a, b in zip(expected, got):
        assert a["train_loss"] == b["train_loss"] and a["val_top1"] == b["val_top1"], (a, b)


def test_ddp_two_processes(dense_run, tmp_path):
    out = tmp_path / "ddp"
    cfg = dict(
        BASE,
        method="dynamicvit",
        checkpoint=str(dense_run / "model.safetensors"),
        locations=[1, 2, 3],
        epochs=1,
        output=str(out),
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "tokensparse",
            "train",
            *cli_args(cfg),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    (last,) = metrics(out)
    assert last["val_images"] == 64  # both ranks' shards counted once each
    assert (out / "model.safetensors").is_file()


def test_bad_input_is_named(dense_run, tmp_path, capsys):
    base = cli_args(dict(BASE, epochs=1, output=str(tmp_path / "x")))
    assert cli_main(["train", *base, "--dataset", "folder", "--data-root", str(tmp_path / "nowhere")]) == 2
    assert "ImageFolder root not found" in capsys.readouterr().err
    assert cli_main(["train", *base, "--img-size", "60"]) == 2
    assert "image size 60 is not a multiple of vit_tiny_patch16_224's patch size 8" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert cli_main(["train", *base, "--checkpoint", str(bad)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    assert cli_main(["train", *base, "--model", "no_such_model"]) == 2
    assert "Unknown model (no_such_model)" in capsys.readouterr().err
    with pytest.raises(CheckpointError):
        train(TrainConfig(method="dense", epochs=1, checkpoint=str(bad), output=str(tmp_path / "y"), **BASE))


def test_wrong_head_size_is_replaced_with_a_warning(tmp_path):
    import timm

    from tokensparse import save_checkpoint

    other = timm.create_model("vit_tiny_patch16_224", num_classes=1000, img_size=64, **TINY)
    path = save_checkpoint(other, tmp_path / "in1k.safetensors")
    with pytest.warns(UserWarning, match="head has 1000 classes but the data has 10"):
        train(TrainConfig(method="dense", epochs=1, checkpoint=str(path), output=str(tmp_path / "z"), **BASE))


@pytest.mark.parametrize("method", ["evit", "tome", "random", "static"])
def test_baselines_fine_tune_and_evaluate(dense_run, tmp_path, method, capsys):
    out = tmp_path / method
    last = train(
        TrainConfig(
            method=method,
            checkpoint=str(dense_run / "model.safetensors"),
            **({"tome_r": 4} if method == "tome" else {"locations": [1, 2, 3]}),
            epochs=1,
            output=str(out),
            **BASE,
        )
    )
    dense_gflops = json.loads((dense_run / "metrics.jsonl").read_text().splitlines()[-1])["val_gflops"]
    assert last["val_gflops"] < dense_gflops and math.isfinite(last["train_loss"])
    assert cli_main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top1"] == pytest.approx(
        last["val_top1"]
    )
