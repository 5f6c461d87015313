"""Faults: no silent wrong result, no lost run. One test per kind of fault.

Kills at the worst moment are simulated by raising inside the checkpoint code (monkeypatch), or by
a rank exiting there under torchrun.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import tokensparse.checkpoints as checkpoints_module
import tokensparse.training.loop as train_module
import tokensparse.training.run_dir as run_dir_module
from tokensparse import save_checkpoint
from tokensparse.cli import main as cli_main
from tokensparse.data import build_dataset, fashion_mnist_dir, num_classes
from tokensparse.train import TrainConfig, train

HAVE_FASHION_MNIST = any(
    (fashion_mnist_dir() / f"t10k-labels-idx1-ubyte{ext}").exists() for ext in ("", ".gz")
)
needs_data = pytest.mark.skipif(not HAVE_FASHION_MNIST, reason="Fashion-MNIST is missing")

TINY = {"patch_size": 8, "depth": 2, "embed_dim": 24, "num_heads": 2}
BASE = dict(
    model="vit_tiny_patch16_224",
    model_kwargs=TINY,
    img_size=32,
    train_limit=48,
    val_limit=16,
    batch_size=16,
    warmup_epochs=0,
    workers=0,
)


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, and no `except Exception` catches it."""


def cfg(out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**BASE, "method": "dense", "epochs": 2, "output": str(out), **kw})


