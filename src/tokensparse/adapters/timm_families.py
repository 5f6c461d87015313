"""timm's ViT families: `VisionTransformer` (blocks run as they are), `Eva` (rotary positions travel with
each kept token) and `Beit` (the relative-position bias of the kept tokens)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from ..macs import linear_macs
from . import AttentionView, Backbone, BlockView, identity, register_family

try:  # timm >= 1.0.16 has both; an older timm simply lacks these families
    from timm.layers import AttentionRope
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat
    from timm.models.beit import Attention as BeitAttention
    from timm.models.beit import Beit
    from timm.models.beit import Block as BeitBlock
    from timm.models.eva import Eva, EvaAttention, EvaBlock
except ImportError:  # pragma: no cover
    Eva = EvaBlock = EvaAttention = AttentionRope = Beit = BeitBlock = BeitAttention = None  # type: ignore[assignment,misc]


def _attention_pool_macs(model: nn.Module, final_tokens: torch.Tensor) -> torch.Tensor:
    """(B,) multiply-adds of `model`'s timm `AttentionPoolLatent` head (none: zeros) over the `final_tokens`
    (B,) tokens the blocks output (the prefix left out unless the model pools it): its latent queries, keys
    and values of every token, the latent x token attention, projection and MLP."""
    pool = getattr(model, "attn_pool", None)
    tokens = final_tokens.detach().to("cpu", torch.float64)
    if pool is None:
        return torch.zeros_like(tokens)
    if not getattr(model, "pool_include_prefix", False):
        tokens = tokens - model.num_prefix_tokens
    latents = float(pool.latent_len)
    width = float(pool.num_heads * pool.head_dim)
    per_latent = linear_macs(pool.q) + linear_macs(pool.proj) + linear_macs(getattr(pool, "mlp", None))
    return tokens * linear_macs(pool.kv) + 2.0 * latents * tokens * width + latents * per_latent


def _head_macs(model: nn.Module) -> float:
    return float(linear_macs(getattr(model, "head", None)) + linear_macs(getattr(model, "head_dist", None)))


class _TimmFamily(Backbone):
    """What timm's ViT families share: `blocks`, `patch_embed`, `num_prefix_tokens`, a final `norm`, a
    convolution patch embedding and a linear head (an attention-pool head where the model has one).
    model: the timm model."""

    @property
    def blocks(self):
        return self.model.blocks

    @property
    def num_prefix(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def grid(self) -> tuple[int, int]:
        rows, columns = self.model.patch_embed.grid_size
        return int(rows), int(columns)

    @property
    def has_class_token(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)

    def pair_macs(self, index: int) -> float:
        return 2.0 * self.head_dim(index) * self.blocks[index].attn.num_heads

    def head_dim(self, index: int) -> int:
        return int(self.blocks[index].attn.head_dim)

    def fixed_macs(self, num_patches: int, final_tokens: torch.Tensor) -> torch.Tensor:
        patch_embed = num_patches * self.model.patch_embed.proj.weight.numel()  # C_in * kh * kw * dim a patch
        return _attention_pool_macs(self.model, final_tokens) + float(patch_embed) + _head_macs(self.model)


def _view(block: nn.Module, attn: AttentionView, cls: type = BlockView) -> BlockView:
    """A view of a block with `gamma_1` / `gamma_2` layer scales (Eva, BEiT) whose attention is `attn`."""
    return cls(
        block,
        attn,
        norm1=block.norm1,
        ls1=_scale_by(block.gamma_1),
        drop_path1=block.drop_path1,
        norm2=block.norm2,
        mlp=block.mlp,
        ls2=_scale_by(block.gamma_2),
        drop_path2=block.drop_path2,
    )


class TimmViT(_TimmFamily):
    """timm's `VisionTransformer` with pre-norm `Block`s of timm's `Attention`: the blocks run as they are.
    An attention-pool head (SigLIP's `global_pool='map'`) pools the tokens left after the last block.
    model: the `VisionTransformer`."""

    family = "timm-vit"
    timm_blocks = True

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, Any]:
        model = self.model
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images)))), None

    def check(self) -> None:
        """ValueError naming a block or attention that is not timm's own pre-norm `Block` / `Attention`."""
        from ..engine import check_timm_parts

        for i, block in enumerate(self.model.blocks):
            if type(block) is not Block:
                raise ValueError(
                    f"block {i} is a {type(block).__name__}; tokensparse supports timm's pre-norm Block only"
                )
            if type(block.attn) is not Attention:
                raise ValueError(
                    f"block {i} uses attention class {type(block.attn).__name__}; tokensparse runs timm's "
                    "Attention only"
                )
            check_timm_parts(block)


# --- Eva: rotary positions --------------------------------------------------------------------------


def _rows(state: Any) -> torch.Tensor:
    """(B, M) original patch index of each patch token present; N (a token that is no patch) stays N."""
    return state.patch_index


class EvaAttentionView(AttentionView):
    """timm's `EvaAttention` / `AttentionRope` with the rotary embedding of the patches the tokens are.

    attn: the module; rope: (N, D) rotary table of the forward, or None; state: the forward's token state
    (its `patch_index` says which patch each token is: a token that is no patch, EViT's fused one, is not
    rotated, as the prefix tokens)."""

    def __init__(self, attn: nn.Module, rope: torch.Tensor | None, state: Any):
        self.module = attn
        self.num_heads = int(attn.num_heads)
        self.head_dim = int(attn.head_dim)
        self.scale = float(attn.scale)
        self.attn_drop = attn.attn_drop
        self.training = attn.training
        self.rope = rope
        self.state = state

    def _rope_rows(self, index: torch.Tensor) -> torch.Tensor:
        table = self.rope
        half = table.shape[-1] // 2
        unrotated = torch.cat([table.new_zeros(1, half), table.new_ones(1, half)], dim=1)  # sin 0, cos 1
        return torch.cat([table, unrotated]).index_select(0, index.reshape(-1)).view(*index.shape, -1)

    def rope_for_tokens(self) -> torch.Tensor | None:
        """(B, 1, M, D) rotary rows of the patch tokens present, or None for a model without rope."""
        if self.rope is None:
            return None
        return self._rope_rows(_rows(self.state)).unsqueeze(1)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self._project(x)
        rope = self.rope_for_tokens()
        if rope is not None:
            prefix, half = self.module.num_prefix_tokens, getattr(self.module, "rotate_half", False)
            q_rot = apply_rot_embed_cat(q[:, :, prefix:], rope, half=half)
            k_rot = apply_rot_embed_cat(k[:, :, prefix:], rope, half=half)
            q = torch.cat([q[:, :, :prefix], q_rot], 2).type_as(v)
            k = torch.cat([k[:, :, :prefix], k_rot], 2).type_as(v)
        return self._expand(q, k, v)

    def packed_heads(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self._project(x.unsqueeze(0))  # (1, heads, T, head_dim)
        if self.rope is not None:
            prefix, half = self.module.num_prefix_tokens, getattr(self.module, "rotate_half", False)
            # a prefix token takes the unrotated row (index N of `_rope_rows`)
            patch = torch.where(positions >= prefix, positions - prefix, self.rope.shape[0])
            rope = self._rope_rows(patch).unsqueeze(0).unsqueeze(0)
            q = apply_rot_embed_cat(q, rope, half=half).type_as(v)
            k = apply_rot_embed_cat(k, rope, half=half).type_as(v)
        q, k, v = self._expand(q, k, v)
        return q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)

    def _expand(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        groups = getattr(self.module, "num_kv_groups", 1)
        if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return q, k, v

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, heads, n, head_dim) of `x` (B, n, C) after q_norm / k_norm, before rotation."""
        attn = self.module
        batch, n, _ = x.shape
        if attn.qkv is not None:
            if getattr(attn, "q_bias", None) is None:
                qkv = attn.qkv(x)
            else:
                bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
                qkv = attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)
            q, k, v = qkv.reshape(batch, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = attn.q_proj(x).reshape(batch, n, self.num_heads, -1).transpose(1, 2)
            k = attn.k_proj(x).reshape(batch, n, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).reshape(batch, n, -1, self.head_dim).transpose(1, 2)
        return attn.q_norm(q), attn.k_norm(k), v

    def finish(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        attn = self.module
        out = attn.norm(out)
        if getattr(attn, "gate", None) is not None:
            out = out * attn.gate(x).sigmoid()
        return attn.proj_drop(attn.proj(out))


def _scale_by(gamma: torch.Tensor | None):
    return identity if gamma is None else (lambda x: gamma * x)


class EvaBlockView(BlockView):
    """timm's `EvaBlock` on the tokens present: its own forward, with the rotary rows of those tokens.

    block: the `EvaBlock`; attn: its `EvaAttentionView`; parts: its norms, layer scales, drop paths, MLP."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, rope=self.attn.rope_for_tokens())


class TimmEva(_TimmFamily):
    """timm's `Eva` (EVA02, EVA-CLIP, the `vit_*_rope_*` models): a kept or merged token keeps the rotary
    position of the patch it is (ToMe: the token merged into); EViT's fused token, like the prefix tokens,
    is not rotated. model: the `Eva`."""

    family = "timm-eva"

    def check(self) -> None:
        """ValueError naming the part of this Eva the engine cannot carry positions through."""
        model = self.model
        if getattr(model, "rope_mixed", False):
            raise ValueError("Eva with rope_type='mixed' (a rotary table per block) is not supported")
        if model.rope is not None and not hasattr(model.rope, "feat_shape"):
            raise ValueError(
                f"Eva's rotary embedding {type(model.rope).__name__} is not supported (no feat_shape)"
            )
        for i, block in enumerate(model.blocks):
            if type(block) is not EvaBlock:
                raise ValueError(
                    f"block {i} is a {type(block).__name__}; tokensparse supports Eva's pre-norm EvaBlock only"
                )
            if type(block.attn) not in (EvaAttention, AttentionRope):
                raise ValueError(
                    f"block {i} uses attention class {type(block.attn).__name__}; tokensparse runs Eva's "
                    "EvaAttention and AttentionRope only"
                )
            if getattr(block.attn, "num_prefix_tokens", model.num_prefix_tokens) != model.num_prefix_tokens:
                raise ValueError(f"block {i}'s attention rotates from another token than the model's prefix")

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, Any]:
        model = self.model
        if model.patch_drop is not None and model.training:
            raise ValueError(
                "Eva's patch dropout (patch_drop_rate > 0) cannot run with token reduction in training"
            )
        x, rope = model._pos_embed(model.patch_embed(images))
        return model.norm_pre(x), rope

    def views(self, state: Any, context: Any):
        return [_view(b, EvaAttentionView(b.attn, context, state), EvaBlockView) for b in self.model.blocks]


