"""Dynamic spatial sparsification (Rao et al., T-PAMI 2023): the parts ConvNeXt and Swin share.

Hierarchical backbones cannot drop positions (convolutions, windows and patch merging need the full
grid), so in one stage (the third) every block from the first pruning location on has two paths: the
block's own MLP ("full path") for the positions a predictor marks important, and a cheap fast path
(LayerNorm + Linear) for the rest. Three predictors, at blocks `locations` of that stage, each rank
all positions of the stage afresh; predictor s sends the top int(N * keep_ratios[s]) positions to
the full path, with keep_ratios = (rho, rho - 0.2, rho - 0.4) as the authors' main.py sets them.

- Training (two streams): every block computes both paths on every position; a hard Gumbel-softmax
  decision per position mixes them (straight-through), so gradients reach the predictors and the fast
  paths. Unlike DynamicViT, a decision does not depend on the previous one.
- Inference (gather): positions are gathered by the ranking, the full path runs on the kept ones and
  the fast path on the rest, and both are scattered back into the grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checks import check_number, is_int
from .registry import DISTILL_WEIGHT, KEEP_RATIO, LOCATIONS, RATIO_WEIGHT, Method, register_method

if TYPE_CHECKING:
    from ..config import TrainConfig

KEEP_RATIO_STEPS = (0.0, 0.2, 0.4)
"""The authors' SPARSE_RATIO = [rho, rho - 0.2, rho - 0.4] (main.py), one per predictor."""

SPARSE_STAGE = 2
"""The stage (0-based) that gets predictors and fast paths, as in the authors' ConvNeXt and Swin."""


def stage_keep_ratios(keep_ratio: float) -> tuple[float, ...]:
    """(rho, rho - 0.2, rho - 0.4) for rho = `keep_ratio` in (0.4, 1], computed as the authors' main.py does
    (so int(N * ratio) agrees bit for bit)."""
    keep_ratio = check_number(
        "keep_ratio",
        keep_ratio,
        lambda v: KEEP_RATIO_STEPS[-1] < v <= 1.0,
        "in (0.4, 1] (the three predictors keep rho, rho - 0.2 and rho - 0.4 of the positions)",
    )
    return tuple(keep_ratio - step for step in KEEP_RATIO_STEPS)


def default_locations(depth: int) -> tuple[int, int, int]:
    """The authors' placement of the three predictors in a sparse stage of `depth` blocks: (1, 2, 3) for a
    9-block (ConvNeXt-T) or 6-block (Swin-T) stage, (3, 6, 9) for ConvNeXt-S/B's 27 blocks, (2, 4, 6) for
    Swin-S/B's 18."""
    step = max(1, depth // 9)
    return (step, 2 * step, 3 * step)


def check_locations(locations: Sequence[int] | None, depth: int, what: str) -> tuple[int, ...]:
    """`locations` (None: `default_locations(depth)`) checked as three strictly increasing block indices of
    a sparse stage of `depth` blocks, or ValueError naming the model `what`."""
    locations = default_locations(depth) if locations is None else tuple(locations)
    if len(locations) != len(KEEP_RATIO_STEPS):
        raise ValueError(
            f"locations must name {len(KEEP_RATIO_STEPS)} blocks (one per predictor), got {locations!r}"
        )
    if not all(map(is_int, locations)):
        raise ValueError(f"locations must be block indices (ints), got {locations!r}")
    if any(b <= a for a, b in zip(locations, locations[1:])) or locations[0] < 0 or locations[-1] >= depth:
        raise ValueError(
            f"locations {locations!r} must be strictly increasing block indices inside {what}'s stage "
            f"{SPARSE_STAGE}, which has {depth} blocks"
        )
    return locations


class SpatialScorePredictor(nn.Module):
    """The authors' `PredictorLG` of dyconvnext.py / dyswin.py on (B, N, C) positions, index 0 = keep.

    LayerNorm -> Linear(C, C) -> GELU; the first half of the channels stays per position, the second is
    averaged over all positions of the image; then Linear(C, C/2) -> GELU -> Linear(C/2, C/4) -> GELU ->
    Linear(C/4, 2) -> LogSoftmax. (Their ConvNeXt version writes the Linears as 1x1 convolutions.)
    `dim` is the stage's channel count C; `eps` the LayerNorm's epsilon (the backbone's: 1e-6 for timm's
    ConvNeXt, 1e-5 for Swin).
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim, eps=eps), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """`positions` (B, N, C) -> (B, N, 2) log-probabilities."""
        x = self.in_conv(positions)
        half = x.shape[-1] // 2
        local = x[..., :half]
        image = x[..., half:].mean(dim=1, keepdim=True)
        return self.out_conv(torch.cat([local, image.expand_as(local)], dim=-1))


def gumbel_keep(log_probs: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """`log_probs` (B, N, 2) -> (B, N) hard Gumbel-softmax keep decisions, straight-through.

    channels_first draws the noise in the (B, 2, N) layout of the authors' ConvNeXt predictor (a 1x1
    conv output), so a seeded run reproduces their decisions; their Swin draws in (B, N, 2).
    """
    if channels_first:
        return F.gumbel_softmax(log_probs.transpose(1, 2).contiguous(), hard=True, dim=1)[:, 0]
    return F.gumbel_softmax(log_probs, hard=True, dim=-1)[..., 0]


def rank_positions(keep_log_prob: torch.Tensor, keep_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`keep_log_prob` (B, N) keep scores -> (kept (B, k), rest (B, N - k)) position indices, sorted by
    descending score, k = int(N * keep_ratio)."""
    order = torch.argsort(keep_log_prob, dim=1, descending=True)
    count = int(keep_log_prob.shape[1] * keep_ratio)
    return order[:, :count], order[:, count:]


def gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, C) at index (B, k) -> (B, k, C)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_positions(
    kept_out: torch.Tensor, rest_out: torch.Tensor, kept: torch.Tensor, rest: torch.Tensor
) -> torch.Tensor:
    """The two paths' outputs put back on the grid: (B, N, C) with row kept[b, i] = kept_out[b, i] and row
    rest[b, i] = rest_out[b, i]."""
    values = torch.cat([kept_out, rest_out], dim=1)
    index = torch.cat([kept, rest], dim=1).unsqueeze(-1).expand(-1, -1, values.shape[-1])
    return torch.empty_like(values).scatter_(1, index, values)


@dataclass
class SpatialInfo:
    """What the last forward of a dynamic ConvNeXt / Swin decided (`dynamic_spatial_info(model)`).

    keep_decisions: per predictor, (B, N) in {0, 1}: the hard Gumbel decisions in training (with their
        straight-through gradient, for the ratio loss), the ranking's top-k in eval.
    kept_index: per predictor in eval, (B, k) positions (row-major over `grid`) given the full path;
        empty in training.
    features: training only, (B, M, C) the final-norm features per position of the last stage (what the
        authors distil against the teacher's); None in eval.
    """

    grid: tuple[int, int]
    keep_decisions: list[torch.Tensor] = field(default_factory=list)
    kept_index: list[torch.Tensor] = field(default_factory=list)
    features: torch.Tensor | None = None


class DynamicStageMixin:
    """The block loop of the sparse stage: predictors, then two streams (train) or gathered paths (eval).

    The host class provides `blocks`, `score_predictor`, `locations`, `keep_ratios`, and the layout
    hooks `_positions(x) -> (B, N, C)`, `_grid(x) -> (H, W)`, `_mask(keep (B, N), x)` (broadcastable
    to x) and `_channels_first_noise`.
    """

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        info = SpatialInfo(grid=self._grid(x))
        stream: torch.Tensor | tuple[torch.Tensor, torch.Tensor] = x
        mask = None
        split = None
        for j, block in enumerate(self.blocks):
            if j in self.locations:
                s = self.locations.index(j)
                mixed = stream if mask is None else stream[0] * mask + stream[1] * (1 - mask)
                log_probs = self.score_predictor[s](self._positions(mixed))
                if self.training:
                    keep = gumbel_keep(log_probs, self._channels_first_noise)
                    info.keep_decisions.append(keep)
                    mask = self._mask(keep, x)
                    if not isinstance(stream, tuple):
                        stream = (stream, stream)
                else:
                    split = rank_positions(log_probs[..., 0], self.keep_ratios[s])
                    info.kept_index.append(split[0])
                    info.keep_decisions.append(
                        log_probs.new_zeros(log_probs.shape[:2]).scatter_(1, split[0], 1.0)
                    )
            if j < self.locations[0]:
                stream = block(stream)
            elif self.training:
                stream = block.forward_two_stream(stream, mask)
            else:
                stream = block.forward_split(stream, split)
        self.last_info = info
        if isinstance(stream, tuple):
            stream = stream[0] * mask + stream[1] * (1 - mask)
        return stream


