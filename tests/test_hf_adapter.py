"""The Hugging Face adapter (`tokensparse.adapters.hf`) against the models' own forwards and torch's FLOP
counter, on tiny random models built from configs (nothing downloaded), eager and SDPA attention."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count  # noqa: E402

from tokensparse.adapters.hf import (  # noqa: E402
    SUPPORTED_CLASSES,
    HFBlockView,
    dense_macs,
    fixed_macs,
    hf_head,
    hf_parts,
    is_hf_model,
    mlp_macs,
    pair_macs,
    token_macs,
)

IMAGE, PATCH, HIDDEN, HEADS, LAYERS, LABELS = 32, 8, 32, 2, 2, 5
VISION = dict(
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    intermediate_size=64,
    image_size=IMAGE,
    patch_size=PATCH,
)
VIT = dict(VISION, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
DINO = dict(VIT, mlp_ratio=2, layerscale_value=0.5, drop_path_rate=0.1)  # DINOv2 sizes its MLP by mlp_ratio
TEXT = dict(
    hidden_size=HIDDEN,
    num_hidden_layers=1,
    num_attention_heads=HEADS,
    intermediate_size=64,
    vocab_size=64,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)


def _dual(config_cls, cls_name):
    def make(impl):
        config = config_cls(
            text_config=TEXT, vision_config=VISION, num_labels=LABELS, attn_implementation=impl
        )
        return getattr(transformers, cls_name)(config)

    return make


def _single(config_cls, cls_name, **kwargs):
    def make(impl):
        return getattr(transformers, cls_name)(config_cls(**kwargs, attn_implementation=impl))

    return make


T = transformers
MODELS = {
    # name: (builder, family, prefix tokens)
    "ViTModel": (_single(T.ViTConfig, "ViTModel", **VIT), "hf-vit", 1),
    "ViTForImageClassification": (
        _single(T.ViTConfig, "ViTForImageClassification", **VIT, num_labels=LABELS),
        "hf-vit",
        1,
    ),
    "Dinov2Model": (_single(T.Dinov2Config, "Dinov2Model", **DINO), "hf-dinov2", 1),
    "Dinov2ForImageClassification-swiglu": (
        _single(
            T.Dinov2Config, "Dinov2ForImageClassification", **DINO, use_swiglu_ffn=True, num_labels=LABELS
        ),
        "hf-dinov2",
        1,
    ),
    "CLIPVisionModel": (_single(T.CLIPVisionConfig, "CLIPVisionModel", **VISION), "hf-clip", 1),
    "CLIPVisionModelWithProjection": (
        _single(T.CLIPVisionConfig, "CLIPVisionModelWithProjection", **VISION, projection_dim=16),
        "hf-clip",
        1,
    ),
    "CLIPForImageClassification": (_dual(T.CLIPConfig, "CLIPForImageClassification"), "hf-clip", 1),
    "SiglipVisionModel": (_single(T.SiglipVisionConfig, "SiglipVisionModel", **VISION), "hf-siglip", 0),
    "SiglipVisionModel-nohead": (
        _single(T.SiglipVisionConfig, "SiglipVisionModel", **VISION, vision_use_head=False),
        "hf-siglip",
        0,
    ),
    "SiglipForImageClassification": (_dual(T.SiglipConfig, "SiglipForImageClassification"), "hf-siglip", 0),
}
if hasattr(T, "Dinov2WithRegistersModel"):
    MODELS["Dinov2WithRegistersModel"] = (
        _single(T.Dinov2WithRegistersConfig, "Dinov2WithRegistersModel", **DINO, num_register_tokens=2),
        "hf-dinov2",
        3,
    )
    MODELS["Dinov2WithRegistersForImageClassification"] = (
        _single(
            T.Dinov2WithRegistersConfig,
            "Dinov2WithRegistersForImageClassification",
            **DINO,
            num_register_tokens=2,
            num_labels=LABELS,
        ),
        "hf-dinov2",
        3,
    )

IMPLEMENTATIONS = ("eager", "sdpa")
_CACHE: dict[tuple[str, str], nn.Module] = {}


def build(name: str, impl: str) -> nn.Module:
    """A tiny random model in eval mode; every parameter redrawn so that biases, norms and layer scales
    are not their trivial initial values."""
    if (name, impl) not in _CACHE:
        torch.manual_seed(0)
        model = MODELS[name][0](impl)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.2).add_(1.0 if p.ndim == 1 and p.numel() == HIDDEN else 0.0)
        _CACHE[name, impl] = model.eval()
    return _CACHE[name, impl]


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def main_output(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=pixels)
    for name in ("logits", "image_embeds", "pooler_output"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    return out.last_hidden_state.mean(dim=1)  # a SiglipVisionModel without head: hf_head's mean token


def layer_io(model: nn.Module, pixels: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The hidden states each layer read and returned in the model's own forward."""
    inputs, outputs = [], []
    hooks = []
    for layer in hf_parts(model).layers:
        hooks.append(
            layer.register_forward_pre_hook(lambda m, args, kwargs: inputs.append(args[0]), with_kwargs=True)
        )
        hooks.append(
            layer.register_forward_hook(
                lambda m, args, out: outputs.append(out[0] if isinstance(out, tuple) else out)
            )
        )
    try:
        main_output(model, pixels)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs, outputs


