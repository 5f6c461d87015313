"""A-ViT training gradients against the authors' training code (tests/golden/avit_grads.safetensors).

The reference gradients come from running NVlabs/A-ViT's own model and loss pieces on the golden
weights (tests/golden_tools/make_avit_grad_golden.py). Each loss term is compared separately,
unweighted; the distributional prior over all images (the authors' `h[1:]` drops image 0, a slip
tokensparse does not reproduce: `prior_released` in the file shows that it matters on this batch).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import backbone_state, golden, golden_vit
from safetensors.torch import load_file

import tokensparse
from tokensparse.attention import halting_block
from tokensparse.engine import get_policy
from tokensparse.losses import AViTLoss, avit_loss, avit_prior
from tokensparse.policies.avit import avit, avit_stats

GRADS = Path(__file__).resolve().parent / "golden" / "avit_grads.safetensors"
PARAMS = ("blocks.0.attn.qkv.weight", "blocks.5.mlp.fc1.weight", "patch_embed.proj.weight", "cls_token")
TERMS = {"ce": 0, "ponder": 1, "prior": 2}  # index in avit_loss's parts
CENTERS = (2, 5)


@pytest.fixture(scope="module")
def ref():
    return load_file(str(GRADS))


@pytest.fixture(scope="module")
def official():
    return golden("avit_official")


def train_model(official, gate_center: float, **kw) -> torch.nn.Module:
    model = avit(golden_vit(), gate_scale=10.0, gate_center=gate_center, **kw)
    model.load_state_dict(backbone_state(official))
    return model.train()


@pytest.fixture(scope="module")
def ours(official, ref):
    """(gate_center, straight_through_zeroing) -> {term: (value, {param: grad})}, one forward each.

    Terms: the unweighted parts of avit_loss (what AViTLoss sums) and AViTLoss's weighted total.
    """
    cache = {}

    def compute(gate_center: float, straight_through: bool = True):
        key = (gate_center, straight_through)
        if key not in cache:
            model = train_model(official, gate_center, straight_through_zeroing=straight_through)
            params = [model.get_parameter(name) for name in PARAMS]
            logits = model(official["input"])
            stats = avit_stats(model)
            _, parts = avit_loss(
                logits, ref["labels"], stats.ponder, stats.halting_score_layer, avit_prior(12)
            )
            total, _ = AViTLoss(ponder_weight=5e-4, prior_weight=1e-3)(logits, ref["labels"], model)
            losses = {term: parts[index] for term, index in TERMS.items()} | {"total": total}
            cache[key] = {
                term: (loss.item(), dict(zip(PARAMS, torch.autograd.grad(loss, params, retain_graph=True))))
                for term, loss in losses.items()
            }
        return cache[key]

    return compute


@pytest.mark.parametrize("gate_center", CENTERS)
@pytest.mark.parametrize("term", TERMS)
def test_each_loss_term_has_the_authors_gradient(ours, ref, gate_center, term):
    value, grads = ours(gate_center)[term]
    assert value == pytest.approx(ref[f"loss.{term}.gate_center{gate_center}"].item(), abs=1e-5)
    for name in PARAMS:
        expected = ref[f"grad.{term}.gate_center{gate_center}.{name}"]
        assert expected.abs().max() > 1e-3, name  # a gradient worth comparing
        torch.testing.assert_close(grads[name], expected, atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize("gate_center", CENTERS)
def test_avit_loss_total_gradient_is_the_authors_weighted_sum(ours, ref, gate_center):
    _, grads = ours(gate_center)["total"]
    torch.testing.assert_close(AViTLoss().prior(12), ref["prior_target"], atol=1e-6, rtol=0)
    for name in PARAMS:
        expected = sum(
            weight * ref[f"grad.{term}.gate_center{gate_center}.{name}"]
            for term, weight in (("ce", 1.0), ("ponder", 5e-4), ("prior", 1e-3))
        )
        torch.testing.assert_close(grads[name], expected, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("gate_center", CENTERS)
def test_prior_averages_all_images_unlike_the_released_slip(ours, ref, gate_center):
    """The reference over all images and the authors' h[1:] differ on this batch; we match the former."""
    _, grads = ours(gate_center)["prior"]
    for name in ("blocks.0.attn.qkv.weight", "cls_token"):
        released = ref[f"grad.prior_released.gate_center{gate_center}.{name}"]
        assert (grads[name] - released).abs().max() > 1e-4, name


@pytest.mark.parametrize("gate_center", CENTERS)
def test_plain_product_zeroing_changes_only_the_prior_gradient(ours, ref, gate_center):
    plain = ours(gate_center, straight_through=False)
    for term in TERMS:
        grads = plain[term][1]
        expected = {name: ref[f"grad.{term}.gate_center{gate_center}.{name}"] for name in PARAMS}
        if term == "prior":  # halted tokens' halting scores no longer reach the blocks they ran
            assert max((grads[n] - expected[n]).abs().max() for n in PARAMS) > 1e-3
        else:
            for name in PARAMS:
                torch.testing.assert_close(grads[name], expected[name], atol=1e-4, rtol=0, msg=name)


def test_halting_block_zeroing_forms_have_equal_values_and_their_own_gradients():
    torch.manual_seed(0)
    block = golden_vit(depth=1).blocks[0]
    x = torch.randn(2, 5, 48)
    running = torch.tensor([[1.0, 1, 0, 1, 0], [1, 0, 1, 1, 1]])
    outputs = {}
    for straight_through in (True, False):
        xi = x.clone().requires_grad_()
        y = halting_block(block, xi, running, straight_through_zeroing=straight_through)
        # only what the halted rows' outputs see: the residual of the (zeroed) input
        (y * (1 - running).unsqueeze(-1)).sum().backward()
        outputs[straight_through] = (y.detach(), xi.grad)
    assert torch.equal(outputs[True][0], outputs[False][0])
    halted = running == 0
    assert torch.equal(outputs[True][1][halted], torch.ones(int(halted.sum()), 48))  # identity gradient
    assert torch.equal(outputs[False][1][halted], torch.zeros(int(halted.sum()), 48))


def test_default_is_the_authors_form_and_shown_in_repr():
    policy = get_policy(tokensparse.avit(golden_vit()))
    assert policy.straight_through_zeroing is True
    assert "straight_through_zeroing=True" in repr(policy)
    assert (
        get_policy(tokensparse.avit(golden_vit(), straight_through_zeroing=False)).straight_through_zeroing
        is False
    )
