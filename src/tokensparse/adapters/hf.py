"""Hugging Face `transformers` vision transformers, split into the parts a token-reduction method reads.

Supported (subclasses too): `ViTModel`, `ViTForImageClassification`, `Dinov2Model`,
`Dinov2ForImageClassification` (MLP or SwiGLU FFN, layer scale), `Dinov2WithRegistersModel`,
`Dinov2WithRegistersForImageClassification`, `CLIPVisionModel`, `CLIPVisionModelWithProjection`,
`CLIPForImageClassification`, `SiglipVisionModel` (with or without its attention-pool head) and
`SiglipForImageClassification`. Nothing here imports `transformers`: models are recognised by class name
and read through their attributes, so this module costs nothing where `transformers` is not installed.

- `hf_parts(model)`: where the model's embeddings, layers and patch convolution are, its prefix tokens
  and patch grid (`HFParts`);
- `HFBlockView(layer)`: one encoder layer as the engine's attention helpers read a timm pre-norm `Block`
  (`norm1`, `attn`, `ls1`, `drop_path1`, `norm2`, `mlp`, `ls2`, `drop_path2`); its `attn` is an
  `HFAttentionView` (`heads`, `finish`, `position_bias`, `scale`, ...);
- `hf_head(model, x)`: what runs after the last layer (final norm, pooling, pooler / projection /
  classifier), on however many tokens are left;
- `token_macs`, `pair_macs`, `mlp_macs`, `fixed_macs`: multiply-adds as `tokensparse.flops` counts them
  (every linear and convolution on the tokens it runs on, plus attention logits and attention x values;
  not norms, softmax, activations or bias adds). A dense forward with n tokens costs
  sum over layers of (n * token_macs + n^2 * pair_macs) + fixed_macs(model, num_patches, n).

Two module layouts are read. transformers 5.0 keeps the old BERT-style ViT / DINOv2 layers
(`attention.attention.query/key/value`, `attention.output.dense`, ViT's `intermediate` and `output`,
DINOv2's fused SwiGLU `weights_in`) and wraps CLIP / SigLIP in a `vision_model`; later 5.x releases
have `q_proj/k_proj/v_proj/o_proj`, an `mlp` (fc1/fc2, or SwiGLU gate/up/down projections), ViT's
layers directly on `ViTModel` (no encoder) and CLIP / SigLIP's embeddings on the model itself.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..macs import linear_macs
from . import Backbone, register_family

# class name -> family; a subclass of one of these classes is recognised through its MRO
SUPPORTED_CLASSES: dict[str, str] = {
    "ViTModel": "hf-vit",
    "ViTForImageClassification": "hf-vit",
    "Dinov2Model": "hf-dinov2",
    "Dinov2ForImageClassification": "hf-dinov2",
    "Dinov2WithRegistersModel": "hf-dinov2",
    "Dinov2WithRegistersForImageClassification": "hf-dinov2",
    "CLIPVisionModel": "hf-clip",
    "CLIPVisionModelWithProjection": "hf-clip",
    "CLIPForImageClassification": "hf-clip",
    "SiglipVisionModel": "hf-siglip",
    "SiglipForImageClassification": "hf-siglip",
}


def _class_name(model: nn.Module) -> str | None:
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED_CLASSES:
            return cls.__name__
    return None


def is_hf_model(model: nn.Module) -> bool:
    """Whether `model` is (a subclass of) one of the `transformers` classes in `SUPPORTED_CLASSES`."""
    return _class_name(model) is not None


class HFEmbeddings(nn.Module):
    """The model's own embedding of images into the tokens layer 0 reads: its patch, class and register
    tokens with position embeddings, then the norm CLIP applies before its first layer.

    embeddings: the model's embeddings module (`ViTEmbeddings`, `Dinov2Embeddings`, `CLIPVisionEmbeddings`,
    ...); pre_norm: a module applied to its output (CLIP's `pre_layrnorm`), or None; interpolates: whether
    the embeddings take an `interpolate_pos_encoding` argument (DINOv2's always interpolate and take none).
    """

    def __init__(self, embeddings: nn.Module, pre_norm: nn.Module | None = None, interpolates: bool = True):
        super().__init__()
        self.embeddings = embeddings
        self.pre_norm = pre_norm
        self.interpolates = interpolates

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Tokens (B, num_prefix + patches, C) of `pixel_values` (B, channels, H, W).

        interpolate_pos_encoding: resample the position embeddings to an image size other than the
        configured one (ViT, CLIP, SigLIP; DINOv2 always does)."""
        weight = _patch_conv(self.embeddings).weight
        pixel_values = pixel_values.to(weight.dtype)  # as ViTModel's forward does
        if self.interpolates:
            x = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        else:
            x = self.embeddings(pixel_values)
        return x if self.pre_norm is None else self.pre_norm(x)


@dataclass
class HFParts:
    """Where a `transformers` vision model's parts are (see `hf_parts`).

    base: the inner base model (`model.vit` of a `ViTForImageClassification`; the model itself for a
    `ViTModel`; the module holding CLIP / SigLIP's embeddings and encoder).
    embeddings: an `HFEmbeddings` whose call makes layer 0's input from pixel_values.
    layers: the nn.ModuleList of encoder layers.
    encoder: the module holding `layers` (`base` itself for ViT in transformers >= 5.x, which has no encoder).
    num_prefix: tokens before the patches: class token and registers (SigLIP: 0).
    grid: the patch grid (rows, columns) at the configured image size.
    patch_conv: the nn.Conv2d patch projection.
    family: "hf-vit", "hf-dinov2", "hf-clip" or "hf-siglip".
    model: the model `hf_parts` was given.
    """

    base: nn.Module
    embeddings: HFEmbeddings
    layers: nn.ModuleList
    encoder: nn.Module
    num_prefix: int
    grid: tuple[int, int]
    patch_conv: nn.Conv2d
    family: str
    model: nn.Module


def _unsupported(model: nn.Module) -> ValueError:
    return ValueError(
        f"{type(model).__name__} is not a supported Hugging Face vision model; supported: "
        + ", ".join(SUPPORTED_CLASSES)
    )


def _patch_conv(embeddings: nn.Module) -> nn.Conv2d:
    patch = getattr(embeddings, "patch_embeddings", None)  # ViT, DINOv2
    conv = patch.projection if patch is not None else getattr(embeddings, "patch_embedding", None)
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"{type(embeddings).__name__} has no Conv2d patch projection")
    return conv


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


def hf_parts(model: nn.Module) -> HFParts:
    """The parts of the `transformers` vision model `model` (one of `SUPPORTED_CLASSES` or a subclass).

    ValueError naming the class and the supported ones for any other model.
    """
    name = _class_name(model)
    if name is None:
        raise _unsupported(model)
    family = SUPPORTED_CLASSES[name]
    if family == "hf-vit":
        base = getattr(model, "vit", model)
    elif family == "hf-dinov2":
        base = next(
            (getattr(model, n) for n in ("dinov2", "dinov2_with_registers") if hasattr(model, n)), model
        )
    else:  # CLIP / SigLIP: the module with the embeddings, under one or two `vision_model`s
        base = model
        while not hasattr(base, "embeddings") and hasattr(base, "vision_model"):
            base = base.vision_model
    if not hasattr(base, "embeddings"):
        raise _unsupported(model)
    encoder = getattr(base, "encoder", base)
    layers = getattr(encoder, "layer", None)
    if layers is None:
        layers = encoder.layers
    config = base.config
    image, patch = _pair(config.image_size), _pair(config.patch_size)
    num_prefix = {"hf-siglip": 0}.get(family, 1) + int(getattr(config, "num_register_tokens", 0) or 0)
    interpolates = "interpolate_pos_encoding" in inspect.signature(base.embeddings.forward).parameters
    return HFParts(
        base=base,
        embeddings=HFEmbeddings(base.embeddings, getattr(base, "pre_layrnorm", None), interpolates),
        layers=layers,
        encoder=encoder,
        num_prefix=num_prefix,
        grid=(image[0] // patch[0], image[1] // patch[1]),
        patch_conv=_patch_conv(base.embeddings),
        family=family,
        model=model,
    )


# --- one layer -----------------------------------------------------------------------------------


class _AttentionDropout:
    """Dropout on attention probabilities with the probability `p` a `transformers` attention module keeps
    as a float; active while `module` trains."""

    def __init__(self, module: nn.Module, p: float):
        self.module = module
        self.p = float(p)

    @property
    def training(self) -> bool:
        return self.module.training

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, training=self.module.training)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _first(module: nn.Module, *names: str):
    for name in names:
        value = getattr(module, name, None)
        if value is not None:
            return value
    raise ValueError(f"{type(module).__name__} has none of {', '.join(names)}")


class HFAttentionView:
    """The self-attention of one `transformers` encoder layer as the engine's attention helpers read a timm
    `Attention`: q, k, v from the layer's own projections (`heads`), its output projection (`finish`).

    layer: the encoder layer (`ViTLayer`, `Dinov2Layer`, `CLIPEncoderLayer`, `SiglipEncoderLayer`, or the
    registers variant). Attributes: `num_heads`, `head_dim`, `scale` (the logit scale), `attn_drop` (has `p`;
    drops while the layer trains), `training`, `implementation` ("eager", "sdpa", ... as the layer's own
    forward runs it), `module` (the module holding the q/k/v projections).
    """

    def __init__(self, layer: nn.Module):
        if hasattr(layer, "self_attn"):  # CLIP, SigLIP
            outer = layer.self_attn
        else:  # ViT, DINOv2
            outer = layer.attention
        # transformers 5.0's ViT / DINOv2: attention.attention (query/key/value) + attention.output (dense)
        inner = getattr(outer, "attention", None)
        module = inner if isinstance(inner, nn.Module) else outer
        self.module = module
        self.q = _first(module, "q_proj", "query")
        self.k = _first(module, "k_proj", "key")
        self.v = _first(module, "v_proj", "value")
        self.num_heads = int(_first(module, "num_attention_heads", "num_heads"))
        self.head_dim = int(_first(module, "head_dim", "attention_head_size"))
        self.scale = float(_first(module, "scaling", "scale"))
        p = next(
            (
                getattr(module, n)
                for n in ("attention_dropout", "dropout_prob", "dropout")
                if hasattr(module, n)
            ),
            0.0,
        )
        self.attn_drop = _AttentionDropout(module, p)
        if module is outer:  # output projection beside q/k/v; ViT's dropout after it sits on the layer
            self.proj = _first(module, "o_proj", "out_proj")
            dropout = getattr(layer, "dropout", None)
            self.proj_drop = dropout if isinstance(dropout, nn.Module) else _identity
        else:
            self.proj = outer.output.dense
            self.proj_drop = outer.output.dropout

    @property
    def training(self) -> bool:
        """Whether the attention module is in training mode (attention dropout active)."""
        return self.module.training

    @property
    def implementation(self) -> str:
        """The attention implementation the layer's own forward uses (`config._attn_implementation`)."""
        config = getattr(self.module, "config", None)
        return getattr(config, "_attn_implementation", None) or "eager"

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, heads, n, head_dim) of the normed tokens `x` (B, n, C) from the layer's projections."""
        batch, n, _ = x.shape
        shape = (batch, n, self.num_heads, self.head_dim)
        return tuple(p(x).view(shape).transpose(1, 2) for p in (self.q, self.k, self.v))  # type: ignore[return-value]

    def finish(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The attention output (B, n, C): output projection and its dropout of the merged heads `out`
        (B, n, heads * head_dim). `x`, the attention's input, is not read (timm's gated attention reads it)."""
        return self.proj_drop(self.proj(out))

    def position_bias(self) -> torch.Tensor | None:
        """None: these models add no bias to the attention logits."""
        return None


class HFBlockView:
    """One `transformers` encoder layer as the engine's attention helpers read a timm pre-norm `Block`.

    layer: the encoder layer (an element of `hf_parts(model).layers`). With h = norm1(x),
    x1 = x + drop_path1(ls1(attn.finish(attention of attn.heads(h), h))) and
    y = x1 + drop_path2(ls2(mlp(norm2(x1)))) is the layer's own forward (in eval mode exactly; in training
    the dropouts are the layer's own modules, though drawn in another order).

    Attributes: `layer` (also `block`), `attn` (an `HFAttentionView`), `norm1`, `norm2`, `ls1`, `ls2`
    (DINOv2's layer scales, identity elsewhere), `drop_path1`, `drop_path2` (DINOv2's drop path, identity
    elsewhere), `mlp` (the MLP branch on normed tokens, its dropout included, without the residual).
    """

    def __init__(self, layer: nn.Module):
        self.layer = self.block = layer
        self.ls1 = self.ls2 = self.drop_path1 = self.drop_path2 = _identity
        if hasattr(layer, "layernorm_before"):  # ViT
            self.norm1, self.norm2 = layer.layernorm_before, layer.layernorm_after
            if hasattr(layer, "intermediate"):  # transformers 5.0: ViTOutput adds the residual itself
                self.mlp = self._vit_output_mlp
            else:
                self.mlp = self._vit_mlp
        elif hasattr(layer, "layer_scale1"):  # DINOv2 (with or without registers)
            self.norm1, self.norm2 = layer.norm1, layer.norm2
            self.ls1, self.ls2 = layer.layer_scale1, layer.layer_scale2
            self.drop_path1 = self.drop_path2 = layer.drop_path
            self.mlp = layer.mlp
        elif hasattr(layer, "layer_norm1") and hasattr(layer, "self_attn"):  # CLIP, SigLIP
            self.norm1, self.norm2 = layer.layer_norm1, layer.layer_norm2
            self.mlp = layer.mlp
        else:
            raise ValueError(f"{type(layer).__name__} is not a ViT, DINOv2, CLIP or SigLIP encoder layer")
        self.attn = HFAttentionView(layer)
        self._takes_mask = "attention_mask" in inspect.signature(layer.forward).parameters

    def _vit_mlp(self, h: torch.Tensor) -> torch.Tensor:
        return self.layer.dropout(self.layer.mlp(h))

    def _vit_output_mlp(self, h: torch.Tensor) -> torch.Tensor:
        output = self.layer.output
        return output.dropout(output.dense(self.layer.intermediate(h)))

    @property
    def training(self) -> bool:
        """Whether the layer is in training mode."""
        return self.layer.training

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's own forward on hidden states `x` (B, n, C), no attention mask: (B, n, C)."""
        out = self.layer(x, None) if self._takes_mask else self.layer(x)
        return out[0] if isinstance(out, (tuple, list)) else out