def composed(view: HFBlockView, x: torch.Tensor) -> torch.Tensor:
    """The layer from its view's parts, attention spelled out (softmax(q k^T * scale) v)."""
    h = view.norm1(x)
    q, k, v = view.attn.heads(h)
    probs = view.attn.attn_drop(((q * view.attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
    merged = (probs @ v).transpose(1, 2).flatten(2)
    x1 = x + view.drop_path1(view.ls1(view.attn.finish(merged, h)))
    return x1 + view.drop_path2(view.ls2(view.mlp(view.norm2(x1))))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", list(MODELS))
def test_views_compose_to_the_models_own_forward(name: str, impl: str) -> None:
    model = build(name, impl)
    _, family, prefix = MODELS[name]
    parts = hf_parts(model)
    assert is_hf_model(model)
    assert (parts.family, parts.num_prefix, parts.grid) == (family, prefix, (IMAGE // PATCH, IMAGE // PATCH))
    assert len(parts.layers) == LAYERS and isinstance(parts.patch_conv, nn.Conv2d)
    assert any(layers is parts.layers for layers in parts.encoder.children())
    pixels = images()
    with torch.no_grad():
        inputs, outputs = layer_io(model, pixels)
        tokens = parts.embeddings(pixels)
        assert tokens.shape == (2, prefix + (IMAGE // PATCH) ** 2, HIDDEN)
        torch.testing.assert_close(tokens, inputs[0], rtol=0, atol=0)
        x = tokens
        for layer, x_in, y in zip(parts.layers, inputs, outputs, strict=True):
            view = HFBlockView(layer)
            assert view.attn.implementation == impl and view.attn.position_bias() is None
            assert (view.attn.num_heads, view.attn.head_dim) == (HEADS, HIDDEN // HEADS)
            assert view.attn.scale == pytest.approx((HIDDEN // HEADS) ** -0.5)
            torch.testing.assert_close(view(x_in), y, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(composed(view, x_in), y, rtol=1e-5, atol=1e-5)
            x = view(x)
        torch.testing.assert_close(hf_head(model, x), main_output(model, pixels), rtol=1e-5, atol=1e-5)


def test_dropouts_are_the_layers_own() -> None:
    vit = HFBlockView(hf_parts(build("ViTModel", "eager")).layers[0])
    assert vit.attn.attn_drop.p == pytest.approx(0.1)  # attention_probs_dropout_prob
    # hidden_dropout_prob after the output projection (the layer's `dropout`; transformers 5.0: its
    # attention.output.dropout)
    assert isinstance(vit.attn.proj_drop, nn.Dropout) and vit.attn.proj_drop.p == pytest.approx(0.1)
    assert any(vit.attn.proj_drop is m for m in vit.layer.modules())
    dino_layer = hf_parts(build("Dinov2Model", "eager")).layers[1]
    dino = HFBlockView(dino_layer)
    assert dino.drop_path1 is dino_layer.drop_path and dino.drop_path2 is dino_layer.drop_path
    assert dino.ls1 is dino_layer.layer_scale1 and dino.ls2 is dino_layer.layer_scale2
    dino_layer.train()
    try:
        assert dino.training and dino.attn.training and dino.attn.attn_drop.training
    finally:
        dino_layer.eval()
    assert not dino.attn.training


# FlopCounterMode has no formula for the CPU kernel of fused SDPA and counts it as 0; give it torch's own.
_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
SDPA_MAPPING = (
    {_CPU_SDPA: lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}
    if _CPU_SDPA is not None
    else {}
)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", list(MODELS))
def test_macs_match_torch_flop_counter(name: str, impl: str) -> None:
    # Exact: every linear / conv / attention matmul of the forward is in the count, nothing else is.
    # Not counted on either side: norms, softmax, activations, bias adds, the position-embedding lookup,
    # mean pooling. A SiglipForImageClassification runs its vision model's attention-pool head although
    # its classifier reads the mean token, so the head is counted (it runs).
    model = build(name, impl)
    parts = hf_parts(model)
    patches = parts.grid[0] * parts.grid[1]
    n = parts.num_prefix + patches
    ours = sum(n * token_macs(layer) + n * n * pair_macs(layer) for layer in parts.layers)
    ours += fixed_macs(model, patches, n)
    with FlopCounterMode(display=False, custom_mapping=SDPA_MAPPING) as counter, torch.no_grad():
        main_output(model, images(1))
    assert ours == counter.get_total_flops() / 2
    assert dense_macs(model) == ours
    per_image = fixed_macs(model, patches, torch.tensor([n, n - 3]))
    assert per_image.dtype == torch.float64 and per_image[0].item() == fixed_macs(model, patches, n)
    for layer in parts.layers:
        assert 0 < mlp_macs(layer) < token_macs(layer)


@pytest.mark.parametrize(
    "name", ["Dinov2ForImageClassification-swiglu", "SiglipVisionModel", "CLIPForImageClassification"]
)
def test_pool_weights_count_a_token_as_several(name: str) -> None:
    # A token of weight 2 pools as two copies of it would (ToMe's sizes): a weighted mean, or a log-weight
    # on the attention-pool head's logits.
    model = build(name, "eager")
    prefix = hf_parts(model).num_prefix
    x = torch.randn(2, prefix + 6, HIDDEN, generator=torch.Generator().manual_seed(2))
    doubled = torch.cat([x, x[:, -1:]], dim=1)
    weights = torch.ones(2, 6)
    weights[:, -1] = 2.0
    with torch.no_grad():
        torch.testing.assert_close(hf_head(model, x, weights), hf_head(model, doubled), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            hf_head(model, x, torch.ones(2, 6)), hf_head(model, x), rtol=1e-5, atol=1e-5
        )


def test_unsupported_models_are_refused_by_name() -> None:
    config = T.ViTConfig(**VISION, encoder_stride=PATCH)
    for model in (T.ViTForMaskedImageModeling(config), nn.Linear(2, 2)):
        assert not is_hf_model(model)
        with pytest.raises(ValueError, match=type(model).__name__) as error:
            hf_parts(model)
        assert all(name in str(error.value) for name in SUPPORTED_CLASSES)
    with pytest.raises(ValueError, match="Linear"):
        HFBlockView(nn.Linear(2, 2))
