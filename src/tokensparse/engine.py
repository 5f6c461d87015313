"""The engine: run a timm VisionTransformer block by block while a policy decides which tokens go on.

The engine owns the per-image bookkeeping (which original patch each surviving token is, keep masks,
how many tokens each block ran on) and the tensor work (gather, mask). A policy only scores tokens
and decides. The user's model stays the user's model: `sparsify` swaps its class for a subclass that
overrides `forward_features` (and `pool`, for masked average pooling), so every backbone state-dict
key, `forward_head`, distillation heads and `timm.create_model(..., checkpoint_path=...)` keep working.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import timm
import torch
import torch.nn as nn

try:
    from timm.layers import Attention  # noqa: F401  (what the engine runs on: checked here at import)
    from timm.models.vision_transformer import Block, VisionTransformer  # noqa: F401
except ImportError as err:  # the timm internals the engine runs on moved
    raise ImportError(
        f"tokensparse needs timm >= 1.0.16 (tested with 1.0.16 and newer); this timm {timm.__version__} lacks "
        f"what the engine imports ({str(err).split(' (')[0]})"
    ) from err

from .adapters import Backbone, backbone_of
from .attention import masked_block

Regime = Literal["mask", "gather"]
SUPPORTED_POOLS = ("token", "avg", "map")
_POLICY_ATTR = "_tokensparse_policy_name"
_INFO_ATTR = "_tokensparse_info"


@dataclass
class TokenState:
    """Per-forward bookkeeping shared by the engine and a policy.

    x:               (B, P + M, C) tokens: P prefix tokens (never pruned) then M patch tokens.
    num_prefix:      P, the model's prefix tokens (class, distillation, registers).
    num_patches:     N, the patches the patch embedding produced (196 for 224/16).
    regime:          'mask' (training: every token stays, attention is masked) or 'gather' (eval:
                     dropped tokens leave the sequence); see `run`.
    patch_index:     (B, M) index in 0..N-1 (row-major) of the original patch each patch token is;
                     N marks a token that is no patch (EViT's fused token, authors' counts).
    keep:            mask regime only: (B, N) keep mask of the patch tokens (1 = kept); None = all.
    keep_decisions:  per pruning stage, (B, N) keep mask over the original patches (training: the
                     hard Gumbel decisions, with gradient; eval: 0/1 from the kept indices).
    kept_index:      gather regime: per stage, (B, k) original patch indices kept, ascending.
    tokens_per_block: per block, the tokens the block computed on: an int (the same for every image)
                     or a (B,) tensor per image.
    active_tokens:   set by a policy whose next block computes on other tokens than `x` holds (A-ViT's
                     pack, EViT's fused token kept outside `x`): an int or (B,) tensor; None = x.shape[1].
    mlp_tokens:      per block, (B,) tokens that reached the block's MLP, recorded by a policy that
                     reduces tokens between attention and MLP (ToMe, EViT); empty = all of them.
    policy_state:    the policy's own bookkeeping during the forward (its dataclass; the engine does
                     not read it).
    dense:           with `dense_features`: (B, N + 1, C) the last features each patch had while it was a
                     token (column N: a token that is no patch); None otherwise.
    stats:           the policy's statistics of this forward (its dataclass, set by `end`), published
                     field by field as `SparseInfo.extra` and read through its typed accessor.
    """

    x: torch.Tensor
    num_prefix: int
    num_patches: int
    regime: Regime
    patch_index: torch.Tensor
    keep: torch.Tensor | None = None
    keep_decisions: list[torch.Tensor] = field(default_factory=list)
    kept_index: list[torch.Tensor] = field(default_factory=list)
    tokens_per_block: list[int | torch.Tensor] = field(default_factory=list)
    active_tokens: int | torch.Tensor | None = None
    mlp_tokens: list[torch.Tensor] = field(default_factory=list)
    policy_state: Any = None
    stats: Any = None
    dense: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    @property
    def patch_tokens(self) -> torch.Tensor:
        return self.x[:, self.num_prefix :]

    def gather_patches(self, index: torch.Tensor) -> None:
        """Keep, per image, the patch tokens at positions `index` (B, k) of the current sequence."""
        batch, channels = self.x.shape[0], self.x.shape[-1]
        prefix = torch.arange(self.num_prefix, device=index.device).expand(batch, -1)
        rows = torch.cat([prefix, index + self.num_prefix], dim=1)  # one gather, prefix tokens included
        self.x = self.x.gather(1, rows.unsqueeze(-1).expand(-1, -1, channels))
        self.patch_index = self.patch_index.gather(1, index)

    def keep_top(self, count: int, score: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Gather regime, one pruning stage: keep each image's `count` highest-scoring patch tokens.

        `score()` gives (B, M) scores of the current patch tokens; it is not called when `count` keeps
        them all. The kept tokens stay in patch order. Records the stage in `kept_index` and
        `keep_decisions`; returns the kept positions (B, k) in the sequence before the gather.
        """
        present = self.patch_tokens.shape[1]
        if count >= present:
            kept = torch.arange(present, device=self.x.device).expand(self.batch_size, -1)
        else:
            kept = score().topk(count, dim=1).indices.sort(dim=1).values
        self.gather_patches(kept)
        self.kept_index.append(self.patch_index)
        decision = torch.zeros(self.batch_size, self.num_patches, device=self.x.device)
        self.keep_decisions.append(decision.scatter_(1, self.patch_index, 1.0))
        return kept

    def record_dense(self) -> None:
        """With `dense_features`: note the current features of every patch token present at its patch."""
        if self.dense is not None and self.x.shape[1] - self.num_prefix == self.patch_index.shape[1]:
            rows = self.patch_index.unsqueeze(-1).expand(-1, -1, self.x.shape[-1])
            self.dense = self.dense.scatter(1, rows, self.patch_tokens.to(self.dense.dtype))

    def record_mlp_tokens(self, tokens: int) -> None:
        """Note how many tokens the current block's MLP runs on (fewer than its attention when it merged)."""
        self.mlp_tokens.append(torch.full((self.batch_size,), tokens, device=self.x.device))

    def previous_keep(self) -> torch.Tensor:
        """Mask regime: (B, N) keep mask before this stage (all ones before the first)."""
        return self.keep if self.keep is not None else self.x.new_ones(self.batch_size, self.num_patches)

    def set_keep(self, keep: torch.Tensor) -> None:
        """Mask regime, one pruning stage: `keep` (B, N) becomes the mask later blocks attend with."""
        self.keep = keep
        self.keep_decisions.append(keep)

    def mask_top(self, count: int, score: torch.Tensor) -> None:
        """Mask regime, one pruning stage: keep the `count` highest `score` (B, N) among tokens still kept."""
        previous = self.previous_keep()
        kept = score.masked_fill(previous == 0, float("-inf")).topk(count, dim=1).indices
        self.set_keep(torch.zeros_like(previous).scatter_(1, kept, 1.0))


