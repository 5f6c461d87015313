"""A method in one file: `examples/attention_prune.py`, named by TOKENSPARSE_METHODS and changed nowhere
else, shows up in `--help` with its own flag, trains, evaluates, benchmarks and exports through the CLI
(the README's "Adding a method")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny

from tokensparse import sparsity_info
from tokensparse.data import fashion_mnist_dir
from tokensparse.engine import run
from tokensparse.policies.registry import import_methods, unregister_method

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "attention_prune.py"


def _cli(*args: str, script: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENSPARSE_METHODS": str(EXAMPLE)}
    command = [sys.executable, "-c", script] if script else [sys.executable, "-m", "tokensparse", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_the_method_and_its_flag_are_in_help():
    done = _cli("train", "--help")
    assert done.returncode == 0, done.stderr
    assert "attention-prune" in done.stdout and "--prune-location" in done.stdout
    assert "the block before which attention-prune drops tokens" in " ".join(done.stdout.split())
    bad = _cli("train", "--method", "attention-prune", "--prune-location", "0", "--epochs", "1")
    assert bad.returncode == 2 and "prune_location (--prune-location) must be >= 1, got 0" in bad.stderr


@pytest.fixture
def example_module():
    import_methods(str(EXAMPLE))
    yield sys.modules["tokensparse_methods_attention_prune"]
    unregister_method("attention-prune")
    del sys.modules["tokensparse_methods_attention_prune"]


def test_it_keeps_the_tokens_the_class_token_attended_to(example_module):
    model = example_module.attention_prune(tiny(depth=4), keep_ratio=0.5, location=2).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        gathered = model.forward_head(run(model, images, regime="gather"))
        kept = sparsity_info(model).kept_index[0]
        # the ranking, recomputed from timm's own attention of block 1
        dense = tiny(depth=4).eval()
        x = dense.norm_pre(dense._pos_embed(dense.patch_embed(images)))
        x = dense.blocks[0](x)
        attn = dense.blocks[1].attn
        qkv = attn.qkv(dense.blocks[1].norm1(x)).reshape(2, 65, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        row = ((qkv[0][:, :, :1] * attn.scale) @ qkv[1].transpose(-2, -1)).softmax(-1).mean(1)[:, 0, 1:]
        expected = row.topk(32, dim=1).indices.sort(dim=1).values
        masked = model.forward_head(run(model, images, regime="mask"))
    assert kept.tolist() == expected.tolist()
    torch.testing.assert_close(masked, gathered, atol=1e-5, rtol=0)  # training form = inference form


@pytest.mark.skipif(
    not any((fashion_mnist_dir() / f"t10k-labels-idx1-ubyte{s}").exists() for s in ("", ".gz")),
    reason="Fashion-MNIST is missing: apt-get install dataset-fashion-mnist",
)
def test_train_eval_bench_export_through_the_cli(tmp_path):
    pytest.importorskip("onnxruntime")
    out, onnx = tmp_path / "run", tmp_path / "model.onnx"
    kwargs = json.dumps({"patch_size": 8, "depth": 3, "embed_dim": 48, "num_heads": 3})
    # one interpreter runs the four commands as a user types them (torch is imported once)
    commands = {
        "train": ["train", "--method", "attention-prune", "--prune-location", "1", "--model", "vit_tiny_patch16_224",
                  "--model-kwargs", kwargs, "--train-limit", "32", "--val-limit", "16", "--batch-size", "16",
                  "--epochs", "1", "--warmup-epochs", "0", "--device", "cpu", "--output", str(out)],
        "eval": ["eval", str(out), "--json", "--device", "cpu"],
        "bench": ["bench", "--run", str(out), "--rounds", "1", "--warmup", "0", "--batch-size", "2", "--device",
                  "cpu", "--json"],
        "export": ["export", str(onnx), "--run", str(out)],
    }  # fmt: skip
    printed = tmp_path / "printed.json"
    script = f"""
import contextlib, io, json
from tokensparse.cli import main
printed = {{}}
for name, argv in {commands!r}.items():
    with contextlib.redirect_stdout(io.StringIO()) as text:
        assert main(argv) == 0, name
    printed[name] = text.getvalue()
open({str(printed)!r}, "w").write(json.dumps(printed))
"""
    done = _cli(script=script)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(printed.read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "attention-prune"
    assert config["method_settings"] == {"prune_location": 1}  # its own setting, recorded with the run
    assert config["keep_ratio"] == 0.7 and config["distill_weight"] == 0.5  # its recipe
    trained = json.loads(printed["train"].strip().splitlines()[-1])
    evaluated = json.loads(printed["eval"].strip().splitlines()[-1])
    assert evaluated["top1"] == pytest.approx(trained["val_top1"])
    rows = {row["method"]: row for row in json.loads(printed["bench"])["rows"]}
    assert rows["attention-prune"]["gflops"] < 0.9 * rows["dense"]["gflops"]  # a third of the patches go
    assert evaluated["gflops"] == pytest.approx(trained["val_gflops"])
    assert onnx.is_file() and "same kept patches: True" in printed["export"]
