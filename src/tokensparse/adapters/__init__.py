"""What a backbone family needs, so that methods never branch on the backbone.

A `Backbone` tells the engine how one family of models embeds an image, which blocks it runs, how a
block splits into the parts a method reads (norm, q/k/v, attention with a key bias, MLP) and what it
costs in multiply-adds. A method asks `backbone_of(model)` and works on every family that adapter covers:

- timm `VisionTransformer` (DeiT, ViT, DINOv2, CLIP, DeiT III, SigLIP's attention-pool head): its
  blocks run as they are;
- timm `Eva` (EVA02, EVA-CLIP, the `vit_*_rope_*` models): each kept token carries its rotary position;
- timm `Beit` (BEiT, BEiT v2, data2vec): the relative-position bias of the kept tokens' rows and columns;
- Hugging Face `transformers` ViT, DINOv2, CLIP and SigLIP vision models (`tokensparse.adapters.hf`).

A block view (`BlockView`) duck-types the parts of a timm pre-norm `Block` that the attention helpers of
`tokensparse.attention` read; its `attn` is an `AttentionView` whose `heads` and `finish` replace the timm
`Attention`'s projections and whose `position_bias` is added to every attention logit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn


class AttentionView(ABC):
    """An attention module as the engine's attention helpers read it (see `tokensparse.attention`).

    Attributes a view sets: `num_heads`, `head_dim`, `scale` (the logit scale), `attn_drop` (a dropout
    module, its `p` used in training) and `training`. Methods: `heads`, `finish`, `position_bias`.
    """

    num_heads: int
    head_dim: int
    scale: float
    attn_drop: nn.Module
    training: bool

    @abstractmethod
    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, heads, n, head_dim) of the normed tokens `x` (B, n, C), positions applied."""
        ...

    @abstractmethod
    def finish(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The output (B, n, C) from the merged heads `out` (B, n, heads * head_dim); `x` is the attention's
        input (B, n, C), for a gate that reads it."""
        ...

    def position_bias(self) -> torch.Tensor | None:
        """(B or 1, heads, n, n) added to the scaled logits for the tokens present, or None."""
        return None

    def packed_heads(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (T, heads, head_dim) of packed normed tokens `x` (T, C) of several images, whose places in
        their images' sequences are `positions` (T,) (prefix first): A-ViT's inference pack."""
        raise ValueError(f"{type(self).__name__} has no packed form (A-ViT's inference pack)")

    def pair_bias(self, positions: torch.Tensor) -> torch.Tensor | None:
        """(I, heads, L, L) logit bias between the tokens at `positions` (I, L) of I images, or None."""
        return None


class BlockView:
    """A pre-norm block as the engine's attention helpers read it: `norm1`, `attn` (an `AttentionView`),
    `ls1`, `drop_path1`, `norm2`, `mlp`, `ls2`, `drop_path2`, and calling it runs the whole block.

    block: the family's block module; attn: its `AttentionView`; parts: the callables by name."""

    def __init__(
        self, block: nn.Module, attn: AttentionView, **parts: Callable[[torch.Tensor], torch.Tensor]
    ):
        self.block = block
        self.attn = attn
        for name in ("norm1", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"):
            setattr(self, name, parts[name])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The whole block on `x` (B, n, C), composed from its parts (a family with a faster own forward
        overrides this)."""
        from ..attention import add_attention, attention_parts, mlp_tail

        return mlp_tail(self, add_attention(self, x, attention_parts(self.attn, self.norm1(x))[0]))


def identity(x: torch.Tensor) -> torch.Tensor:
    """`x` unchanged: the part of a block a family does not have (no layer scale, no drop path)."""
    return x


class Backbone(ABC):
    """One model family as the engine sees it; `backbone_of(model)` makes it.

    model: the user's model (its class stays its own). Subclasses set `family` (a short name: "timm-vit",
    "timm-eva", "timm-beit", "hf-vit", ...) and define the methods below.
    """

    family: str = "?"
    # a family whose blocks keep timm's `Block` and `Attention` (DynamicViT's masked training, A-ViT's
    # packed inference and DiffRate's search run on exactly those)
    timm_blocks: bool = False

    def __init__(self, model: nn.Module):
        self.model = model

    def check(self) -> None:  # noqa: B027  (optional: a family with nothing to refuse keeps it)
        """ValueError naming the part of the model the engine cannot run (nothing by default)."""

    # --- structure --------------------------------------------------------------------------------
    @property
    @abstractmethod
    def blocks(self) -> Sequence[nn.Module]:
        """The model's blocks, in order."""
        ...

    @property
    @abstractmethod
    def num_prefix(self) -> int:
        """Tokens before the patches (class, distillation, registers): never pruned or merged."""
        ...

    @property
    @abstractmethod
    def grid(self) -> tuple[int, int]:
        """The patch grid (rows, columns) at the model's configured image size."""
        ...

    @property
    @abstractmethod
    def has_class_token(self) -> bool:
        """Whether token 0 is a class token (EViT ranks by its attention)."""
        ...

    @property
    def width(self) -> int:
        """The tokens' channels (the embedding width)."""
        return int(self.model.embed_dim)

    def num_patches(self) -> int:
        """Patch tokens at the configured image size (196 for 224/16)."""
        rows, columns = self.grid
        return int(rows * columns)

    def check_images(self, images: torch.Tensor) -> None:
        """ValueError unless `images` is a (B, C, H, W) batch the model takes (its channels and image size),
        before torch fails deep inside."""
        from ..engine import check_images

        check_images(self.model, images)

    @abstractmethod
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The tokens block 0 reads from `images` (B, C, H, W), and the forward's positional context (what
        `views` needs, e.g. rotary embeddings; None when there is none)."""
        ...

    def views(self, state: Any, context: Any) -> Sequence[Any]:
        """Per forward: what the engine runs for each block, reading the token positions of `state` (the
        forward's `TokenState`) when it runs, and `context` from `embed`. timm's own blocks where nothing
        positional needs carrying."""
        return self.blocks

    @abstractmethod
    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The norm after the last block, on the tokens `x` (B, n, C)."""
        ...

    # --- multiply-adds ------------------------------------------------------------------------------
    def token_macs(self, index: int) -> float:
        """Multiply-adds per token of block `index`'s linears."""
        from ..macs import linear_macs

        return float(linear_macs(self.blocks[index]))

    @abstractmethod
    def pair_macs(self, index: int) -> float:
        """Multiply-adds per (query, key) pair of block `index`'s attention: logits and attention x values."""
        ...

    def mlp_macs(self, index: int) -> int:
        """Multiply-adds per token of block `index`'s MLP: what a token removed before the MLP saves."""
        from ..macs import linear_macs

        return linear_macs(self.blocks[index].mlp)

    @abstractmethod
    def head_dim(self, index: int) -> int:
        """Channels per attention head of block `index` (ToMe's similarity cost)."""
        ...

    @abstractmethod
    def fixed_macs(self, num_patches: int, final_tokens: torch.Tensor) -> torch.Tensor:
        """(B,) multiply-adds outside the blocks: the patch embedding on `num_patches` patches and the head
        (an attention-pool head on the `final_tokens` (B,) tokens the last block left)."""
        ...


_FAMILIES: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], Backbone]]] = []


def register_family(matches: Callable[[nn.Module], bool], make: Callable[[nn.Module], Backbone]) -> None:
    """Add a backbone family: `make(model)` builds its `Backbone` for a model `matches(model)` accepts."""
    _FAMILIES.append((matches, make))


SUPPORTED = (
    "timm VisionTransformer (DeiT, ViT, DINOv2, CLIP, SigLIP), timm Eva (EVA02, EVA-CLIP, vit_*_rope_*), "
    "timm Beit (BEiT, BEiT v2, data2vec), Hugging Face ViTModel, Dinov2Model, CLIPVisionModel, SiglipVisionModel "
    "(and their classification / projection wrappers)"
)


def backbone_of(model: nn.Module) -> Backbone:
    """The `Backbone` of `model`; ValueError naming the model's class and what is supported."""
    from . import (
        hf,  # noqa: F401  (registers the Hugging Face families; imports no transformers)
        timm_families,  # noqa: F401  (registers timm's families)
    )

    for matches, make in _FAMILIES:
        if matches(model):
            return make(model)
    raise ValueError(f"tokensparse does not run on a {type(model).__name__}; it supports {SUPPORTED}")