@dataclass
class SparseInfo:
    """What the last forward of a sparsified model decided; read it with `tokensparse.sparsity_info`.

    keep_decisions: per stage, (B, N) keep masks over the original patches (with gradient in training).
    keep_mask:      (B, N) final keep mask (detached), 1 for patches that reached the last block.
    kept_index:     eval only: per stage, (B, k_s) kept original patch indices, ascending (EViT with
                    the authors' counts: N for a kept fused token, last).
    patch_tokens:   (B, M, C) final patch tokens after the last norm (M = N in training, where every
                    token stays in the tensor; the kept tokens in eval).
    patch_index:    (B, M) original patch index of each row of `patch_tokens`.
    tokens_per_block: (B, depth) tokens each block computed on, per image.
    num_prefix:     P, the model's prefix tokens (class, distillation, registers), never pruned.
    mlp_tokens:     (B, depth) tokens that reached each block's MLP (fewer than `tokens_per_block`
                    where ToMe merged or EViT reorganised between attention and MLP).
    extra:          the policy's statistics by name (`TokenState.stats`; typed: `avit_stats`,
                    `tome_stats`, `evit_stats`).
    dense_patch_tokens: with `dense_features`: (B, N, C) final patch features on the full grid; else None.
    """

    keep_decisions: list[torch.Tensor]
    keep_mask: torch.Tensor
    kept_index: list[torch.Tensor]
    patch_tokens: torch.Tensor
    patch_index: torch.Tensor
    tokens_per_block: torch.Tensor
    num_prefix: int
    extra: dict[str, Any]
    mlp_tokens: torch.Tensor | None = None
    dense_patch_tokens: torch.Tensor | None = None