def mlp_position_counts(
    positions: int, depth: int, locations: Sequence[int] | None, keep_ratios: Sequence[float], training: bool
) -> list[tuple[int, int]]:
    """(full-path, fast-path) positions per block of a stage of `depth` blocks with `positions` positions,
    predictors at `locations` (None: none) keeping `keep_ratios`, in training mode or not (`training`).

    Dense blocks (before the first location, or no locations): all on the full path. Training: both
    paths on all positions. Eval: int(N * ratio) of the latest predictor on the full path.
    """
    counts = []
    ratio = None
    for j in range(depth):
        if locations is not None and j in locations:
            ratio = keep_ratios[list(locations).index(j)]
        if ratio is None:
            counts.append((positions, 0))
        elif training:
            counts.append((positions, positions))
        else:
            kept = int(positions * ratio)
            counts.append((kept, positions - kept))
    return counts


def is_spatial_model(model: nn.Module) -> bool:
    """Whether `model` is a timm ConvNeXt or SwinTransformer, dense or dynamic (the backbones of --method
    dynamicspatial)."""
    from timm.models.convnext import ConvNeXt
    from timm.models.swin_transformer import SwinTransformer

    return isinstance(getattr(model, "module", model), (ConvNeXt, SwinTransformer))


def sparse_stage(model: nn.Module) -> DynamicStageMixin:
    """The stage holding the predictors of a dynamic ConvNeXt / Swin; ValueError for any other model."""
    model = getattr(model, "module", model)  # DDP / DataParallel
    for module in model.modules():
        if isinstance(module, DynamicStageMixin):
            return module
    raise ValueError(
        f"{type(model).__name__} is not a dynamic ConvNeXt / Swin (use tokensparse.dynamic_convnext or dynamic_swin)"
    )


def dynamic_spatial_info(model: nn.Module) -> SpatialInfo:
    """What the last forward of `model`, a dynamic ConvNeXt / Swin, decided (see `SpatialInfo`)."""
    info = sparse_stage(model).last_info
    if info is None:
        raise ValueError("the model has not run a forward since it was made dynamic")
    return info


