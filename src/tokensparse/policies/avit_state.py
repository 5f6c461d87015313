"""A-ViT's per-forward state: its statistics (`HaltingStats`) and the bookkeeping of the masked
(training) and packed (inference) forms that `policies/avit.py`'s policy keeps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer

from ..attention import PackedLayout


@dataclass
class HaltingStats:
    """What A-ViT's last forward did, per image (B images of P prefix + N patch tokens).

    token_depth:   (B, P + N) int64, blocks each token computed (class token first).
    mean_depth:    (B,) mean of token_depth over all P + N tokens.
    ponder:        (B, P + N) ponder cost, blocks used + remainder (with gradient in training).
    halting_score_layer: (depth,) mean halting score of each block (the distributional prior's input).
    depth_map:     (B, grid_h, grid_w) token_depth of the patch tokens, or None if the patches do not
                   fill the model's grid (e.g. dynamic image size).
    """

    token_depth: torch.Tensor
    mean_depth: torch.Tensor
    ponder: torch.Tensor
    halting_score_layer: torch.Tensor
    depth_map: torch.Tensor | None


@dataclass
class _Run:
    blocks: int  # depth of the model
    grid: tuple[int, int]  # patch grid of the model


@dataclass
class _MaskedRun(_Run):
    """Training-form bookkeeping: every token of every image, (B, P + N)."""

    halting_score_layer: list[torch.Tensor]  # per block so far, the mean halting score (with gradient)
    running: torch.Tensor
    cumulative: torch.Tensor
    remainder: torch.Tensor
    ponder: torch.Tensor
    depth: torch.Tensor
    output: torch.Tensor | float = 0.0


# Rows of `_PackedRun.rows`: one float32 value per live token (HEAD and ONE adjacent: one product
# and one sum count the running head tokens and the running tokens together).
CUMULATIVE, REMAINDER, PONDER_STEP, IMAGE, POSITION, HEAD, ONE = range(7)


@dataclass
class _PackedRun(_Run):
    """Inference bookkeeping: the pack of live tokens, their halting state, and the tokens that left.

    At batch 1 a tensor op costs about the same whatever its size (10-15 us on this project's CPU,
    more right after a block's matmuls: benchmarks/avit_overhead.py), so the bookkeeping's cost is its
    number of ops. The per-token
    scalars therefore live in the rows of one (7, T) float32 tensor (cumulative score, remainder,
    this block's ponder step, image, position in the image, 1.0 for a token the head reads, 1.0), so
    that dropping tokens is one gather for all of them, and a block reads back one pair of numbers
    (running head tokens, running tokens) once. A token's halting-weighted sum accumulates in the
    pack (`acc`) while it runs; when it leaves (it halted, its image exited early, or the last block
    ran) its sum and rows go to `left` with its depth, and `end` writes them to their places.
    """

    tokens: torch.Tensor  # (T, C) live tokens, image after image
    acc: torch.Tensor  # (T, C) halting-weighted sum of each live token's block outputs so far
    rows: torch.Tensor  # (7, T) float32: CUMULATIVE, REMAINDER, PONDER_STEP, IMAGE, POSITION, HEAD, ONE
    layout: PackedLayout
    left: list[tuple[torch.Tensor, torch.Tensor, int]]  # (acc, rows, blocks run) of tokens that left
    scores: list[torch.Tensor]  # per block, the halting scores of the tokens it computed


def _head_tokens(model: VisionTransformer, tokens: int, prefix: int, device: torch.device) -> torch.Tensor:
    """(P + N,) True for the tokens the head reads: class (+ distillation) token, or all pooled tokens."""
    head = torch.zeros(tokens, dtype=torch.bool, device=device)
    if model.global_pool == "avg":
        head[0 if getattr(model, "pool_include_prefix", False) else prefix :] = True
    else:
        head[: 2 if getattr(model, "head_dist", None) is not None else 1] = True
    return head
