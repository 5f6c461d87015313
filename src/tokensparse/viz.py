"""Pictures of what a sparsified model did with each image, as PNG grids readable at a glance.

- pruning methods (DynamicViT, EViT, random, static): the patches kept after each stage, dropped ones
  greyed;
- A-ViT: each patch's halting depth as a heat map over the image;
- ToMe: the merged groups, each group drawn in one colour;
- accuracy against executed FLOPs, each point labelled with its setting.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from .checkpoints import atomic_path
from .engine import get_policy, sparsity_info  # noqa: E402


def to_display(images: torch.Tensor, mean=None, std=None) -> np.ndarray:
    """(B, 3, H, W) normalised tensors -> (B, H, W, 3) floats in [0, 1]."""
    x = images.detach().float().cpu()
    if mean is not None and std is not None:
        x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    return x.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    gh, gw = grid.shape[:2]
    return np.repeat(np.repeat(grid, height // gh, axis=0), width // gw, axis=1)


def _kept_overlay(image: np.ndarray, kept: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(grid[0] * grid[1], dtype=bool)
    mask[kept[kept < mask.size]] = True  # EViT marks its fused token (no patch) with index N
    mask = _upsample(mask.reshape(grid), *image.shape[:2])[..., None]
    grey = image.mean(axis=-1, keepdims=True) * 0.35 + 0.55
    return np.where(mask, image, grey)


@torch.no_grad()
def token_maps(
    model: nn.Module,
    images: torch.Tensor,
    path: str | os.PathLike,
    mean=None,
    std=None,
    titles: list[str] | None = None,
) -> Path:
    """Run `model` (eval) on `images` and save a grid: one row per image, the original then its maps."""
    from .policies.dynspatial import is_spatial_model

    if is_spatial_model(model):
        return _spatial_maps(model, images, path, mean, std, titles)
    policy = get_policy(model)
    if policy is None:
        raise ValueError("token_maps needs a tokensparse model (dynamicvit, avit, tome, evit, ...)")
    was_training = model.training
    model.eval()
    model(images)
    model.train(was_training)
    info = sparsity_info(model)
    grid = tuple(model.patch_embed.grid_size)
    pictures = to_display(images, mean, std)
    kind = policy.map_kind  # what the policy's forward can be drawn as, whatever the method
    patches = grid[0] * grid[1]
    heading = policy.map_heading(model, info)
    if kind == "depth":
        columns = ["image", "halting depth"]
    elif kind == "groups":
        r = getattr(model, "r", None)
        columns = ["image", "merged groups" + (f" (r={r})" if r is not None else "")]
    else:
        counts = [int(k.shape[1]) for k in info.kept_index]
        columns = ["image"] + [f"after stage {s + 1}: {c} of {patches}" for s, c in enumerate(counts)]
    rows = len(pictures)
    fig, axes = plt.subplots(
        rows,
        len(columns),
        figsize=(1.9 * len(columns) + (0.6 if kind == "depth" else 0.0), 1.9 * rows),
        squeeze=False,
        layout="constrained",
    )
    depth = len(model.blocks)
    shown = None
    for i, picture in enumerate(pictures):
        axes[i, 0].imshow(picture)
        if titles:
            axes[i, 0].set_ylabel(titles[i], fontsize=7)
        if kind == "depth":
            depth_map = info.extra["token_depth"][i, info.num_prefix :].float().cpu().numpy().reshape(grid)
            axes[i, 1].imshow(picture)
            shown = axes[i, 1].imshow(
                _upsample(depth_map, *picture.shape[:2]), cmap="viridis", alpha=0.6, vmin=1, vmax=depth
            )
        elif kind == "groups":
            groups = _tome_groups(info, i, grid)
            colours = plt.get_cmap("tab20")(np.linspace(0, 1, 20))[:, :3]
            layer = colours[groups % 20]
            axes[i, 1].imshow(0.45 * picture + 0.55 * _upsample(layer, *picture.shape[:2]))
        else:
            for s, kept in enumerate(info.kept_index):
                axes[i, 1 + s].imshow(_kept_overlay(picture, kept[i].cpu().numpy(), grid))
    if shown is not None:  # one colour bar for the whole depth column
        bar = fig.colorbar(shown, ax=axes[:, -1].tolist(), shrink=min(1.0, 0.5 + 0.1 * rows), aspect=25)
        bar.set_label("blocks computed", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    return _save_maps(fig, axes, columns, path, heading)


def accuracy_vs_gflops(
    series: Mapping[str, Sequence[tuple[float, float, str]]],
    path: str | os.PathLike,
    dense: tuple[float, float] | None = None,
    title: str = "accuracy vs executed FLOPs",
) -> Path:
    """Top-1 against executed GFLOPs (multiply-adds) per image: one line per method, each point labelled.

    `series` maps a method to its points (gflops, top1, label), the label being the setting drawn beside
    the point ("0.7", "r=8", "beta=10"); `dense` is the dense model's (gflops, top1), drawn as a star.
    """
    markers = "osv^DPXh*"
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    for k, (name, points) in enumerate(series.items()):
        points = sorted(points)
        if not points:
            continue
        xs, ys, labels = zip(*points)
        (line,) = ax.plot(xs, ys, marker=markers[k % len(markers)], label=name)
        for x, y, label in points:
            ax.annotate(
                str(label),
                (x, y),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=line.get_color(),
            )
    if dense is not None:
        ax.scatter([dense[0]], [dense[1]], marker="*", s=160, c="k", label="dense", zorder=5)
        ax.annotate("dense", dense, textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("executed GFLOPs per image (multiply-adds)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=120)


def _tome_groups(info, index: int, grid: tuple[int, int]) -> np.ndarray:
    """(grid_h, grid_w) id of the merged token each patch ended up in."""
    return info.extra["token_group"][index, info.num_prefix :].cpu().numpy().reshape(grid)


def _save_maps(fig, axes, columns: list[str], path, heading: str | None = None) -> Path:
    """Title the columns of a token-map grid (and the grid: what it shows, at which setting), drop its
    ticks and save it."""
    if heading:
        fig.suptitle(heading, fontsize=8)
    for ax, title in zip(axes[0], columns):
        ax.set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, path, dpi=110, bbox_inches="tight", pad_inches=0.02)


def _spatial_maps(model, images, path, mean, std, titles) -> Path:
    """A dynamic ConvNeXt / Swin: per predictor, the positions of its stage that take the full path
    (the others greyed: they take the cheap fast path)."""
    from .policies.dynspatial import dynamic_spatial_info

    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(images)
    model.train(was_training)
    info = dynamic_spatial_info(model)
    pictures = to_display(images, mean, std)
    columns = ["image"] + [f"predictor {s + 1}: full path" for s in range(len(info.kept_index))]
    fig, axes = plt.subplots(len(pictures), len(columns), figsize=(1.9 * len(columns), 1.9 * len(pictures)),
                             squeeze=False, layout="constrained")  # fmt: skip
    for i, picture in enumerate(pictures):
        axes[i, 0].imshow(picture)
        if titles:
            axes[i, 0].set_ylabel(titles[i], fontsize=7)
        for s, kept in enumerate(info.kept_index):
            axes[i, 1 + s].imshow(_kept_overlay(picture, kept[i].cpu().numpy(), tuple(info.grid)))
    return _save_maps(fig, axes, columns, path)


def save_figure(fig, path: str | os.PathLike, **kwargs) -> Path:
    """Save `fig` whole or not at all (a temporary file beside `path`, then renamed) and close it.

    A path without a suffix gets `.png` (what matplotlib writes), and the path returned is the file's."""
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    try:
        with atomic_path(path) as temporary:
            fig.savefig(temporary, format=path.suffix[1:], **kwargs)
    finally:
        plt.close(fig)
    return path