def from_authors_layout(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` renamed to timm's keys if it is a checkpoint of the authors' AdaConvNeXt / AdaSwinTransformer
    and `model` the matching timm model (dense or dynamic); otherwise `state` unchanged."""
    from timm.models.convnext import ConvNeXt
    from timm.models.swin_transformer import SwinTransformer

    from .dynconvnext import authors_convnext_state_dict, is_authors_convnext_state
    from .dynswin import authors_swin_state_dict, is_authors_swin_state

    model = getattr(model, "module", model)
    if isinstance(model, ConvNeXt) and is_authors_convnext_state(state):
        return authors_convnext_state_dict(state, model)
    if isinstance(model, SwinTransformer) and is_authors_swin_state(state):
        return authors_swin_state_dict(state, model)
    return state


def spatial_flops(model: nn.Module, img_size: tuple[int, int]) -> int:
    """Executed multiply-adds per image of a timm ConvNeXt or SwinTransformer (dense or dynamic) at
    `img_size`, in the model's current mode (see `dynamic_convnext_flops`, `dynamic_swin_flops`)."""
    from timm.models.convnext import ConvNeXt
    from timm.models.swin_transformer import SwinTransformer

    from .dynconvnext import dynamic_convnext_flops
    from .dynswin import dynamic_swin_flops

    model = getattr(model, "module", model)
    if isinstance(model, ConvNeXt):
        return dynamic_convnext_flops(model, img_size)
    if isinstance(model, SwinTransformer):
        return dynamic_swin_flops(model, img_size)
    raise ValueError(
        f"spatial_flops counts timm ConvNeXt and SwinTransformer models, got {type(model).__name__}"
    )


def fast_path(norm: nn.Module, dim: int, factory: dict, *tail: nn.Module) -> nn.Sequential:
    """A block's fast path: `norm` (its LayerNorm) + Linear(dim, dim) (+ `tail`), the Linear initialised as
    the authors do (trunc_normal std 0.02, zero bias), on the model's device and dtype (`factory`)."""
    fast = nn.Sequential(norm, nn.Linear(dim, dim, **factory), *tail)
    nn.init.trunc_normal_(fast[1].weight, std=0.02)
    nn.init.zeros_(fast[1].bias)
    return fast


def make_sparse_stage(
    stage: nn.Module,
    stage_class: type,
    dim: int,
    eps: float,
    locations: tuple[int, ...],
    keep_ratios: tuple[float, ...],
    factory: dict,
) -> None:
    """Make `stage` (whose blocks already have their fast paths) the sparse stage, of class
    `stage_class`: one `SpatialScorePredictor(dim, eps)` per location of `locations`, the i-th ranking
    keeps `keep_ratios[i]` of the positions; on the model's device and dtype (`factory`)."""
    stage.__class__ = stage_class
    stage.score_predictor = nn.ModuleList(SpatialScorePredictor(dim, eps=eps) for _ in locations).to(
        **factory
    )
    stage.locations = locations
    stage.keep_ratios = keep_ratios
    stage.last_info = None


def new_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters dynamic spatial sparsification added to `model`: the predictors, and each block's fast
    path (with its layer scale), which train at the full lr from the start."""
    stage = sparse_stage(model)
    params = list(stage.score_predictor.parameters())
    for block in stage.blocks:
        if hasattr(block, "fast_path"):
            params += list(block.fast_path.parameters())
        if getattr(block, "fast_path_gamma", None) is not None:
            params.append(block.fast_path_gamma)
    return params


def dynamic_spatial(
    model: nn.Module, keep_ratio: float = 0.7, locations: Sequence[int] | None = None
) -> nn.Module:
    """`dynamic_convnext` or `dynamic_swin`, as `model` is (in place), with the same `keep_ratio` (default
    0.7, the journal version's headline ratio, Rao et al. 2023) and `locations` (None: the authors'
    placement, `default_locations`)."""
    from timm.models.convnext import ConvNeXt

    from .dynconvnext import dynamic_convnext
    from .dynswin import dynamic_swin

    make = dynamic_convnext if isinstance(model, ConvNeXt) else dynamic_swin
    return make(model, keep_ratio=keep_ratio, locations=locations)


def from_config(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """`dynamic_spatial` on `model` with the settings of the run's TrainConfig `cfg` (the registry's
    constructor)."""
    return dynamic_spatial(model, keep_ratio=cfg.keep_ratio, locations=cfg.locations)


def _objective(cfg: TrainConfig, depth: int) -> nn.Module:
    from ..losses.spatial import DynamicSpatialLoss

    return DynamicSpatialLoss.from_config(cfg, depth)


# Dynamic spatial sparsification of timm ConvNeXt / Swin (the DynamicViT authors' T-PAMI extension), as
# their main.py and README run it: ConvNextDistillDiffPruningLoss with ratio weight 10, --lr_scale 0.2,
# fix_step 5.
register_method(
    Method(
        "dynamicspatial",
        sparsify=from_config,
        objective=_objective,
        recipe=dict(
            keep_ratio=0.7,
            ratio_weight=10.0,
            distill_weight=0.5,
            backbone_lr_scale=0.2,
            backbone_fixed_epochs=5,
            freeze_embeddings=False,
        ),
        settings=(KEEP_RATIO, LOCATIONS, RATIO_WEIGHT, DISTILL_WEIGHT),
        bench_setting="keep_ratio",
        new_parameters=new_parameters,
        bench_bound="FLOP ratio dense/dynamic (no tokens are removed)",
        architecture="spatial",
    )
)