class TokenPolicy:
    """Hooks the engine calls at block boundaries; mixed into a policy's nn.Module class.

    Every hook gets `state`, the forward's `TokenState`, which it may change; `index` is the block's
    position (0-based) in `model.blocks`; `info` is the `SparseInfo` of a finished forward."""

    method: str = "dense"
    # The data set index of each image of the next forward (`evaluate` sets it); a policy whose
    # decisions are random per image seeds each image's draw from its index, so a result does not
    # depend on the batch size. None: the images' positions in the batch.
    image_indices: torch.Tensor | None = None

    def begin(self, model: VisionTransformer, state: TokenState) -> None:
        """Called once per forward of `model` (the sparsified ViT), after the embeddings and before block 0,
        with the fresh `state`."""

    def before_block(self, index: int, state: TokenState) -> None:
        """Called before block `index`; may prune (gather) or mask tokens of `state`."""

    def run_block(self, index: int, block: nn.Module, state: TokenState) -> None:
        """Run `block` (model.blocks[index]) on `state.x`; the default is timm's block, masked when a keep
        mask is set."""
        if state.keep is None:
            state.x = block(state.x)
        else:
            prefix = state.keep.new_ones(state.batch_size, state.num_prefix)
            state.x = masked_block(block, state.x, torch.cat([prefix, state.keep], dim=1))

    def after_block(self, index: int, state: TokenState) -> None:
        """Called after block `index` has updated `state`."""

    def end(self, state: TokenState) -> None:
        """Called after the last block, before the final norm; sets `state.stats` if the policy has any."""

    def token_depth(self, info: SparseInfo) -> torch.Tensor | None:
        """(B, P + N) blocks each token computed in the forward `info` describes, prefix tokens first, for
        a method whose tokens stop
        at depths of their own (A-ViT); None: every token still present runs every block. `evaluate`
        reports mean depths, on and off the object, from it."""
        return None

    # How `tokensparse.viz.token_maps` draws a forward: "kept" (the patches kept after each pruning stage,
    # from `kept_index`), "depth" (blocks each patch computed, from `token_depth`) or "groups" (the token
    # each patch ended in, from `extra["token_group"]`)
    map_kind: Literal["kept", "depth", "groups"] = "kept"

    def map_heading(self, model: nn.Module, info: SparseInfo) -> str:
        """The title of a token-map figure of `model`'s forward that `info` describes: the method's setting
        and how to read the picture."""
        return f"{self.method}: kept patches, dropped ones greyed"

    def solved_setting(self, model: nn.Module, name: str) -> Any:
        """The value of the setting `name` a FLOP budget solved on `model` (what a run records and
        trains): the policy's attribute of that name unless a policy says otherwise."""
        return getattr(self, name)

    def pool_weights(self, info: SparseInfo) -> torch.Tensor | None:
        """(B, M) weight of each final patch token of the forward `info` describes in the model's average
        pool (a weighted mean), for a method whose tokens stand for several patches (DiffRate's sizes on
        MAE's heads); None: every token counts once."""
        return None

    def token_of_patch(self, info: SparseInfo) -> torch.Tensor | None:
        """(B, N) the final patch token (0-based, after the prefix) each patch ended in, in the forward `info`
        describes, for a method that merges (ToMe's source map): `dense_features` un-merges through it.
        None: a patch's last features while it was a token stand for it."""
        return None

    def token_size(self, info: SparseInfo) -> torch.Tensor | None:
        """(B, M) patches each final patch token of the forward `info` describes stands for, for a method that
        merges (ToMe): an attention-pool head adds its log to the pool's logits, as proportional attention
        does; None: one patch each."""
        return None

    def export_refusal(self) -> str | None:
        """Why this policy cannot become a static graph (ONNX export, torch.compile fullgraph), or None."""
        return None

    def progress(self, info: SparseInfo) -> dict[str, str]:
        """What the training progress bar shows of the last forward (`info`): the share of patches kept."""
        return {"keep": f"{float(info.keep_mask.float().mean()):.2f}"}

    def extra_flops(self, info: SparseInfo, num_patches: int) -> torch.Tensor:
        """(B,) multiply-adds of the forward `info` describes beyond `flops.backbone_flops` (which counts
        each block on the tokens it started with): the policy's own matmuls, less any block work it
        skipped; `no_extra_flops(info)` for a policy that computes nothing of its own. Every policy says.
        `num_patches` is N, the patches of the image. Multiply-adds are what the papers call FLOPs."""
        raise ValueError(
            f"no FLOP count for policy method {self.method!r}: its policy must define extra_flops "
            "(tokensparse.engine.no_extra_flops when it runs no matmul of its own)"
        )


