"""DiffRate against the authors' code (tests/golden/diffrate_official.safetensors and
diffrate_mae_official.safetensors, made by tests/golden_tools/make_diffrate_golden.py from
OpenGVLab/DiffRate): the inference forward at their published counts (logits, which input tokens each
token holds, sizes), the search (loss, FLOPs, counts and the gradients of every rate logit), and their
MAE model's inference with its size-weighted average pool."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import tokensparse
from tokensparse.engine import num_patches
from tokensparse.policies.diffrate import DiffRatePolicy, authors_flops, diffrate, diffrate_stats
from tokensparse.policies.diffrate_published import MAE_FINETUNED, PUBLISHED

GOLDEN = load_file(Path(__file__).resolve().parent / "golden" / "diffrate_official.safetensors")
GOLDEN_MAE = load_file(Path(__file__).resolve().parent / "golden" / "diffrate_mae_official.safetensors")


def golden_model(golden: dict[str, torch.Tensor] = GOLDEN, **kwargs) -> torch.nn.Module:
    """The golden ViT with the weights of the file `golden` (DeiT's head; global_pool="avg" for MAE's)."""
    model = timm.create_model(
        "vit_small_patch16_224",
        img_size=112,
        patch_size=8,
        embed_dim=48,
        depth=12,
        num_heads=3,
        num_classes=10,
        **kwargs,
    )
    weights = {k[len("model.") :]: v.float() for k, v in golden.items() if k.startswith("model.")}
    model.load_state_dict(weights)
    return model.eval()


def images(golden: dict[str, torch.Tensor] = GOLDEN) -> torch.Tensor:
    return (golden["pixels"].float() / 255 - 0.5) / 0.25


def group_ids(owner: torch.Tensor) -> torch.Tensor:
    """(B, N + 1) owner positions -> the smallest input id in each input token's group (-1: pruned)."""
    ids = torch.arange(owner.shape[1]).expand_as(owner)
    smallest = torch.full_like(owner, owner.shape[1]).scatter_reduce(
        1, owner.clamp(min=0), ids, reduce="amin", include_self=True
    )
    return torch.where(owner >= 0, smallest.gather(1, owner.clamp(min=0)), owner)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_inference_matches_the_authors(k):
    prune, merge = GOLDEN[f"setting{k}.prune_kept"].tolist(), GOLDEN[f"setting{k}.merge_kept"].tolist()
    model = diffrate(golden_model(), prune, merge, trace=True)
    with torch.no_grad():
        logits = model(images())
    torch.testing.assert_close(logits, GOLDEN[f"eval_logits.setting{k}"], atol=1e-4, rtol=0)
    stats = diffrate_stats(model)
    after = GOLDEN[f"setting{k}.tokens_after"].tolist()
    assert tokensparse.sparsity_info(model).mlp_tokens[0].tolist() == after
    sizes, start = GOLDEN[f"eval_size.setting{k}"], 0
    for b, (owner, size) in enumerate(zip(stats.owner, stats.sizes, strict=True)):
        ids = group_ids(owner)
        assert ids.tolist() == GOLDEN[f"eval_owner.setting{k}"][b].long().tolist(), f"block {b}"
        # the sizes of block b, ordered by each token's group id
        group_of_position = torch.full((4, size.shape[1]), 10**6).scatter_reduce(
            1, owner.clamp(min=0), torch.arange(owner.shape[1]).expand_as(owner), "amin"
        )
        ordered = size.gather(1, group_of_position.argsort(dim=1))
        torch.testing.assert_close(ordered, sizes[:, start : start + after[b]], atol=1e-4, rtol=1e-5)
        start += after[b]
    untraced = diffrate(golden_model(), prune, merge)  # the fast path: a top-k of the kept tokens only
    with torch.no_grad():
        torch.testing.assert_close(untraced(images()), logits, atol=1e-5, rtol=0)
    assert float(authors_flops(model.diffrate, prune, merge)) == pytest.approx(
        float(GOLDEN[f"eval_flops.setting{k}"]), rel=1e-6
    )