# --- BEiT: relative-position bias -------------------------------------------------------------------


class BeitAttentionView(AttentionView):
    """timm's BEiT `Attention` on the tokens present: the relative-position bias (the block's own table,
    plus the model's shared one) of their rows and columns. A token that is no patch (EViT's fused one)
    gets no position bias.

    attn: the block's attention module; shared: the model's shared `RelativePositionBias` or None; state:
    the forward's token state (its `patch_index` says which patch each token is)."""

    def __init__(self, attn: nn.Module, shared: nn.Module | None, state: Any):
        self.module = attn
        self.num_heads = int(attn.num_heads)
        self.head_dim = int(attn.qkv.weight.shape[0] // 3 // attn.num_heads)
        self.scale = float(attn.scale)
        self.attn_drop = attn.attn_drop
        self.training = attn.training
        self.shared = shared
        self.state = state

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = self.module
        batch, n, _ = x.shape
        if attn.q_bias is None:
            qkv = attn.qkv(x)
        else:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            qkv = attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)
        q, k, v = qkv.reshape(batch, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def finish(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.module.proj_drop(self.module.proj(out))

    def packed_heads(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.heads(x.unsqueeze(0))
        return q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)

    def _tables(self) -> list[nn.Module]:
        modules = (self.module, self.shared)
        return [m for m in modules if m is not None and m.relative_position_bias_table is not None]

    def _bias(self, rows: torch.Tensor) -> torch.Tensor | None:
        """(B, heads, n, n) bias between BEiT index rows `rows` (B, n) (class token 0, patch p at 1 + p)."""
        bias = None
        for module in self._tables():
            pair = module.relative_position_index[rows.unsqueeze(2), rows.unsqueeze(1)]  # (B, n, n)
            part = module.relative_position_bias_table[pair].permute(0, 3, 1, 2)
            bias = part if bias is None else bias + part
        return bias

    def pair_bias(self, positions: torch.Tensor) -> torch.Tensor | None:
        return self._bias(positions)  # a token's place in BEiT's sequence is its row of the index

    def position_bias(self) -> torch.Tensor | None:
        if not self._tables():
            return None
        state = self.state
        patches = state.num_patches
        # row of each token in BEiT's index (class token 0, patch p at 1 + p); a token that is no patch: -1
        rows = torch.where(state.patch_index < patches, state.patch_index + 1, -1)
        rows = torch.cat([rows.new_zeros(rows.shape[0], state.num_prefix), rows], dim=1)
        valid = rows >= 0
        bias = self._bias(rows.clamp(min=0))
        both = (valid.unsqueeze(2) & valid.unsqueeze(1)).unsqueeze(1)
        return bias * both.to(bias.dtype)


class TimmBeit(_TimmFamily):
    """timm's `Beit` (BEiT, BEiT v2, data2vec): each block's relative-position bias, gathered at the rows and
    columns of the tokens present (ToMe: the position of the token merged into). model: the `Beit`."""

    family = "timm-beit"

    @property
    def has_class_token(self) -> bool:
        return True

    def check(self) -> None:
        """ValueError if the model's image size differs from the window its relative positions index."""
        window = tuple(self.model.patch_embed.grid_size)
        for i, block in enumerate(self.model.blocks):
            if type(block) is not BeitBlock or type(block.attn) is not BeitAttention:
                raise ValueError(
                    f"block {i} is a {type(block).__name__} with {type(block.attn).__name__}; tokensparse runs "
                    "BEiT's own Block and Attention only"
                )
            size = getattr(block.attn, "window_size", None)
            if size is not None and tuple(size) != window:
                raise ValueError(
                    f"block {i}'s relative-position window {size} is not the patch grid {window}"
                )

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, Any]:
        model = self.model
        x = model.patch_embed(images)
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if model.pos_embed is not None:
            x = x + model.pos_embed
        return model.pos_drop(x), None

    def views(self, state: Any, context: Any):
        shared = self.model.rel_pos_bias
        return [_view(b, BeitAttentionView(b.attn, shared, state)) for b in self.model.blocks]

    def head_dim(self, index: int) -> int:
        return BeitAttentionView(self.blocks[index].attn, None, None).head_dim


def _is(cls: type | None):
    return lambda model: cls is not None and isinstance(model, cls)


register_family(_is(VisionTransformer), TimmViT)
register_family(_is(Eva), TimmEva)
register_family(_is(Beit), TimmBeit)
