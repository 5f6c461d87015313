"""DiffRate against the authors' code (tests/golden/diffrate_official.safetensors, made by
tests/golden_tools/make_diffrate_golden.py from OpenGVLab/DiffRate): the inference forward at their
published counts (logits, which input tokens each token holds, sizes) and the search (loss, FLOPs,
counts and the gradients of every rate logit)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import tokensparse
from tokensparse.policies.diffrate import authors_flops, diffrate, diffrate_stats

GOLDEN = load_file(Path(__file__).resolve().parent / "golden" / "diffrate_official.safetensors")


def golden_model() -> torch.nn.Module:
    model = timm.create_model(
        "vit_small_patch16_224",
        img_size=112,
        patch_size=8,
        embed_dim=48,
        depth=12,
        num_heads=3,
        num_classes=10,
    )
    weights = {k[len("model.") :]: v.float() for k, v in GOLDEN.items() if k.startswith("model.")}
    model.load_state_dict(weights)
    return model.eval()


def images() -> torch.Tensor:
    return (GOLDEN["pixels"].float() / 255 - 0.5) / 0.25


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