def args(out: Path, **kw) -> list[str]:
    result = []
    for key, value in {**BASE, "method": "dense", "epochs": 1, "output": str(out), **kw}.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            result.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, dict):
            result += [flag, json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            result += [flag, *map(str, value)]
        else:
            result += [flag, str(value)]
    return result


def strict_lines(path: Path) -> list[dict]:
    """metrics.jsonl as strict JSON: NaN or Infinity in it fails."""

    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def same_metrics(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        x, y = dict(x), dict(y)
        x.pop("epoch_seconds"), y.pop("epoch_seconds")
        x.pop("val_img_s", None), y.pop("val_img_s", None)
        assert x == y


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def make_folder(root: Path, train: dict[str, int], val: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for split, classes in (("train", train), ("val", val)):
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


# ----------------------------------------------------------------------------- 1. labels that match


def test_1_validation_labels_follow_the_training_class_list(tmp_path):
    make_folder(tmp_path, {"ant": 2, "bee": 2, "cat": 2}, {"ant": 1, "bee": 0, "cat": 2})
    with pytest.warns(UserWarning, match="no images of 1 training classes: bee"):
        val = build_dataset("folder", tmp_path, "val", img_size=16)
    # per-split class lists would make cat label 1 here: a perfect model would score 33%
    assert [label for _, label in val] == [0, 2, 2] and num_classes(val) == 3

    other = tmp_path / "other"
    make_folder(other, {"ant": 2, "bee": 2}, {"ant": 1, "dog": 1})
    with pytest.raises(ValueError, match="classes with no training images .*: dog"):
        build_dataset("folder", other, "val", img_size=16)

    empty = tmp_path / "empty"
    make_folder(empty, {"ant": 0}, {"ant": 0})
    with pytest.raises(ValueError, match="empty ImageFolder"):
        build_dataset("folder", empty, "train", img_size=16)


# ----------------------------------------------------------------------------- 2. one run per folder


@needs_data
def test_2_a_run_folder_belongs_to_one_configuration(tmp_path, capsys):
    out = tmp_path / "run"
    train(cfg(out, epochs=1))
    first = (out / "checkpoints" / "epoch0000.safetensors").read_bytes()

    assert cli_main(["train", *args(out, seed=5)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err
    assert (out / "checkpoints" / "epoch0000.safetensors").read_bytes() == first  # nothing touched
    assert len(strict_lines(out / "metrics.jsonl")) == 1

    assert cli_main(["train", *args(out, resume=True, lr=2e-3, opt="sgd")]) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "lr: 0.001 -> 0.002" in err and "opt: 'adamw' -> 'sgd'" in err

    assert cli_main(["train", *args(out, resume=True, model_kwargs={**TINY, "depth": 3})]) == 2
    assert "model_kwargs" in capsys.readouterr().err

    train(cfg(out, epochs=1, seed=5, overwrite=True))  # replaces the old run entirely
    assert json.loads((out / "config.json").read_text())["seed"] == 5
    assert [m["epoch"] for m in strict_lines(out / "metrics.jsonl")] == [1]
    assert (out / "checkpoints" / "epoch0000.safetensors").read_bytes() != first


# ----------------------------------------------------------------------------- 3. exact resume


@needs_data
def test_3_kill_after_last_json_with_skipped_steps_resumes_bit_identically(tmp_path, monkeypatch):
    real_loss = train_module.compute_loss
    calls = {"n": 0, "armed": True}

    def flaky(*a, **k):  # two non-finite steps in the first epoch: the schedule must not shift
        loss, parts = real_loss(*a, **k)
        calls["n"] += 1
        return (loss * math.nan if calls["armed"] and calls["n"] in (2, 3) else loss), parts

    monkeypatch.setattr(train_module, "compute_loss", flaky)
    whole = train(cfg(tmp_path / "whole", epochs=3, lr=5e-3))
    assert whole["nan_skipped"] == 2

    calls["n"] = 0
    real_write = run_dir_module.write_metrics

    def killed_in_epoch_2(path, history):  # after last.json names epoch 2, before metrics.jsonl has it
        if len(history) == 2:
            raise Killed
        real_write(path, history)

    monkeypatch.setattr(run_dir_module, "write_metrics", killed_in_epoch_2)
    with pytest.raises(Killed):
        train(cfg(tmp_path / "killed", epochs=3, lr=5e-3))
    killed = tmp_path / "killed"
    assert json.loads((killed / "checkpoints" / "last.json").read_text())["epoch"] == 1
    assert len(strict_lines(killed / "metrics.jsonl")) == 1  # the line of epoch 2 is lost

    monkeypatch.setattr(run_dir_module, "write_metrics", real_write)
    calls["armed"] = False
    train(cfg(killed, epochs=3, lr=5e-3, resume=True))
    same_metrics(strict_lines(tmp_path / "whole" / "metrics.jsonl"), strict_lines(killed / "metrics.jsonl"))
    same_weights(tmp_path / "whole" / "model.safetensors", killed / "model.safetensors")


@needs_data
def test_3_more_epochs_on_resume_follow_the_longer_schedule(tmp_path, capsys):
    train(cfg(tmp_path / "fresh", epochs=3, lr=5e-3))
    fresh = strict_lines(tmp_path / "fresh" / "metrics.jsonl")
    short = tmp_path / "short"
    train(cfg(short, epochs=1, lr=5e-3))
    assert cli_main(["train", *args(short, epochs=3, lr=5e-3, resume=True)]) == 0
    extended = strict_lines(short / "metrics.jsonl")
    assert [m["epoch"] for m in extended] == [1, 2, 3]
    assert json.loads((short / "config.json").read_text())["epochs"] == 3
    # epoch 2 trains on the 3-epoch cosine (not at min_lr, where the 1-epoch schedule ended)
    assert extended[1]["lr"] == pytest.approx(fresh[1]["lr"], rel=1e-12) and extended[1]["lr"] > 1e-4


def _ddp_rank(rank: int, world: int, port: int, settings: dict, die_after_epoch: int | None) -> None:
    """One rank of a 2-process gloo group, spawned from the test: a fresh process, as torchrun starts
    one (a fork of a process that already ran autograd cannot use autograd's threads)."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if die_after_epoch is not None:
        real = run_dir_module.write_metrics

        def write(path, history):  # rank 0 dies after last.json, before metrics.jsonl
            if len(history) == die_after_epoch:
                os._exit(9)
            real(path, history)

        run_dir_module.write_metrics = write
    try:
        train(TrainConfig(**settings))
        torch.distributed.destroy_process_group()
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def run_ddp(settings: dict, die_after_epoch: int | None = None, timeout: float = 180) -> None:
    import multiprocessing
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    ranks = [
        context.Process(target=_ddp_rank, args=(rank, 2, port, settings, die_after_epoch))
        for rank in range(2)
    ]
    for process in ranks:
        process.start()
    try:
        ranks[0].join(timeout)
        if die_after_epoch is not None:
            assert ranks[0].exitcode == 9, ranks[0].exitcode
            return  # rank 1 waits for rank 0 forever: the finally below ends it, as torchrun would
        ranks[1].join(max(10.0, timeout / 4))
        assert [p.exitcode for p in ranks] == [0, 0], "a rank failed or hung"
    finally:
        for process in ranks:
            if process.is_alive():
                process.kill()
                process.join()


@needs_data
def test_3_4_ddp_dynamicvit_kill_resume_is_exact_and_an_empty_val_shard_does_not_hang(tmp_path):
    """Two ranks, DynamicViT with drop path (so every rank's RNG matters), one validation image (rank 1
    has none: it must still join every collective). Rank 0 dies right after `last.json` of epoch 1."""
    common = dict(
        BASE,
        method="dynamicvit",
        locations=[1],
        keep_ratio=0.5,
        drop_path=0.2,
        epochs=2,
        val_limit=1,
        train_limit=32,
        lr=5e-3,
    )
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_ddp(dict(common, output=str(whole)))
    assert json.loads((whole / "config.json").read_text())["world_size"] == 2
    assert strict_lines(whole / "metrics.jsonl")[-1]["val_images"] == 1
    run_ddp(dict(common, output=str(killed)), die_after_epoch=1)
    assert json.loads((killed / "checkpoints" / "last.json").read_text())["epoch"] == 0
    assert not (killed / "metrics.jsonl").exists()
    run_ddp(dict(common, output=str(killed), resume=True))
    same_metrics(strict_lines(whole / "metrics.jsonl"), strict_lines(killed / "metrics.jsonl"))
    same_weights(whole / "model.safetensors", killed / "model.safetensors")


# ----------------------------------------------------------------------------- 5. wrong values


@needs_data
def test_5_wrong_values_are_refused_by_flag_and_nan_never_reaches_json(tmp_path, monkeypatch, capsys):
    out = tmp_path / "x"
    for flag, value in [
        ("--clip-grad", "-1"),
        ("--img-size", "0"),
        ("--val-limit", "0"),
        ("--train-limit", "0"),
        ("--smoothing", "2"),
        ("--keep-ratio", "1.5"),
    ]:
        assert cli_main(["train", *args(out), flag, value]) == 2, flag
        assert flag in capsys.readouterr().err, flag
    assert not out.exists()
    for flag in ("--batch-size", "--val-limit"):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["eval", str(out), flag, "0"])
        assert exit_info.value.code == 2 and "must be >= 1" in capsys.readouterr().err

    # every step non-finite: the epoch's train loss is unknown, written as null
    monkeypatch.setattr(train_module, "compute_loss", lambda *a, **k: (torch.tensor(math.nan), {}))
    train(cfg(out, epochs=1, max_nan_streak=100))
    (line,) = strict_lines(out / "metrics.jsonl")
    assert line["train_loss"] is None and line["nan_skipped"] == 3

    # a model with NaN weights is wrong on every image, not right by chance
    from tokensparse.data import build_loader
    from tokensparse.evaluate import evaluate

    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, **TINY)
    with torch.no_grad():
        model.head.weight.fill_(math.nan)
    loader = build_loader(build_dataset(limit=16, img_size=32, split="val"), 8, is_training=False)
    with pytest.warns(UserWarning, match="16 of 16 images got non-finite logits"):
        result = evaluate(model, loader, progress=False)
    assert result["top1"] == 0.0 and result["top5"] == 0.0 and result["nonfinite_outputs"] == 16


# ----------------------------------------------------------------------------- 6. one-line errors


@needs_data
def test_6_errors_are_one_line_with_exit_code_2(tmp_path, monkeypatch, capsys):
    def fails(argv: list[str], *needles: str) -> None:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("tokensparse ") and "Traceback" not in err
        for needle in needles:
            assert needle in err, (needle, err)

    other = timm.create_model(
        "vit_tiny_patch16_224", num_classes=10, img_size=32, **{**TINY, "embed_dim": 12}
    )
    wrong = save_checkpoint(other, tmp_path / "wrong.safetensors")
    fails(["train", *args(tmp_path / "a", checkpoint=wrong)], "--checkpoint", "shape mismatch")
    fails(["train", *args(tmp_path / "b", method="dynamicvit", teacher=wrong)], "--teacher", "shape mismatch")
    fails(
        ["train", *args(tmp_path / "c", model_kwargs={**TINY, "no_such_arg": 1})],
        "--model-kwargs",
        "no_such_arg",
    )
    if not torch.cuda.is_available():
        fails(["train", *args(tmp_path / "d", device="cuda")], "--device cuda", "no CUDA GPU")
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "val" / "a").mkdir(parents=True)
    fails(["train", *args(tmp_path / "e", dataset="folder", data_root=empty)], "empty ImageFolder")

    run = tmp_path / "run"
    train(cfg(run, epochs=1))
    fails(["train", *args(run, resume=True, method="evit")], "another configuration", "method")
    fails(["train", *args(run, resume=True, model="deit_tiny_patch16_224")], "model: ")
    state = run / "checkpoints" / "epoch0000.state.pt"
    good = state.read_bytes()
    state.write_bytes(good[:100])
    fails(["train", *args(run, resume=True, epochs=2)], str(state), "not a readable training state")
    state.write_bytes(good)

    def disk_full(f, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoints_module, "_write_file", disk_full)
    fails(["train", *args(tmp_path / "full")], "No space left on device", str(tmp_path / "full"))
    assert not list((tmp_path / "full").rglob("*.tmp"))  # no temporary file left behind

    def read_only(f, data):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(checkpoints_module, "_write_file", read_only)
    fails(["train", *args(tmp_path / "ro")], "Read-only file system")


# ----------------------------------------------------------------------------- 7. files


@needs_data
def test_7_orphans_are_cleaned_corrupt_files_named_and_sparse_models_pickle(tmp_path, capsys):
    run = tmp_path / "run"
    train(cfg(run, epochs=1))
    ckpt = run / "checkpoints"
    orphans = [ckpt / ".epoch0001.state.pt.tmp", ckpt / "epoch0001.safetensors", run / ".config.json.x.tmp"]
    for orphan in orphans:  # a kill during epoch 1's writes leaves these
        orphan.write_bytes(b"partial")
    train(cfg(run, epochs=2, keep_checkpoints=1, resume=True))
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "epoch0001.safetensors",
        "epoch0001.state.pt",
        "last.json",
    ]
    assert not list(run.rglob("*.tmp"))

    (ckpt / "last.json").write_text('{"epo')
    assert cli_main(["train", *args(run, epochs=2, resume=True)]) == 2
    assert str(ckpt / "last.json") in capsys.readouterr().err
    (run / "config.json").write_text("{")
    assert cli_main(["train", *args(run, epochs=2, resume=True)]) == 2
    assert str(run / "config.json") in capsys.readouterr().err

    from tokensparse import dynamicvit

    model = dynamicvit(
        timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, **TINY), 0.5, [1]
    )
    buffer = io.BytesIO()
    torch.save(model, buffer)
    copy = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    images = torch.randn(2, 3, 32, 32)
    assert type(copy) is type(model) and torch.equal(copy.eval()(images), model.eval()(images))