def no_extra_flops(info: SparseInfo) -> torch.Tensor:
    """(B,) zeros, B from `info.tokens_per_block`: the `extra_flops` of a policy that only ranks, drops or
    reads what the blocks computed."""
    return torch.zeros(info.tokens_per_block.shape[0], dtype=torch.float64)


# what the engine reads of timm's Block and Attention: a timm that renames one is named, with its version
BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
ATTENTION_PARTS = (
    "qkv",
    "q_norm",
    "k_norm",
    "attn_drop",
    "norm",
    "proj",
    "proj_drop",
    "num_heads",
    "head_dim",
    "scale",
)


def check_timm_parts(block: nn.Module) -> None:
    """ValueError naming the timm version and the attributes missing from `block` (a timm Block) that the
    engine runs on, instead of an AttributeError deep inside a forward."""
    missing = [f"Block.{p}" for p in BLOCK_PARTS if not hasattr(block, p)]
    attn = getattr(block, "attn", None)
    if attn is not None:
        missing += [f"Attention.{p}" for p in ATTENTION_PARTS if not hasattr(attn, p)]
    if missing:
        raise ValueError(
            f"timm {timm.__version__} changed the internals tokensparse runs on: its {', '.join(missing)} "
            "are missing (tokensparse is tested with timm >= 1.0.16)"
        )


def check_model(model: nn.Module) -> Backbone:
    """The `Backbone` of `model` if tokensparse can run it (a timm ViT, Eva or BEiT, a Hugging Face ViT,
    DINOv2, CLIP or SigLIP vision model), else ValueError naming what is unsupported."""
    backbone = backbone_of(model)
    if get_policy(model) is not None:
        raise ValueError(
            f"this model is already sparsified with {get_policy(model).method}; apply tokensparse to the dense model"
        )
    backbone.check()
    pool = getattr(model, "global_pool", None)
    if backbone.family.startswith("timm") and pool not in SUPPORTED_POOLS:
        raise ValueError(f"global_pool={pool!r} is not supported; use one of {SUPPORTED_POOLS}")
    return backbone


def check_vit(
    model: nn.Module, method: str = "this method", reason: str = "it runs on timm's Attention"
) -> VisionTransformer:
    """Raise ValueError naming what is unsupported unless `model` is a timm `VisionTransformer` of timm's own
    `Block` and `Attention`, which `method` needs for `reason` (both named in the message): A-ViT's packed
    inference and DiffRate's search and merge run on exactly those."""
    backbone = check_model(model)
    if not backbone.timm_blocks:
        raise ValueError(
            f"{method} needs a timm VisionTransformer (e.g. timm.create_model('deit_small_patch16_224')): "
            f"{reason}; got {type(model).__name__} ({backbone.family}). ToMe, EViT, random and static pruning "
            "and DynamicViT run on it"
        )
    return model


def num_patches(model: nn.Module) -> int:
    """Patch tokens of the model at its configured image size (196 for 224/16)."""
    return backbone_of(model).num_patches()


