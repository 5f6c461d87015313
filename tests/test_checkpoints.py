from __future__ import annotations

import pytest
import torch
from conftest import backbone_state, golden, golden_vit, tiny

import tokensparse
from tokensparse import CheckpointError, load_checkpoint, save_checkpoint


def test_authors_release_format_loads(tmp_path):
    official = golden("dynamicvit_official")
    path = tmp_path / "dynamicvit_authors.pth"
    torch.save({"model": backbone_state(official), "epoch": 29}, path)
    model = load_checkpoint(tokensparse.dynamicvit(golden_vit(), keep_ratio=0.7), path).eval()
    with torch.no_grad():
        logits = model(official["input"])
    torch.testing.assert_close(logits, official["eval_logits.rho0.7"], atol=1e-4, rtol=0)


def test_own_safetensors_round_trip(tmp_path):
    model = tokensparse.dynamicvit(tiny(), locations=(1, 3))
    path = save_checkpoint(model, tmp_path / "sub" / "weights.safetensors", {"method": "dynamicvit"})
    assert path.is_file() and not list(path.parent.glob(".*tmp"))
    fresh = tokensparse.dynamicvit(tiny(depth=6), locations=(1, 3))
    torch.nn.init.zeros_(fresh.score_predictor[0].in_conv[1].weight)
    load_checkpoint(fresh, path)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_dense_timm_checkpoint_into_dynamicvit_names_the_missing_predictors(tmp_path):
    dense = tiny()
    path = tmp_path / "timm.pth"
    torch.save(dense.state_dict(), path)
    sparse = tokensparse.dynamicvit(tiny(), locations=(1, 3))
    with pytest.raises(CheckpointError, match="missing 20 keys: score_predictor.0.in_conv.0.bias") as err:
        load_checkpoint(sparse, path)
    assert "strict=False" in str(err.value)
    load_checkpoint(sparse, path, strict=False)
    torch.testing.assert_close(sparse.pos_embed, dense.pos_embed)


def test_shape_mismatch_is_named(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": tiny(num_classes=3).state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"head.weight: file \(3, 48\) vs model \(7, 48\)"):
        load_checkpoint(tiny(), path)


def test_corrupt_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tiny(), tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="could not be loaded as weights"):
        load_checkpoint(tiny(), bad)
    good = tmp_path / "w.safetensors"
    save_checkpoint(tiny(), good)
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tiny(), truncated)


class Payload:
    def __reduce__(self):
        return (print, ("code from a checkpoint ran",))


def test_pickled_code_is_never_run(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, path)  # unpickling would import and build this class
    with pytest.raises(CheckpointError, match="never runs"):
        load_checkpoint(tiny(), path)
