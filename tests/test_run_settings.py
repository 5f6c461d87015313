"""Every setting `load_run` / `eval` accepts on a trained run changes the model, or is refused."""

from __future__ import annotations

import pytest
import torch
from conftest import make_run

import tokensparse
from tokensparse.engine import get_policy


def kept_tokens(model) -> list[int]:
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    return [k.shape[1] for k in tokensparse.sparsity_info(model).kept_index]


@pytest.mark.parametrize("method", ["dynamicvit", "evit", "random", "static"])
def test_keep_ratio_at_evaluation_reaches_every_pruning_method(tmp_path, method):
    run = make_run(tmp_path, method, keep_ratio=0.7)
    trained = tokensparse.load_run(run)
    changed = tokensparse.load_run(run, keep_ratio=0.3)
    assert changed.tokensparse_run.keep_ratio == 0.3 and get_policy(changed).keep_ratio == 0.3
    assert kept_tokens(changed)[0] < kept_tokens(trained)[0]
    assert tokensparse.gflops(changed) < tokensparse.gflops(trained)


def test_tome_r_and_gate_centre_at_evaluation_reach_the_model(tmp_path):
    assert tokensparse.load_run(make_run(tmp_path, "tome", tome_r=2), tome_r=6).r == 6
    avit = tokensparse.load_run(make_run(tmp_path, "avit"), gate_center=3.0)
    assert avit.halting.gate_center == 3.0 and avit.tokensparse_run.gate_center == 3.0


@pytest.mark.parametrize(
    ("method", "setting", "flag"),
    [
        ("tome", {"keep_ratio": 0.3}, "--keep-ratio"),
        ("avit", {"keep_ratio": 0.3}, "--keep-ratio"),
        ("dense", {"keep_ratio": 0.3}, "--keep-ratio"),
        ("dynamicvit", {"gate_center": 5.0}, "--gate-center"),
    ],
)
def test_a_setting_the_method_does_not_read_is_refused(tmp_path, method, setting, flag):
    run = make_run(tmp_path, method)
    with pytest.raises(ValueError, match=f"{flag} applies to --method .*, not {method}"):
        tokensparse.load_run(run, **setting)


@pytest.mark.parametrize("center", [float("nan"), float("inf")])
def test_a_non_finite_gate_centre_is_refused(tmp_path, center):
    with pytest.raises(ValueError, match="gate_center"):
        tokensparse.load_run(make_run(tmp_path, "avit"), gate_center=center)


def test_a_random_run_evaluates_reproducibly_with_its_seed(tmp_path):
    run = make_run(tmp_path, "random", keep_ratio=0.5, seed=3)
    images = torch.randn(4, 3, 64, 64)
    outputs = []
    for _ in range(2):
        model = tokensparse.load_run(run)
        with torch.no_grad():
            outputs.append(model(images))
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)
    assert get_policy(model).seed == 3