def check_images(model: VisionTransformer, images: torch.Tensor) -> None:
    """Raise ValueError if `images` is not a (B, C, H, W) tensor `model` can take (its channels, and its
    image size unless it has dynamic_img_size), before torch fails deep inside."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images as a (B, C, H, W) tensor, got {shape}")
    channels = model.patch_embed.proj.in_channels
    if images.shape[1] != channels:
        raise ValueError(
            f"expected {channels} image channels, got {images.shape[1]} (shape {tuple(images.shape)})"
        )
    height, width = images.shape[-2:]
    if getattr(model, "dynamic_img_size", False):
        patch = model.patch_embed.patch_size
        if height % patch[0] or width % patch[1]:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {patch[0]}x{patch[1]}"
            )
    elif (height, width) != tuple(model.patch_embed.img_size):
        expected = model.patch_embed.img_size
        raise ValueError(
            f"image size {height}x{width} does not match the model's {expected[0]}x{expected[1]}; "
            "resize the input or create the model with img_size=..."
        )


def get_policy(model: nn.Module) -> TokenPolicy | None:
    """The `TokenPolicy` attached to `model` by `sparsify` (by any tokensparse method), or None for a
    model tokensparse has not changed (a DDP wrapper is not unwrapped here)."""
    name = getattr(model, _POLICY_ATTR, None)
    return None if name is None else getattr(model, name)


class _SparseViT:
    """Mixin placed in front of the model's own class by `sparsify`."""

    def forward_features(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ):
        if attn_mask is not None or is_causal:
            raise ValueError("attn_mask / is_causal are not supported by a tokensparse model")
        return run(self, x)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        info: SparseInfo | None = self.__dict__.get(_INFO_ATTR)
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "avg" and info is not None:
            if info.patch_tokens.shape[1] == info.keep_mask.shape[1]:
                # Mask regime: dropped tokens are still in the tensor; average only the kept ones.
                return self._weighted_average(x, info.keep_mask, at_least_one=True)
            weights = get_policy(self).pool_weights(info)
            if weights is not None:
                return self._weighted_average(x, weights)
        if getattr(self, "attn_pool", None) is not None and info is not None:
            return self._attention_pool(x, info)
        if not hasattr(super(), "pool"):  # BEiT pools in its forward_head: the same two forms
            return x[:, self.num_prefix_tokens :].mean(dim=1) if pool_type == "avg" else x[:, 0]
        return super().pool(x, pool_type)

    def _weighted_average(
        self, x: torch.Tensor, weights: torch.Tensor, at_least_one: bool = False
    ) -> torch.Tensor:
        """The average pool of `x` with the patch tokens weighted by `weights` (B, M) (the prefix tokens once
        each where the model pools them); at_least_one: divide by at least 1 (a batch row with every token
        masked)."""
        prefix = self.num_prefix_tokens
        weight = weights.to(x.dtype).unsqueeze(-1)
        total, count = (x[:, prefix:] * weight).sum(1), weight.sum(1)
        if getattr(self, "pool_include_prefix", False):
            total, count = total + x[:, :prefix].sum(1), count + prefix
        return total / (count.clamp_min(1.0) if at_least_one else count)

    def _attention_pool(self, x: torch.Tensor, info: SparseInfo) -> torch.Tensor:
        """timm's attention-pool head (SigLIP's MAP) over the final tokens: a merged token weighted by its size
        (log size added to the pool's logits), a masked one (training) left out."""
        prefix = self.num_prefix_tokens
        bias = None
        if info.patch_tokens.shape[1] == info.keep_mask.shape[1]:  # every token still in the tensor
            bias = info.keep_mask.to(x.dtype).log()
        size = get_policy(self).token_size(info)
        if size is not None:
            bias = size.to(x.dtype).log() if bias is None else bias + size.to(x.dtype).log()
        if self.pool_include_prefix:
            if bias is not None:
                bias = torch.cat([bias.new_zeros(bias.shape[0], prefix), bias], dim=1)
        else:
            x = x[:, prefix:]
        return self.attn_pool(x, attn_mask=None if bias is None else bias[:, None, None, :])

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop(_INFO_ATTR, None)
        return state

    def __reduce_ex__(self, protocol):
        # The class made by `sparsify` has no importable name: pickle (torch.save(model)) rebuilds it
        # from the model's own timm class instead.
        return _rebuild_sparse, (type(self).__bases__[1], type(self).__bases__[0]), self.__getstate__()


