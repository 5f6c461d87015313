"""FLOP budgets: every method's knob solved for a target of executed GMACs (tokensparse.budget)."""

import pytest
import torch
from conftest import tiny

import tokensparse
from tokensparse.budget import TOLERANCE
from tokensparse.engine import get_policy


def vit():
    # 64 patches, 12 blocks: DynamicViT's three stages at blocks 3, 6, 9
    return tiny("vit_tiny_patch16_224", depth=12).eval()


DENSE = tokensparse.gflops(vit())


def within(model, target, images=None):
    got = tokensparse.gflops(model, images)
    assert (1 - TOLERANCE) * target <= got <= target, (got, target)
    return got


@pytest.mark.parametrize("share", [0.5, 0.63, 0.75, 0.9])
@pytest.mark.parametrize(
    "method",
    [tokensparse.dynamicvit, tokensparse.evit, tokensparse.random_prune, tokensparse.static_prune],
)
def test_keep_ratio_methods_meet_the_target(method, share):
    target = share * DENSE
    model = method(vit(), target_gflops=target)
    within(model, target)
    ratio = get_policy(model).keep_ratio
    assert 0 < ratio < 1
    # the largest such ratio: a little more keeps more tokens and breaks the budget
    again = method(vit(), keep_ratio=min(1.0, ratio + 0.02))
    assert tokensparse.gflops(again) > target


@pytest.mark.parametrize("share", [0.45, 0.6, 0.72, 0.9])
def test_tome_meets_the_target_with_a_schedule_where_one_r_is_too_coarse(share):
    target = share * DENSE
    model = tokensparse.tome(vit(), target_gflops=target)
    within(model, target)
    uniform = [tokensparse.gflops(tokensparse.tome(vit(), r=r)) for r in range(0, 33)]
    if not any((1 - TOLERANCE) * target <= g <= target for g in uniform):
        assert isinstance(model.r, list) and len(model.r) == 12  # one r per block got it within 2%


def test_avit_calibrates_its_gate_on_the_images_given():
    torch.manual_seed(0)
    images = torch.randn(8, 3, 64, 64)
    model = vit()
    target = 0.6 * tokensparse.gflops(model)
    model = tokensparse.avit(model, target_gflops=target, images=images)
    within(model, target, images)
    with pytest.raises(ValueError, match="give `images`"):
        tokensparse.avit(vit(), target_gflops=target)
    with pytest.raises(ValueError, match="not both"):
        tokensparse.avit(vit(), gate_center=30.0, target_gflops=target, images=images)


def test_solving_leaves_the_mode_and_reports_the_reachable_range():
    model = vit().train()
    tokensparse.dynamicvit(model, target_gflops=0.7 * DENSE)
    assert model.training  # counted in eval mode, handed back as it came
    with pytest.raises(ValueError, match="at or above the dense model's"):
        tokensparse.dynamicvit(vit(), target_gflops=DENSE * 1.01)
    with pytest.raises(ValueError, match=r"below what tome reaches on this model: it executes between"):
        tokensparse.tome(vit(), target_gflops=0.01 * DENSE)
    with pytest.raises(ValueError, match="below what dynamicvit reaches"):
        tokensparse.dynamicvit(vit(), target_gflops=0.05 * DENSE)
    with pytest.raises(ValueError, match="not both"):
        tokensparse.evit(vit(), keep_ratio=0.5, target_gflops=0.7 * DENSE)
    with pytest.raises(ValueError, match="not both"):
        tokensparse.tome(vit(), r=4, target_gflops=0.7 * DENSE)
    with pytest.raises(ValueError, match="positive number"):
        tokensparse.dynamicvit(vit(), target_gflops=-1.0)