def test_the_search_matches_the_authors_loss_and_gradients():
    target, lamb = float(GOLDEN["search.target_flops"]), float(GOLDEN["search.lamb"])
    for start in ("init", "perturbed"):
        model = diffrate(golden_model())
        model.requires_grad_(False)
        policy = model.diffrate
        for b in range(12):
            for kind, rates in (("prune", policy.prune_rates), ("merge", policy.merge_rates)):
                value = GOLDEN[f"search.{start}.param.blocks.{b}.{kind}_ddp.selected_probability"]
                rates[b].logits = torch.nn.Parameter(value.clone())
        model.train()
        logits = model(images())
        torch.testing.assert_close(logits, GOLDEN[f"search.{start}.logits"], atol=1e-4, rtol=0)
        stats = diffrate_stats(model)
        assert stats.prune_kept == GOLDEN[f"search.{start}.prune_kept_num"].tolist()
        assert stats.merge_kept == GOLDEN[f"search.{start}.merge_kept_num"].tolist()
        flops = stats.search_flops
        assert float(flops.detach()) == pytest.approx(float(GOLDEN[f"search.{start}.flops"]), rel=1e-6)
        task = torch.sum(-GOLDEN["search.targets"] * logits.log_softmax(-1), dim=-1).mean()
        flop_term = (flops / 1e9 - target) ** 2
        loss = lamb * flop_term + task
        assert float(loss.detach()) == pytest.approx(float(GOLDEN[f"search.{start}.loss"]), rel=1e-5)
        params = [r.logits for r in (*policy.prune_rates, *policy.merge_rates)]
        for term, value in (("grad_task", task), ("grad_flops", flop_term)):
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            names = [f"blocks.{b}.{kind}_ddp" for kind in ("prune", "merge") for b in range(12)]
            for name, grad in zip(names, grads, strict=True):
                expected = GOLDEN[f"search.{start}.{term}.{name}.selected_probability"]
                got = torch.zeros_like(expected) if grad is None else grad
                torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4, msg=f"{start} {term} {name}")


def test_published_counts_and_budgets():
    from conftest import tiny

    model = timm.create_model("deit_small_patch16_224").eval()
    published = tokensparse.diffrate(model, published=2.9)
    assert published.diffrate.counts()[0][:4] == [197, 196, 190, 168]  # compression_rate.json ViT-S-DeiT 2.9
    with pytest.raises(ValueError, match=r"published deit_small_patch16_224 at \[2.3, 2.5, 2.7, 2.9, 3.1\]"):
        tokensparse.diffrate(timm.create_model("deit_small_patch16_224"), published=2.0)
    small = tiny(depth=6).eval()
    dense = tokensparse.gflops(small)
    for share in (0.6, 0.8):
        reached = tokensparse.gflops(tokensparse.diffrate(tiny(depth=6).eval(), target_gflops=share * dense))
        assert 0.98 * share * dense <= reached <= share * dense
    with pytest.raises(ValueError, match="at or above the dense model's"):
        tokensparse.diffrate(tiny(depth=6), target_gflops=dense * 1.01)
    with pytest.raises(
        ValueError,
        match=r"below what diffrate \(the authors. DeiT-S 2.3 GFLOPs profile\) reaches on this model: it executes between",
    ):
        tokensparse.diffrate(tiny(depth=6), target_gflops=dense * 0.05)
    with pytest.raises(ValueError, match="prune_kept must list 6 whole numbers in 2..65"):
        tokensparse.diffrate(tiny(depth=6), [65] * 5, [65] * 5)