class _SparseBeit(_SparseViT):
    """Mixin for timm's `Beit`, which pools inside its `forward_head`: pooled here as a ViT's `pool` is (a
    masked token, in training, left out of the average)."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool:
            x = self.pool(x, self.global_pool)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)


class _SparseHF(_SparseViT):
    """Mixin placed in front of a Hugging Face `transformers` vision model's class by `sparsify`: its forward
    runs the engine and returns the model's own output object (`tokensparse.adapters.hf.hf_forward`)."""

    def forward(self, pixel_values: torch.Tensor | None = None, **kwargs: Any):
        from .adapters.hf import hf_forward, hf_parts

        given = sorted(k for k, v in kwargs.items() if v not in (None, False) and k != "return_dict")
        if pixel_values is None or given:
            raise ValueError(
                "a tokensparse Hugging Face model takes pixel_values only"
                + (f"; {', '.join(given)} are not supported" if given else "")
            )
        x = run(self, pixel_values)
        info: SparseInfo = self.__dict__[_INFO_ATTR]
        policy = get_policy(self)
        if info.patch_tokens.shape[1] == info.keep_mask.shape[1]:
            weights = info.keep_mask  # mask regime (training): a masked token is left out of any pooling
        elif hf_parts(self).family == "hf-siglip" and not hasattr(self, "classifier"):
            weights = policy.token_size(info)  # the attention-pool head: a merged token by its size
        else:
            weights = policy.pool_weights(info)
        if weights is not None and bool((weights == 1).all()):
            weights = None
        return hf_forward(self, pixel_values, weights, x)


@functools.cache
def _sparse_class(base: type, mixin: type = _SparseViT) -> type:
    return type(f"Sparse{base.__name__}", (mixin, base), {})


def _rebuild_sparse(base: type, mixin: type = _SparseViT) -> nn.Module:
    model = base.__new__(base)
    model.__class__ = _sparse_class(base, mixin)
    return model


def sparsify(model: VisionTransformer, policy: TokenPolicy, attr: str) -> VisionTransformer:
    """Attach `policy` to `model` under `attr` and route the forward through the engine (in place)."""
    backbone = check_model(model)
    base = type(model)
    mixin = {"timm-beit": _SparseBeit}.get(
        backbone.family, _SparseHF if backbone.family.startswith("hf") else _SparseViT
    )
    model.__class__ = _sparse_class(base, mixin)
    model.add_module(attr, policy)
    policy.train(model.training)  # a new module starts in training mode; it follows the model's
    setattr(model, _POLICY_ATTR, attr)
    return model