# --- after the last layer ----------------------------------------------------------------------------


def _weighted_mean(x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return x.mean(dim=1)
    w = weights.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(dim=1) / w.sum(dim=1)


def _map_head(head: nn.Module, x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """SigLIP's `SiglipMultiheadAttentionPoolingHead` on tokens `x`, log `weights` added to its logits."""
    if weights is None:
        return head(x)
    batch, n, _ = x.shape
    attention = head.attention
    bias = weights.to(x.dtype).log().view(batch, 1, 1, n).expand(batch, attention.num_heads, 1, n)
    probe = head.probe.repeat(batch, 1, 1)
    out = attention(
        probe, x, x, attn_mask=bias.reshape(batch * attention.num_heads, 1, n), need_weights=False
    )[0]
    out = out + head.mlp(head.layernorm(out))
    return out[:, 0]


def hf_head(model: nn.Module, x: torch.Tensor, pool_weights: torch.Tensor | None = None) -> torch.Tensor:
    """What `model` runs after its last layer, on the tokens `x` (B, n, C) the last layer left (prefix
    first): its final norm, pooling and head. Returns (B, D), the model's main output:

    - `*ForImageClassification`: the logits;
    - `CLIPVisionModelWithProjection`: `image_embeds`;
    - `ViTModel`, `Dinov2Model`, `CLIPVisionModel`, `SiglipVisionModel`: `pooler_output` (a `ViTModel`
      without pooler: its normed class token; a `SiglipVisionModel` without head: its mean normed token).

    pool_weights: optional (B, n - num_prefix) weight of each patch token (how many patches it stands
    for): a weighted mean where the model averages patch tokens (DINOv2's classifier, CLIP and SigLIP
    classification), log-weights added to the logits of SigLIP's attention-pool head; the class token
    pooling of ViT and CLIP ignores it. None: every token counts once.
    """
    parts = hf_parts(model)
    base, family, prefix = parts.base, parts.family, parts.num_prefix
    if family in ("hf-vit", "hf-dinov2"):
        x = base.layernorm(x)
        if family == "hf-vit":
            if hasattr(model, "classifier"):
                return model.classifier(x[:, 0])
            return base.pooler(x) if getattr(base, "pooler", None) is not None else x[:, 0]
        if hasattr(model, "classifier"):
            pooled = torch.cat([x[:, 0], _weighted_mean(x[:, prefix:], pool_weights)], dim=1)
            return model.classifier(pooled)
        return x[:, 0]
    if family == "hf-clip":
        if hasattr(model, "classifier"):  # CLIPForImageClassification: mean of the unnormed patch tokens
            return model.classifier(_weighted_mean(x[:, prefix:], pool_weights))
        pooled = base.post_layernorm(x[:, 0])
        return model.visual_projection(pooled) if hasattr(model, "visual_projection") else pooled
    # SigLIP
    x = base.post_layernorm(x)
    if hasattr(model, "classifier"):
        return model.classifier(_weighted_mean(x, pool_weights))
    if getattr(base, "head", None) is not None and getattr(base, "use_head", True):
        return _map_head(base.head, x, pool_weights)
    return _weighted_mean(x, pool_weights)


# --- multiply-adds -------------------------------------------------------------------------------------


def token_macs(layer: nn.Module) -> int:
    """Multiply-adds per token of every linear of the encoder `layer` (q, k, v, output, MLP)."""
    return linear_macs(layer)


def mlp_macs(layer: nn.Module) -> int:
    """Multiply-adds per token of the MLP branch of the encoder `layer`: what a token dropped between
    attention and MLP saves."""
    if hasattr(layer, "intermediate"):  # transformers 5.0 ViT
        return linear_macs(layer.intermediate) + linear_macs(layer.output)
    return linear_macs(layer.mlp)


def pair_macs(layer: nn.Module) -> float:
    """Multiply-adds per (query, key) pair of the encoder `layer`'s attention: logits and attention x
    values, heads * head_dim each."""
    attn = HFAttentionView(layer)
    return 2.0 * attn.num_heads * attn.head_dim


def _map_head_macs(head: nn.Module, final_tokens):
    """SigLIP's attention-pool head: the probe's query (1 token), keys and values of `final_tokens`
    tokens, the 1 x final_tokens logits and attention x values, the output projection and MLP on 1 token."""
    attention = head.attention
    dim = attention.embed_dim
    return (
        dim * dim
        + 2 * dim * dim * final_tokens
        + 2 * dim * final_tokens
        + linear_macs(attention.out_proj)
        + linear_macs(head.mlp)
    )


def fixed_macs(model: nn.Module, num_patches: int, final_tokens):
    """Multiply-adds of `model` outside its encoder layers: the patch convolution on `num_patches`
    patches and what runs after the encoder (ViT's pooler and classifier on the class token, DINOv2's
    classifier on class token and mean patch (2C), CLIP's projection or classifier, SigLIP's
    attention-pool head over `final_tokens` tokens and its classifier).

    final_tokens: tokens the last layer left (prefix included): an int, or a (B,) tensor for per-image
    counts. Returns an int, or a (B,) float64 tensor when `final_tokens` is a tensor.
    """
    parts = hf_parts(model)
    conv = parts.patch_conv
    kernel = conv.kernel_size[0] * conv.kernel_size[1]
    macs = num_patches * (conv.in_channels // conv.groups) * kernel * conv.out_channels
    if isinstance(final_tokens, torch.Tensor):
        final_tokens = final_tokens.detach().to("cpu", torch.float64)
    base = parts.base
    for name in ("classifier", "visual_projection"):
        macs += linear_macs(getattr(model, name, None))
    if parts.family == "hf-vit":
        macs += linear_macs(getattr(base, "pooler", None))
    if (
        parts.family == "hf-siglip"
        and getattr(base, "head", None) is not None
        and getattr(base, "use_head", True)
    ):
        macs = macs + _map_head_macs(base.head, final_tokens)
    if isinstance(final_tokens, torch.Tensor):
        return torch.zeros_like(final_tokens) + macs
    return macs


def dense_macs(model: nn.Module, tokens: int | None = None) -> int:
    """Multiply-adds of a dense forward of `model` at its configured image size: every layer on all
    `tokens` tokens (default: prefix + patches), as `torch.utils.flop_counter.FlopCounterMode` counts (its
    FLOPs / 2)."""
    parts = hf_parts(model)
    patches = parts.grid[0] * parts.grid[1]
    n = parts.num_prefix + patches if tokens is None else tokens
    blocks = sum(n * token_macs(layer) + n * n * pair_macs(layer) for layer in parts.layers)
    return int(blocks) + int(fixed_macs(model, patches, n))


__all__ = [
    "SUPPORTED_CLASSES",
    "HFBackbone",
    "hf_forward",
    "last_hidden_state",
    "HFAttentionView",
    "HFBlockView",
    "HFEmbeddings",
    "HFParts",
    "dense_macs",
    "fixed_macs",
    "hf_head",
    "hf_parts",
    "is_hf_model",
    "mlp_macs",
    "pair_macs",
    "token_macs",
]


# --- the family the engine runs ------------------------------------------------------------------------


class HFBackbone(Backbone):
    """A `transformers` vision model as the engine's `Backbone`: its own embeddings and layers (their
    eager or SDPA attention where a block runs whole), the parts a method reads from `HFBlockView`, and
    the final norm, pooling and head applied by the sparsified model's forward (`hf_forward`)."""

    family = "hf"
    timm_blocks = False

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.parts = hf_parts(model)
        self.family = self.parts.family

    @property
    def blocks(self):
        return self.parts.layers

    @property
    def num_prefix(self) -> int:
        return self.parts.num_prefix

    @property
    def grid(self) -> tuple[int, int]:
        return self.parts.grid

    @property
    def has_class_token(self) -> bool:
        return self.parts.family != "hf-siglip"

    @property
    def width(self) -> int:
        return int(self.parts.base.config.hidden_size)

    def check_images(self, images: torch.Tensor) -> None:
        config = self.parts.base.config
        expected = _pair(config.image_size)
        channels = self.parts.patch_conv.in_channels
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != channels:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected pixel_values as a (B, {channels}, H, W) tensor, got {shape}")
        if tuple(images.shape[-2:]) != expected:
            raise ValueError(
                f"image size {images.shape[-2]}x{images.shape[-1]} does not match the model's "
                f"{expected[0]}x{expected[1]} (config.image_size)"
            )

    def embed(self, images: torch.Tensor):
        return self.parts.embeddings(images), None

    def views(self, state, context):
        return [HFBlockView(layer) for layer in self.parts.layers]

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x  # the final norm is part of the head (`hf_forward`): CLIP normalises only its class token

    def token_macs(self, index: int) -> float:
        return float(token_macs(self.parts.layers[index]))

    def pair_macs(self, index: int) -> float:
        return pair_macs(self.parts.layers[index])

    def mlp_macs(self, index: int) -> int:
        return mlp_macs(self.parts.layers[index])

    def head_dim(self, index: int) -> int:
        return HFAttentionView(self.parts.layers[index]).head_dim

    def fixed_macs(self, num_patches: int, final_tokens: torch.Tensor) -> torch.Tensor:
        return fixed_macs(self.model, num_patches, final_tokens)


def last_hidden_state(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's `last_hidden_state` from the tokens `x` the last layer left: ViT and DINOv2 apply their
    final layernorm, SigLIP its post-layernorm; CLIP returns the encoder's output as it is."""
    parts = hf_parts(model)
    if parts.family in ("hf-vit", "hf-dinov2"):
        return parts.base.layernorm(x)
    if parts.family == "hf-siglip":
        return parts.base.post_layernorm(x)
    return x


def hf_forward(
    model: nn.Module, pixel_values: torch.Tensor, pool_weights: torch.Tensor | None, x: torch.Tensor
):
    """The output object the model's own forward returns, from the tokens `x` the engine's last layer left
    for `pixel_values`: `ImageClassifierOutput` (logits), `CLIPVisionModelOutput` (image_embeds,
    last_hidden_state) or `BaseModelOutputWithPooling` (last_hidden_state, pooler_output); `pool_weights`
    (B, patch tokens) weights merged tokens where the model pools patch tokens (see `hf_head`)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

    main = hf_head(model, x, pool_weights)
    if hasattr(model, "classifier"):
        return ImageClassifierOutput(logits=main)
    hidden = last_hidden_state(model, x)
    if hasattr(model, "visual_projection"):
        from transformers.models.clip.modeling_clip import CLIPVisionModelOutput

        return CLIPVisionModelOutput(image_embeds=main, last_hidden_state=hidden)
    return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=main)


register_family(is_hf_model, HFBackbone)