def test_a_budget_between_two_neighbouring_settings_names_them():
    # 4 patches (32x32 at patch 16): one token more or less moves the FLOPs by far more than 2%
    model = tiny("vit_tiny_patch16_224", img_size=32, patch_size=16, depth=12).eval()
    dense = tokensparse.gflops(model)
    with pytest.raises(ValueError, match="nearest are keep_ratio="):
        tokensparse.static_prune(model, target_gflops=0.9 * dense)


# --------------------------------------------------------------------------- runs and the command line


@pytest.mark.parametrize("method", ["dynamicvit", "tome"])
def test_a_trained_run_evaluates_at_a_budget(tmp_path, method):
    from conftest import make_run

    run = make_run(tmp_path, method)
    dense = tokensparse.gflops(tokensparse.load_run(run, keep_ratio=1.0) if method != "tome" else
                               tokensparse.load_run(run, tome_r=0))  # fmt: skip
    model = tokensparse.load_run(run, target_gflops=0.6 * dense)
    within(model, 0.6 * dense)
    assert model.tokensparse_run.target_gflops == pytest.approx(0.6 * dense)
    with pytest.raises(ValueError, match="or --target-gflops, not both"):
        knob = {"tome_r": 4} if method == "tome" else {"keep_ratio": 0.5}
        tokensparse.load_run(run, target_gflops=0.6 * dense, **knob)
    with pytest.raises(ValueError, match="--target-gflops applies to --method"):
        tokensparse.load_run(make_run(tmp_path, "avit"), target_gflops=0.6 * dense)


def test_eval_and_export_take_a_budget(tmp_path, capsys):
    import timm
    from conftest import make_run

    from tokensparse.cli import main

    # 16 patches: far coarser than 2% steps, so the target is one the method reaches exactly
    reachable = tokensparse.gflops(tokensparse.evit(timm.create_model("vit_tiny_patch16_224", img_size=64)))
    onnx = tmp_path / "evit.onnx"
    export = ["export", str(onnx), "--model", "vit_tiny_patch16_224", "--img-size", "64", "--method", "evit"]
    assert main([*export, "--target-gflops", str(reachable), "--no-verify"]) == 0
    assert onnx.is_file()
    assert main([*export, "--method", "dense", "--target-gflops", "1", "--no-verify"]) == 2
    assert "the dense model has none" in capsys.readouterr().err
    run = make_run(tmp_path, "evit")
    target = 0.7 * tokensparse.gflops(tokensparse.load_run(run, keep_ratio=1.0))
    with pytest.raises(SystemExit) as exit_:
        main(["eval", run, "--target-gflops=-1"])
    assert exit_.value.code == 2
    assert main(["eval", run, "--target-gflops", str(10 * target)]) == 2
    assert "at or above the dense model's" in capsys.readouterr().err


def test_train_solves_the_budget_records_the_knob_and_resumes_to_it(tmp_path, capsys):
    import json

    import timm
    from conftest import TINY_KWARGS

    from tokensparse.cli import main

    dense = tokensparse.gflops(
        timm.create_model("deit_tiny_patch16_224", img_size=64, num_classes=10, **TINY_KWARGS)
    )
    target = 0.6 * dense
    out = tmp_path / "run"
    args = ["train", "--method", "dynamicvit", "--model", "deit_tiny_patch16_224", "--model-kwargs",
            json.dumps(TINY_KWARGS), "--img-size", "64", "--epochs", "1", "--train-limit", "64", "--val-limit", "16",
            "--batch-size", "32", "--target-gflops", str(target), "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "--target-gflops" in capsys.readouterr().err  # it says which keep ratio it solved
    config = json.loads((out / "config.json").read_text())
    assert config["target_gflops"] is None and config["solved_for_gflops"] == pytest.approx(target)
    model = tokensparse.load_run(out)
    assert tokensparse.get_policy(model).keep_ratio == config["keep_ratio"] < 1
    within(model, target)
    assert main([*args, "--epochs", "2", "--resume"]) == 0  # the same budget solves to the same knob
    assert json.loads((out / "config.json").read_text())["keep_ratio"] == config["keep_ratio"]