def sparsity_info(model: nn.Module) -> SparseInfo:
    """What the last forward of `model`, a sparsified ViT (or its DDP / DataParallel wrapper), decided
    (keep masks, kept indices, final tokens); RuntimeError before its first forward."""
    model = getattr(model, "module", model)  # DDP / DataParallel
    info = model.__dict__.get(_INFO_ATTR)
    if info is None:
        raise RuntimeError("no forward has run on this tokensparse model yet")
    return info


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The tokens block 0 of `model` reads from `images` (B, C, H, W): its family's patch embedding, position
    embedding (and prefix tokens), patch dropout and pre-norm, as its own `forward_features` runs them."""
    return backbone_of(model).embed(images)[0]


def run(
    model: nn.Module, images: torch.Tensor, regime: Regime | None = None, dense: bool = False
) -> torch.Tensor:
    """Forward features of `images` (B, C, H, W) through the engine on `model`, a sparsified ViT:
    embeddings, policy-driven blocks, final norm.

    regime: 'mask' keeps every token and masks attention (the training form), 'gather' removes
    tokens and runs timm's ordinary blocks on the shorter sequences (the inference form). By default
    'mask' in train mode and 'gather' in eval mode. dense (default False): also keep every patch's
    features on the full grid (`SparseInfo.dense_patch_tokens`; see `dense_features`).
    """
    policy = get_policy(model)
    if policy is None:
        raise ValueError("model is not sparsified; call tokensparse.dynamicvit(model, ...) first")
    backbone = backbone_of(model)
    backbone.check_images(images)
    regime = regime or ("mask" if model.training else "gather")
    x, context = backbone.embed(images)
    batch = x.shape[0]
    prefix = backbone.num_prefix
    patches = x.shape[1] - prefix
    state = TokenState(
        x=x,
        num_prefix=prefix,
        num_patches=patches,
        regime=regime,
        patch_index=torch.arange(patches, device=x.device).expand(batch, patches),
        dense=torch.cat([x[:, prefix:], x[:, :1, :] * 0], dim=1) if dense else None,
    )
    policy.begin(model, state)
    for index, block in enumerate(backbone.views(state, context)):
        policy.before_block(index, state)
        active = state.active_tokens
        state.tokens_per_block.append(active if active is not None else state.x.shape[1])
        policy.run_block(index, block, state)
        policy.after_block(index, state)
        state.record_dense()
    policy.end(state)
    state.record_dense()
    x = backbone.final_norm(state.x)
    if state.keep is not None:
        keep_mask = state.keep.detach()
    else:
        # patch_index may hold `patches` for a token that is no patch (EViT's fused token): dropped here.
        keep_mask = torch.zeros(batch, patches + 1, device=x.device).scatter_(1, state.patch_index, 1.0)
        keep_mask = keep_mask[:, :patches]
    tokens_per_block = _stack_counts(state.tokens_per_block, batch, x.device)
    model.__dict__[_INFO_ATTR] = SparseInfo(
        keep_decisions=state.keep_decisions,
        keep_mask=keep_mask,
        kept_index=state.kept_index,
        patch_tokens=x[:, prefix:],
        patch_index=state.patch_index,
        tokens_per_block=tokens_per_block,
        num_prefix=prefix,
        extra={} if state.stats is None else _fields(state.stats),
        mlp_tokens=torch.stack(state.mlp_tokens, dim=1) if state.mlp_tokens else tokens_per_block,
    )
    if dense:
        info = model.__dict__[_INFO_ATTR]
        group = policy.token_of_patch(info)
        if group is not None:
            rows = group.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            info.dense_patch_tokens = info.patch_tokens.gather(1, rows)
        else:
            info.dense_patch_tokens = backbone.final_norm(state.dense[:, :patches])
    return x


def dense_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, N, C) final patch features of `images` (B, C, H, W) on the full patch grid (row-major; reshape to
    (B, rows, columns, C)), for dense prediction from a sparsified model (DINOv2- and SAM-style uses), after
    the model's final norm, in the model's current mode.

    A merged patch (ToMe) takes the features of the token it was merged into (un-merged through ToMe's
    source map). A pruned patch keeps the features it had when it was dropped, as DynamicViT's
    dense-prediction variant (its ConvNeXt / Swin form) carries pruned tokens past the blocks; with no
    fast path on a ViT, they pass unchanged. A-ViT's halted tokens already hold their outputs there. A
    Hugging Face model's are its `last_hidden_state` on the full grid (the prefix tokens left out).
    """
    model = getattr(model, "module", model)
    if get_policy(model) is None:
        raise ValueError("model is not sparsified; a dense model's forward_features already has every patch")
    run(model, images, dense=True)
    tokens = sparsity_info(model).dense_patch_tokens
    if backbone_of(model).family.startswith("hf"):  # as its last_hidden_state: after the model's final norm
        from .adapters.hf import last_hidden_state

        tokens = last_hidden_state(model, tokens)
    return tokens


def _fields(stats: Any) -> dict[str, Any]:
    """A dataclass's fields by name, the values themselves (not copies, as dataclasses.asdict makes)."""
    return {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}


def policy_stats(model: nn.Module, policy_type: type, stats_type: type, accessor: str, maker: str):
    """`stats_type` of the last forward of `model`, whose policy must be a `policy_type` (else ValueError
    naming `accessor`, the public function asking, and `maker`, the tokensparse function that makes such
    a model)."""
    if not isinstance(get_policy(getattr(model, "module", model)), policy_type):
        raise ValueError(f"{accessor} needs a model made by tokensparse.{maker}")
    extra = sparsity_info(model).extra
    return stats_type(**{f.name: extra[f.name] for f in dataclasses.fields(stats_type)})


def _stack_counts(counts: list[int | torch.Tensor], batch: int, device: torch.device) -> torch.Tensor:
    """(B, depth) token counts from per-block ints (uniform) or (B,) tensors (per image)."""
    if all(isinstance(c, int) for c in counts):
        return torch.tensor(counts, device=device).expand(batch, -1)
    columns = [c if isinstance(c, torch.Tensor) else torch.full((batch,), c) for c in counts]
    return torch.stack([c.to(device) for c in columns], dim=1)
