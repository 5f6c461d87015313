"""An evaluation-only bound for learned pruning: DynamicViT's token counts with the object's own
patches (known from the canvas layout) ranked first, then the others by the learned predictors."""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.models.vision_transformer import VisionTransformer

from ..engine import TokenState, get_policy
from ..policies.dynamicvit import DynamicViTPolicy

ObjectMasks = Callable[[torch.Tensor], torch.Tensor]
"""(B,) data set indices of a forward's images -> (B, N) bool, True on the object's patches."""


class ObjectOraclePolicy(DynamicViTPolicy):
    """DynamicViT's predictors and counts, with every patch on the object scored above every other.

    Inference only: each forward needs its images' data set indices (`image_indices`, which
    `tokensparse.evaluate` sets) to look their objects up with `object_masks`.
    """

    method = "oracle"

    def __init__(self, dim: int, keep_ratio: float, locations, object_masks: ObjectMasks) -> None:
        super().__init__(dim, keep_ratio, locations)
        self.object_masks = object_masks

    def gather_score(self, stage: int, state: TokenState) -> torch.Tensor:
        if self.image_indices is None:
            raise ValueError("the object oracle needs image_indices: evaluate it with tokensparse.evaluate")
        on_object = self.object_masks(self.image_indices).to(state.x.device)
        learned = super().gather_score(stage, state)  # log-probabilities, <= 0
        return learned + 1e4 * on_object.float().gather(1, state.patch_index)

    def mask_stage(self, stage: int, count: int, state: TokenState) -> None:
        raise ValueError("the object oracle is an evaluation bound: it has no training (mask) form")


def object_oracle(model: VisionTransformer, object_masks: ObjectMasks) -> VisionTransformer:
    """Turn a DynamicViT `model` (with its trained predictors) into the object oracle, in place."""
    policy = get_policy(model)
    if not isinstance(policy, DynamicViTPolicy):
        raise ValueError(f"object_oracle needs a DynamicViT model, got {type(policy).__name__}")
    oracle = ObjectOraclePolicy(model.embed_dim, policy.keep_ratio, policy.locations, object_masks)
    oracle.load_state_dict(policy.state_dict())
    model.add_module("score_predictor", oracle.to(next(policy.parameters()).device))
    return model


def clutter_object_masks(dataset, patch_size: int) -> ObjectMasks:
    """`ObjectMasks` of a FashionMNISTClutter split: the patches overlapping each item's object box."""

    def masks(indices: torch.Tensor) -> torch.Tensor:
        return torch.stack([dataset.object_patch_mask(int(i), patch_size).flatten() for i in indices])

    return masks
