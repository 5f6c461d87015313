"""The paths a user walks: the CLI's start-up, own images and weights, a trained run in Python and in
every command, predictions with pictures, and errors that name the flag to change."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import tokensparse
from tokensparse.cli import build_parser
from tokensparse.cli import main as cli_main

SRC = str(Path(tokensparse.__file__).resolve().parents[1])
README = Path(__file__).resolve().parents[1] / "README.md"
MODEL = "vit_tiny_patch16_224"  # a registered name, so a bare weights file can name it
KW = dict(patch_size=8, embed_dim=32, depth=4, num_heads=2)  # made tiny: 32x32 images, 16 patches
KW_JSON = json.dumps(KW)


def _make_folder(root: Path, per_class: int = 6, classes=("cat", "dog")) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 3)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (40, 40, 3), dtype=np.uint8) + np.uint8(120 * c)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        MODEL,
        "--dataset",
        "folder",
        "--data-root",
        str(data),
        "--img-size",
        "32",
        "--model-kwargs",
        KW_JSON,
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--output",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _make_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def dvit_run(folder, tmp_path_factory) -> Path:
    """A 2-epoch DynamicViT run on the image folder through the CLI (default warm-up: 5 epochs)."""
    out = tmp_path_factory.mktemp("runs") / "dvit"
    torch.manual_seed(0)
    assert cli_main(_train_args(folder, out, "--method", "dynamicvit", "--epochs", "2")) == 0
    return out


def _run_cli(*args: str, code: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "tokensparse", *args]
    environ = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    return subprocess.run(command, capture_output=True, text=True, env=environ, timeout=120)


# ---------------------------------------------------------------------------------------------- item 6


def test_help_version_and_argument_errors_import_no_torch():
    code = """
import sys
from tokensparse.cli import build_parser, main
parser = build_parser()
parser.parse_args(["train", "--method", "avit", "--epochs", "3", "--pretrained"])
parser.parse_args(["bench", "--keep-ratios", "0.5", "0.7"])
parser.parse_args(["predict", "a.png", "--run", "runs/dvit", "--viz", "out.png"])
for argv in (["--help"], ["--version"], ["train", "--help"], ["train", "--method", "bogus"]):
    try:
        main(argv)
    except SystemExit:
        pass
