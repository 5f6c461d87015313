"""Hugging Face `transformers` models through the one-line functions: exact at identity (eager and SDPA),
executed FLOPs equal torch's count at reduction, the model's own output objects, and refusals by name.

`SUPPORT` feeds README's "Which models work" table (`scripts/model_table.py`)."""

from __future__ import annotations

import copy

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from test_backbones import NEEDS_TIMM_BLOCKS, NEEDS_TIMM_POOLING, NO_CLASS_TOKEN, SDPA_MAPPING  # noqa: E402
from test_hf_adapter import MODELS as ADAPTER_MODELS  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import tokensparse  # noqa: E402
from tokensparse.flops import flops_from_info, model_flops  # noqa: E402

# family: (what the README calls it, the adapter test's model builder)
FAMILIES = {
    "hf-vit": ("Hugging Face `ViTModel` / `ViTForImageClassification`", "ViTForImageClassification"),
    "hf-dinov2": ("Hugging Face `Dinov2Model` (and with registers)", "Dinov2Model"),
    "hf-clip": ("Hugging Face `CLIPVisionModel` (and with projection)", "CLIPVisionModelWithProjection"),
    "hf-siglip": ("Hugging Face `SiglipVisionModel` (attention-pool head)", "SiglipVisionModel"),
}
METHODS = ("tome", "evit", "random_prune", "static_prune", "dynamicvit", "avit", "diffrate")
SUPPORT: dict[tuple[str, str], str | None] = {(f, m): None for f in FAMILIES for m in METHODS}
SUPPORT.update({(f, "diffrate"): NEEDS_TIMM_BLOCKS for f in FAMILIES})
SUPPORT.update({(f, "avit"): NEEDS_TIMM_POOLING for f in FAMILIES})
SUPPORT[("hf-siglip", "evit")] = NO_CLASS_TOKEN
EXTRA = ["Dinov2WithRegistersModel", "SiglipForImageClassification", "CLIPVisionModel", "ViTModel"]


def build(name: str, impl: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    model = ADAPTER_MODELS[name][0](impl)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.normal_(0, 0.05)
    return model.eval()


def sparsify(method: str, model: torch.nn.Module, reduce: bool) -> torch.nn.Module:
    if method == "tome":
        return tokensparse.tome(model, r=3 if reduce else 0)
    if method in ("diffrate", "avit"):
        return getattr(tokensparse, method)(model)
    return getattr(tokensparse, method)(model, keep_ratio=0.6 if reduce else 1.0, locations=(0, 1))


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def main_outputs(output) -> list[torch.Tensor]:
    names = ("logits", "image_embeds", "pooler_output", "last_hidden_state")
    return [getattr(output, n) for n in names if getattr(output, n, None) is not None]


RUNS = [case for case, refusal in SUPPORT.items() if refusal is None]
NAMES = [(FAMILIES[f][1], m) for f, m in RUNS] + [(name, "tome") for name in EXTRA]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name, method", NAMES, ids=[f"{n}-{m}" for n, m in NAMES])
def test_identity_is_the_dense_model(name: str, method: str, impl: str) -> None:
    dense = build(name, impl)
    sparse = sparsify(method, copy.deepcopy(dense), reduce=False)
    x = images()
    with torch.no_grad():
        expected, got = dense(pixel_values=x), sparse(x)
    assert type(got) is type(expected)
    for a, b in zip(main_outputs(got), main_outputs(expected), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _count(model: torch.nn.Module, image: torch.Tensor) -> float:
    with FlopCounterMode(display=False, custom_mapping=SDPA_MAPPING) as counter, torch.no_grad():
        model(image)
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("family, method", RUNS, ids=[f"{f}-{m}" for f, m in RUNS])
def test_executed_flops_are_torchs_count_at_reduction(family: str, method: str) -> None:
    dense = build(FAMILIES[family][1])
    sparse = sparsify(method, copy.deepcopy(dense), reduce=True)
    image = images(1)
    counted = _count(sparse, image)
    assert flops_from_info(sparse).item() == pytest.approx(counted, rel=1e-9)
    assert model_flops(dense, image).item() == pytest.approx(_count(dense, image), rel=1e-9)
    assert flops_from_info(sparse).item() < 0.9 * model_flops(dense, image).item()
    assert tokensparse.gflops(sparse) == pytest.approx(counted / 1e9, rel=1e-9)


REFUSED = [case for case, refusal in SUPPORT.items() if refusal is not None]


@pytest.mark.parametrize("family, method", REFUSED, ids=[f"{f}-{m}" for f, m in REFUSED])
def test_unsupported_pairs_are_refused_by_name(family: str, method: str) -> None:
    with pytest.raises(ValueError, match=SUPPORT[family, method]):
        sparsify(method, build(FAMILIES[family][1]), reduce=True)


def test_budget_and_bad_input() -> None:
    dense = build("Dinov2Model")
    target = 0.7 * tokensparse.gflops(dense)
    sparse = tokensparse.tome(copy.deepcopy(dense), target_gflops=target)
    assert 0.98 * target <= tokensparse.gflops(sparse) <= target
    with pytest.raises(ValueError, match="image size 64x64 does not match the model's 32x32"):
        sparse(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="output_attentions are not supported"):
        sparse(images(1), output_attentions=True)
    with pytest.raises(ValueError, match="is not a supported Hugging Face vision model|does not run on"):
        tokensparse.tome(
            transformers.BertModel(
                transformers.BertConfig(
                    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
                )
            )
        )


def test_merged_tokens_weigh_by_size_in_siglips_pool_head() -> None:
    model = tokensparse.tome(build("SiglipVisionModel"), r=3)
    with torch.no_grad():
        out = model(images())
        size = tokensparse.tome_stats(model).token_size
        head = model.vision_model.head if hasattr(model, "vision_model") else model.head
        unweighted = head(out.last_hidden_state)
    assert size.max() > 1
    assert not torch.allclose(out.pooler_output, unweighted, atol=1e-4)


@pytest.mark.parametrize("name", ["Dinov2Model", "SiglipVisionModel"])
def test_dense_features_are_the_last_hidden_state_on_the_full_grid(name: str) -> None:
    dense = build(name)
    x = images()
    prefix = ADAPTER_MODELS[name][2]
    with torch.no_grad():
        expected = dense(pixel_values=x).last_hidden_state[:, prefix:]
        at_identity = tokensparse.dense_features(tokensparse.tome(copy.deepcopy(dense), r=0), x)
        merged = tokensparse.tome(copy.deepcopy(dense), r=3)
        full = tokensparse.dense_features(merged, x)
        reduced = merged(x).last_hidden_state[:, prefix:]
    torch.testing.assert_close(at_identity, expected, atol=1e-5, rtol=0)
    assert full.shape == expected.shape
    group = tokensparse.tome_stats(merged).token_group[:, prefix:] - prefix
    torch.testing.assert_close(full, reduced.gather(1, group.unsqueeze(-1).expand(-1, -1, full.shape[-1])))