def test_a_search_trains_only_the_rates_and_its_run_infers_at_the_searched_counts(tmp_path):
    import json

    from conftest import TINY_KWARGS

    from tokensparse.data import fashion_mnist_dir
    from tokensparse.runs import load_run
    from tokensparse.train import TrainConfig, train

    if not any((fashion_mnist_dir() / f"t10k-labels-idx1-ubyte{s}").exists() for s in ("", ".gz")):
        pytest.skip("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist")
    base = dict(model="vit_tiny_patch16_224", model_kwargs=dict(TINY_KWARGS, depth=3), train_limit=64,
                val_limit=16, batch_size=32, device="cpu")  # fmt: skip
    train(TrainConfig(method="dense", epochs=1, warmup_epochs=0, output=str(tmp_path / "dense"), **base))
    dense = load_run(tmp_path / "dense")
    target = 0.7 * tokensparse.gflops(dense)
    out = tmp_path / "search"
    last = train(TrainConfig(method="diffrate", checkpoint=str(tmp_path / "dense" / "model.safetensors"),
                             target_gflops=target, epochs=2, output=str(out), **base))  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert (config["epochs"], config["lr"], config["mixup"], config["target_gflops"]) == (
        2,
        0.01,
        0.8,
        target,
    )
    assert config["method_settings"] == {"granularity": 4, "flop_weight": 5.0}
    searched = load_run(out)
    backbone = {k: v for k, v in searched.state_dict().items() if not k.startswith("diffrate.")}
    for key, value in dense.state_dict().items():  # the backbone stayed frozen
        torch.testing.assert_close(backbone[key], value, rtol=0, atol=0)
    rates = [v for k, v in searched.state_dict().items() if k.endswith("logits")]
    assert any(float(r.abs().max()) > 0 for r in rates)  # the search moved its logits from zero
    prune, merge = searched.diffrate.counts()
    assert prune[0] == merge[0] == 65 and min(merge) < 65
    assert last["val_gflops"] == pytest.approx(tokensparse.gflops(searched), rel=1e-6)
    with pytest.raises(ValueError, match="a diffrate run trained for its own budget"):  # not silently ignored
        load_run(out, target_gflops=0.5 * target)


# ---- MAE: the counts for MAE's fine-tuned ViT-B/L/H and their size-weighted average pool ----------

MAE_SHAPES = {
    "vit_base_patch16_224": (12, 197),
    "vit_large_patch16_224": (24, 197),
    "vit_huge_patch14_224": (32, 257),
}
# the FLOPs their README prints for one budget each (`main.py --eval --load_compression_rate`)
MAE_README_GFLOPS = {
    ("vit_base_patch16_224", 11.5): 11.517,
    ("vit_large_patch16_224", 42.3): 42.290,
    ("vit_huge_patch14_224", 103.4): 103.337,
}


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread, so a busy second core does not stall every op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def golden_mae_model() -> torch.nn.Module:
    return golden_model(GOLDEN_MAE, global_pool="avg")


def test_mae_inference_pools_by_token_size_as_the_authors(one_thread):
    mae_images = images(GOLDEN_MAE)
    with torch.no_grad():  # timm's avg-pool ViT (fc_norm, no final norm) is their models_mae classifier
        torch.testing.assert_close(
            golden_mae_model()(mae_images), GOLDEN_MAE["eval_logits.dense"], atol=1e-4, rtol=0
        )
    for budget in (8.7, 10.0, 10.4, 11.5):  # their ViT-B-MAE counts: 12 blocks, 197 tokens, this model's
        key = f"mae{budget}"
        prune, merge = PUBLISHED["vit_base_patch16_224"][budget]
        assert (list(prune), list(merge)) == (
            GOLDEN_MAE[f"{key}.prune_kept"].tolist(),
            GOLDEN_MAE[f"{key}.merge_kept"].tolist(),
        )
        model = diffrate(golden_mae_model(), prune, merge)
        with torch.no_grad():
            tokens = model.forward_features(mae_images)
            pooled = model.pool(tokens)
            logits = model.forward_head(tokens)
        assert (
            tokensparse.sparsity_info(model).mlp_tokens[0].tolist()
            == GOLDEN_MAE[f"{key}.tokens_after"].tolist()
        )
        size = diffrate_stats(model).size
        torch.testing.assert_close(
            size[:, 1:].sum(1), GOLDEN_MAE[f"{key}.final_size_sum"], atol=1e-3, rtol=1e-5
        )
        torch.testing.assert_close(pooled, GOLDEN_MAE[f"{key}.pooled"], atol=1e-4, rtol=0)
        torch.testing.assert_close(logits, GOLDEN_MAE[f"{key}.logits"], atol=1e-4, rtol=0)
        # their formula by hand: sum(size x) / sum(size) over the patch tokens, class token left out
        by_hand = (tokens[:, 1:] * size[:, 1:, None]).sum(1) / size[:, 1:].sum(1, keepdim=True)
        torch.testing.assert_close(pooled, by_hand, atol=1e-5, rtol=0)
        # the weighting matters here: the plain mean of the same tokens is far from theirs
        assert float((tokens[:, 1:].mean(1) - GOLDEN_MAE[f"{key}.pooled"]).abs().max()) > 0.05
        assert float(authors_flops(model.diffrate, prune, merge)) == pytest.approx(
            float(GOLDEN_MAE[f"{key}.flops"]), rel=1e-6
        )
    # a class-token head (DeiT) pools as before: its class token, no weights
    deit = diffrate(golden_model(), *PUBLISHED["deit_small_patch16_224"][2.9])
    with torch.no_grad():
        tokens = deit.forward_features(images())
        torch.testing.assert_close(deit.forward_head(tokens), deit.head(tokens[:, 0]), atol=0, rtol=0)