print("TORCH" if "torch" in sys.modules else "NO-TORCH")
"""
    done = _run_cli(code=code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("NO-TORCH"), done.stdout[-300:]
    assert "tokensparse 0.1.0" in done.stdout
    assert "invalid choice: 'bogus'" in done.stderr


def test_module_entry_point_answers_help_and_version():
    done = _run_cli("--help")
    assert done.returncode == 0 and "predict" in done.stdout and "--version" in done.stdout
    assert _run_cli("--version").stdout.strip() == f"tokensparse {tokensparse.__version__}"


def test_train_help_lists_methods_and_demo_help_describes_it(capsys):
    for command in ("train", "demo"):
        with pytest.raises(SystemExit):
            cli_main([command, "--help"])
    out = capsys.readouterr().out
    assert "{dense,dynamicvit,avit,evit,tome,random,static,dynamicspatial,diffrate}" in out
    assert "Start from the shipped dense model" in out and "--study" in out


def test_train_flags_read_from_source_match_the_dataclass():
    import dataclasses

    from tokensparse.cli import train_config_fields
    from tokensparse.train import METHODS, TrainConfig

    fields, methods = train_config_fields()
    expected = [
        (f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        for f in dataclasses.fields(TrainConfig)
    ]
    assert [(name, default) for name, _, default in fields] == expected
    assert methods == tuple(METHODS)


def test_lazy_package_exports_everything():
    for name in tokensparse.__all__:
        assert callable(getattr(tokensparse, name)), name
    with pytest.raises(AttributeError):
        tokensparse.no_such_name  # noqa: B018


# ---------------------------------------------------------------------------------------------- item 4, 5


def test_load_run_gives_an_eval_model_with_class_names(dvit_run):
    model = tokensparse.load_run(dvit_run)
    assert not model.training and model.class_names == ["cat", "dog"]
    assert model.tokensparse_run.method == "dynamicvit"
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)
    assert tokensparse.load_run(dvit_run, keep_ratio=0.5).score_predictor.keep_ratio == 0.5


def test_eval_takes_a_run_or_a_weights_file(dvit_run, capsys):
    assert cli_main(["eval", str(dvit_run), "--json", "--device", "cpu"]) == 0
    by_run = json.loads(capsys.readouterr().out)
    weights = str(dvit_run / "model.safetensors")
    args = ["eval", weights, "--model", MODEL, "--model-kwargs", KW_JSON, "--method", "dynamicvit", "--json"]
    args += [
        "--dataset",
        "folder",
        "--data-root",
        json.loads((dvit_run / "config.json").read_text())["data_root"],
    ]
    assert cli_main(args) == 0
    by_file = json.loads(capsys.readouterr().out)
    assert by_file["images"] == by_run["images"] == 6
    assert by_file["top1"] == by_run["top1"] and by_file["gflops"] == pytest.approx(by_run["gflops"])
    assert cli_main(["eval", weights, "--device", "cpu"]) == 2
    assert "--model NAME --method" in capsys.readouterr().err


def test_eval_of_a_missing_run_says_not_found(tmp_path, capsys):
    assert cli_main(["eval", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_predict_prints_class_names_and_draws_kept_patches(dvit_run, folder, tmp_path, capsys):
    images = [str(folder / "val" / "cat" / "0.png"), str(folder / "val" / "dog" / "1.png")]
    viz = tmp_path / "viz.png"
    assert cli_main(["predict", *images, "--run", str(dvit_run), "--top", "2", "--viz", str(viz)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(images[0] + ": ") and "cat" in out[0] and "dog" in out[0]
    assert out[-1] == f"wrote {viz}" and viz.stat().st_size > 1000
    weights = str(dvit_run / "model.safetensors")
    args = ["predict", images[0], "--run", weights, "--model", MODEL, "--method", "dynamicvit", "--json"]
    args += ["--model-kwargs", KW_JSON]
    assert cli_main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert [t["index"] for t in result[0]["top"]] and result[0]["image"] == images[0]


def test_predict_reads_images_as_the_clutter_set_does(tmp_path):
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from tokensparse.runs import read_images

    model = timm.create_model(MODEL, img_size=64, num_classes=10)
    canvas = np.zeros((64, 64), np.uint8)
    canvas[10:30, 20:40] = 200
    Image.fromarray(canvas).save(tmp_path / "item.png")
    batch = read_images([tmp_path / "item.png"], model, "fashion-mnist-clutter")
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    expected = (torch.from_numpy(canvas).float().div(255).expand(3, -1, -1) - mean) / std
    assert batch.shape == (1, 3, 64, 64) and torch.allclose(batch[0], expected, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="image not found"):
        read_images([tmp_path / "absent.png"], model)


def test_bench_times_a_run(dvit_run, capsys):
    args = ["bench", "--run", str(dvit_run), "--batch-size", "1", "--rounds", "2", "--warmup", "0", "--json"]
    assert cli_main(args + ["--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["setting"] for r in result["rows"]] == ["-", "keep_ratio=0.7"]
    assert str(dvit_run) in result["model"] and all("spread" in r for r in result["rows"])


# ---------------------------------------------------------------------------------------------- item 10


def test_clear_errors_instead_of_tracebacks(folder, tmp_path, capsys):
    assert cli_main(["bench", "--model", "resnet18", "--rounds", "1"]) == 2
    assert "not a vision transformer" in capsys.readouterr().err
    assert cli_main(_train_args(folder, tmp_path / "r", "--model", "resnet18", "--method", "dense")) == 2
    assert "not a vision transformer" in capsys.readouterr().err
    assert cli_main(["train", "--dataset", "folder", "--epochs", "1"]) == 2
    assert "--data-root" in capsys.readouterr().err
    assert cli_main(["train", "--dataset", "torch/cifar10", "--epochs", "1"]) == 2
    assert "--data-root" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    for argv in (
        ["bench", "--device", "cuda"],
        ["eval", "runs/x", "--device", "cuda"],
        ["train", "--device", "cuda"],
    ):
        assert cli_main(argv) == 2, argv
        assert "torch sees no CUDA GPU" in capsys.readouterr().err


def test_every_command_defaults_to_device_auto():
    parser = build_parser()
    for argv in (["bench"], ["train"], ["eval", "r"], ["predict", "a.png", "--run", "r"], ["demo"]):
        assert parser.parse_args(argv).device == "auto", argv


# ---------------------------------------------------------------------------------------------- item 2


def test_foreign_head_refuses_then_finetunes_dense_first(folder, tmp_path, capsys):
    foreign = timm.create_model(MODEL, img_size=32, num_classes=5, **KW)
    tokensparse.save_checkpoint(foreign, tmp_path / "imagenet_like.safetensors")
    out = tmp_path / "mine"
    args = _train_args(folder, out, "--method", "avit", "--epochs", "1", "--checkpoint")
    args.append(str(tmp_path / "imagenet_like.safetensors"))
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "5-class head but the data has 2 classes" in err
    assert (
        f"tokensparse train --method dense --model {MODEL} --model-kwargs" in err and "--img-size 32" in err
    )
    assert f"--checkpoint {out}/dense/model.safetensors" in err and "--finetune-dense-epochs" in err
    assert cli_main(args + ["--finetune-dense-epochs", "1"]) == 0
    assert (out / "dense" / "model.safetensors").is_file() and (out / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "avit" and config["checkpoint"] == str(out / "dense" / "model.safetensors")


def test_pretrained_offline_is_a_clear_error(folder, tmp_path, monkeypatch, capsys):
    import socket

    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    args = _train_args(folder, tmp_path / "p", "--method", "dense", "--epochs", "1", "--pretrained")
    assert cli_main(args) == 2
    assert f"pretrained weights for {MODEL} are not available offline" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- item 3


def test_folder_limits_sample_every_class_seeded(folder):
    from tokensparse.data import build_dataset, spread_over_classes

    limited = build_dataset("folder", root=folder, split="train", img_size=32, limit=4)
    labels = [limited.dataset.reader.samples[i][1] for i in limited.indices]
    assert sorted(labels) == [0, 0, 1, 1]
    again = build_dataset("folder", root=folder, split="train", img_size=32, limit=4)
    assert list(again.indices) == list(limited.indices)
    others = {tuple(spread_over_classes(limited.dataset, 4, seed)) for seed in range(6)}
    assert len(others) > 1  # the seed picks which items
    assert len(build_dataset("folder", root=folder, split="val", img_size=32, limit=100)) == 6


# ---------------------------------------------------------------------------------------------- item 7, 8


def test_warmup_is_scaled_to_short_runs_and_lr_is_the_predictors(dvit_run, capsys):
    lines = [json.loads(line) for line in (dvit_run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for m in lines:
        assert m["lr"] == max(m["lr_groups"].values()) and m["lr"] == m["lr_groups"]["policy"]
    config = json.loads((dvit_run / "config.json").read_text())
    assert config["warmup_epochs"] == 0  # 5 >= 2 epochs: scaled to 2 // 6


def test_bench_spread_and_busy_machine_warning(monkeypatch):
    from tokensparse import bench

    timing = bench.Timing("x", [1.0, 1.0, 1.2, 1.4, 1.0])
    assert timing.median == 1.0 and timing.spread == pytest.approx(0.2)
    assert bench.Timing("y", [2.0]).spread == 0.0
    rows = [bench.BenchRow("dense", "-", 1.0, 10.0, 1.0, None, 0.02)]
    monkeypatch.setattr(os, "getloadavg", lambda: (4.0 * (os.cpu_count() or 1), 0.0, 0.0))
    assert any("machine is busy" in w for w in bench.busy_warnings(rows))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert bench.busy_warnings(rows) == []
    rows.append(bench.BenchRow("dynamicvit", "keep_ratio=0.7", 0.5, 20.0, 2.0, 2.1, 0.25))
    assert bench.busy_warnings(rows) == [
        "timings spread above 10% of their median (IQR) for dynamicvit keep_ratio=0.7: add --rounds or "
        "measure on an idle machine"
    ]
    table = bench.BenchResult("m", 1, "cpu", "float32", 5, "machine", "today", rows).table()
    assert "GFLOPs (MACs)/img" in table.splitlines()[0] and "| 25.0% |" in table


# ---------------------------------------------------------------------------------------------- item 9


def _captured_figure(monkeypatch):
    from tokensparse import viz

    figures = []
    monkeypatch.setattr(viz.plt, "close", figures.append)
    return figures


def test_avit_depth_map_has_one_colour_bar_and_tome_names_r(monkeypatch, tmp_path):
    from tokensparse.viz import token_maps

    figures = _captured_figure(monkeypatch)
    torch.manual_seed(0)
    images = torch.randn(3, 3, 64, 64)
    small = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=5)
    token_maps(
        tokensparse.avit(timm.create_model(MODEL, **small), gate_center=2.0), images, tmp_path / "a.png"
    )
    token_maps(tokensparse.tome(timm.create_model(MODEL, **small), r=6), images, tmp_path / "t.png")
    avit_fig, tome_fig = figures
    assert len(avit_fig.axes) == 3 * 2 + 1  # the image grid and a single colour bar
    assert tome_fig.axes[1].get_title() == "merged groups (r=6)"


def test_accuracy_vs_gflops_labels_each_point(monkeypatch, tmp_path):
    from tokensparse.viz import accuracy_vs_gflops

    figures = _captured_figure(monkeypatch)
    series = {"dynamicvit": [(0.5, 70.0, "0.5"), (0.7, 74.0, "0.7")], "tome": [(0.6, 71.0, "r=8")]}
    accuracy_vs_gflops(series, tmp_path / "acc.png", dense=(1.0, 76.0))
    texts = {t.get_text() for t in figures[0].axes[0].texts}
    assert texts == {"0.5", "0.7", "r=8", "dense"}
    assert (tmp_path / "acc.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------------- item 1


def test_readme_commands_parse_as_written():
    import re

    from tokensparse.policies.registry import import_methods, method_names, unregister_method

    text = README.read_text()
    assert "source .venv/bin/activate" in text
    before = method_names()
    for entry in re.findall(
        r"^export TOKENSPARSE_METHODS=(\S+)", text, re.M
    ):  # its methods join the registry
        import_methods(str(README.parent / entry))
    parser = build_parser()
    for name in set(method_names()) - set(before):
        unregister_method(name)
    for name in [m for m in sys.modules if m.startswith("tokensparse_methods_")]:
        del sys.modules[name]
    commands = [
        line.split("  #")[0].strip()
        for block in text.split("```bash")[1:]
        for line in block.split("```")[0].splitlines()
        if line.startswith("tokensparse ") and "..." not in line
    ]
    assert len(commands) >= 6
    for command in commands:
        try:
            parser.parse_args(shlex.split(command)[1:])
        except SystemExit as exit:  # `--help` prints and exits 0; anything else is a parse error
            assert exit.code == 0 and "--help" in command, command
    assert any(c.startswith("tokensparse train --method dynamicvit --model") for c in commands)


def test_an_unreachable_hub_reads_only_the_cache_at_once(monkeypatch):
    """Offline, --pretrained does not wait out the hub client's retries: the probe fails, the client is
    switched to its cache-only mode for the call, and switched back after."""
    import socket

    import huggingface_hub.constants as hub

    from tokensparse.training import build

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    seen = []

    def create_model(name, pretrained=False, **kwargs):
        seen.append(hub.HF_HUB_OFFLINE)
        raise OSError("not in the cache")

    monkeypatch.setattr(build.timm, "create_model", create_model)
    with pytest.raises(ValueError, match="not available offline"):
        build.pretrained_state_dict("deit_tiny_patch16_224")
    assert seen == [True] and hub.HF_HUB_OFFLINE is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the user's own switch: no probe at all
    assert build.hub_reachable() is False


def test_eval_takes_the_run_positionally_or_as_run_like_the_other_commands(dvit_run, capsys):
    import json

    assert cli_main(["eval", "--run", str(dvit_run), "--json", "--val-limit", "8"]) == 0
    flag = json.loads(capsys.readouterr().out)
    assert cli_main(["eval", str(dvit_run), "--json", "--val-limit", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == flag["top1"]
    assert cli_main(["eval"]) == 2
    assert "give the run folder" in capsys.readouterr().err
    assert cli_main(["eval", str(dvit_run), "--run", "elsewhere"]) == 2
    assert "two runs given" in capsys.readouterr().err


def test_train_help_is_grouped_and_every_option_says_what_it_does():
    import argparse

    from tokensparse.cli import build_parser

    train = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[
        "train"
    ]
    titles = [g.title for g in train._action_groups]
    for title in ("data", "model", "method", "optimisation", "run"):
        assert title in titles
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        silent = [
            a.option_strings[0] for a in command._actions if a.option_strings and not (a.help or "").strip()
        ]
        assert not silent, (name, silent)