def test_mae_published_counts_fit_their_models_and_budgets(one_thread):
    torch.manual_seed(0)
    for name, (depth, tokens) in MAE_SHAPES.items():
        with torch.device("meta"):  # the real widths without weights: only shapes are read
            full = timm.create_model(name, num_classes=1000, global_pool="avg")
        assert (len(full.blocks), num_patches(full) + 1) == (depth, tokens)  # ViT-H/14 at 224: 16 x 16 + 1
        standin = timm.create_model(name, embed_dim=16, num_heads=2, num_classes=10, global_pool="avg").eval()
        image = torch.randn(1, 3, 224, 224)
        for budget, (prune, merge) in PUBLISHED[name].items():
            assert len(prune) == len(merge) == depth and prune[0] == merge[0] == tokens
            after, present = [], tokens
            for p, m in zip(prune, merge, strict=True):
                assert 2 <= p <= tokens and 2 <= m <= tokens
                # merge_kept > prune_kept (some ViT-L/H blocks) leaves nothing to merge, as in their code
                present = min(present, p, m)
                after.append(present)
            assert after[-1] == after[-2]  # their MAE patch keeps the last block whole
            reached = float(authors_flops(DiffRatePolicy(full, prune, merge), prune, merge)) / 1e9
            # every label within 0.2% by their formula but ViT-H 93.2 (92.11: 1.2% under its label)
            assert reached == pytest.approx(
                budget, rel=0.012 if (name, budget) == ("vit_huge_patch14_224", 93.2) else 0.002
            )
            if (name, budget) in MAE_README_GFLOPS:
                assert reached == pytest.approx(MAE_README_GFLOPS[name, budget], abs=1e-3)
            model = tokensparse.diffrate(copy.deepcopy(standin), published=budget)
            assert model.diffrate.counts() == (list(prune), list(merge))
            with torch.no_grad():
                model(image)
            assert tokensparse.sparsity_info(model).mlp_tokens[0].tolist() == after
        with pytest.raises(
            ValueError, match=rf"published {name} at \[{', '.join(map(str, PUBLISHED[name]))}\]"
        ):
            tokensparse.diffrate(copy.deepcopy(standin), published=1.0)
    # the counts are for MAE's avg-pool classifier: a class-token head is refused, naming what fits
    token_head = timm.create_model("vit_base_patch16_224", embed_dim=16, num_heads=2, num_classes=10)
    with pytest.raises(
        ValueError, match=r"global_pool='avg'\) with the weights of https://.*mae_finetuned_vit_base.pth"
    ):
        tokensparse.diffrate(token_head, published=11.5)
    assert set(MAE_FINETUNED) == set(MAE_SHAPES)
