"""FLOP budgets: the setting of a method's knob at which a model executes a target number of GMACs.

Users think in budgets ("this model at 3 GFLOPs"); each method's knob maps to FLOPs its own way
(DynamicViT's int(N * rho^(s+1)) stages, EViT's ceil counts, ToMe's r per block, A-ViT's gate). The
solvers here search the knob on the patched model itself and count executed multiply-adds with
`tokensparse.gflops` at the model's input size (GMACs, what the papers call FLOPs), so a solved
setting executes at most the target and within `TOLERANCE` (2%) of it. A target the method cannot
reach (below its fewest GMACs, at or above the dense model's, or between two neighbouring settings
more than 2% apart) is a ValueError that names the reachable range or the neighbours.

The methods take the target directly: `dynamicvit(model, target_gflops=...)`, and likewise `evit`,
`random_prune`, `static_prune`, `tome` (a per-block r schedule where one r for all blocks is not within
2%) and `avit` (with `images`: its FLOPs depend on the image, so its gate centre is calibrated to the
mean over the images given).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from .adapters import backbone_of
from .engine import get_policy
from .flops import gflops

TOLERANCE = 0.02


def check_target(target_gflops: float) -> float:
    """`target_gflops`, a budget in GMACs per image (multiply-adds, what the papers call FLOPs), as a float;
    ValueError unless it is a finite number > 0."""
    if isinstance(target_gflops, bool) or not isinstance(target_gflops, (int, float)):
        raise ValueError(f"target_gflops must be a number of GMACs per image, got {target_gflops!r}")
    if not (math.isfinite(target_gflops) and target_gflops > 0):
        raise ValueError(f"target_gflops must be a positive number of GMACs per image, got {target_gflops!r}")
    return float(target_gflops)


@contextmanager
def _counting(model: nn.Module) -> Iterator[None]:
    """Eval mode (the inference form, whose executed FLOPs count) and no autograd; the mode comes back."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _above_dense(target: float, dense: float) -> ValueError:
    return ValueError(
        f"target_gflops={target:g} is at or above the dense model's {dense:.4g} GMACs per image: there is "
        "nothing to remove"
    )


def _below_reach(target: float, lowest: float, dense: float, method: str) -> ValueError:
    return ValueError(
        f"target_gflops={target:g} is below what {method} reaches on this model: it executes between "
        f"{lowest:.4g} and {dense:.4g} GMACs per image"
    )


def _between(target: float, below: tuple[str, float], above: tuple[str, float]) -> ValueError:
    return ValueError(
        f"no setting executes target_gflops={target:g} within {TOLERANCE:.0%} below it: the nearest are "
        f"{below[0]} ({below[1]:.4g} GMACs) and {above[0]} ({above[1]:.4g} GMACs)"
    )


def solve_keep_ratio(model: nn.Module, target_gflops: float, steps: int = 30) -> float:
    """The largest keep ratio at which the stage-pruning `model` (DynamicViT, EViT, random, static: its
    policy's `keep_ratio`) executes at most `target_gflops` GMACs per image, within 2% of it.

    `steps` (default 30) is the number of bisection steps of each of the two searches (2^-30 in ratio).
    The model's own keep ratio is left as it was; set `get_policy(model).keep_ratio` to the result."""
    target = check_target(target_gflops)
    policy = get_policy(model)
    original = policy.keep_ratio
    method = getattr(policy, "method", type(policy).__name__)

    def cost(ratio: float) -> float | None:  # None: the ratio keeps no token at some stage
        policy.keep_ratio = ratio
        try:
            return gflops(model)
        except ValueError:
            return None

    try:
        with _counting(model):
            dense = cost(1.0)
            if target >= dense:
                raise _above_dense(target, dense)
            low, high = 0.0, 1.0  # the smallest ratio that keeps a token at every stage
            for _ in range(steps):
                mid = (low + high) / 2
                low, high = (low, mid) if cost(mid) is not None else (mid, high)
            lowest = cost(high)
            if target < lowest:
                raise _below_reach(target, lowest, dense, method)
            low, high = high, 1.0  # cost(low) <= target < cost(high)
            for _ in range(steps):
                mid = (low + high) / 2
                low, high = (mid, high) if cost(mid) <= target else (low, mid)
            reached = cost(low)
            if reached < (1 - TOLERANCE) * target:
                raise _between(
                    target, (f"keep_ratio={low:.6g}", reached), (f"keep_ratio={high:.6g}", cost(high))
                )
    finally:
        policy.keep_ratio = original
    return low


def solve_merge_schedule(model: nn.Module, target_gflops: float) -> int | list[int]:
    """ToMe's r for the ToMe-patched `model` executing at most `target_gflops` GMACs per image, within 2%:
    one r for every block where that is within 2%, else a per-block list (r in the first blocks, r - 1
    after; merging earlier saves more). `model.r` is left as it was."""
    target = check_target(target_gflops)
    original = model.r
    depth = len(backbone_of(model).blocks)

    def cost(r: int | list[int]) -> float:
        model.r = r
        return gflops(model)

    try:
        with _counting(model):
            dense = cost(0)
            if target >= dense:
                raise _above_dense(target, dense)
            tokens = backbone_of(model).num_patches()
            lowest = cost(tokens)  # ToMe merges at most half the tokens present in each block
            if target < lowest:
                raise _below_reach(target, lowest, dense, "tome")
            low, high = 0, tokens  # cost(low) > target >= cost(high)
            while high - low > 1:
                mid = (low + high) // 2
                low, high = (low, mid) if cost(mid) <= target else (mid, high)
            r = high
            if cost(r) >= (1 - TOLERANCE) * target:
                return r
            # r in blocks [0, k), r - 1 after: k = 0 is uniform r - 1 (above), k = depth uniform r (below)
            low, high = 0, depth
            while high - low > 1:
                mid = (low + high) // 2
                low, high = (low, mid) if cost([r] * mid + [r - 1] * (depth - mid)) <= target else (mid, high)
            schedule = [r] * high + [r - 1] * (depth - high)
            reached = cost(schedule)
            if reached < (1 - TOLERANCE) * target:
                above = [r] * low + [r - 1] * (depth - low)
                raise _between(target, (f"r={schedule}", reached), (f"r={above}", cost(above)))
            return schedule
    finally:
        model.r = original


def bisect_gate_center(
    model: nn.Module, too_deep: Callable[[nn.Module], bool], steps: int = 20
) -> tuple[float, float]:
    """Bisect the A-ViT `model`'s gate centre in [-100, 200] (a higher centre lowers every halting score,
    so tokens run deeper) for the boundary of `too_deep`: (low, high) with `too_deep` false at low and
    true at high, after `steps` (default 20) halvings. The model is left at its original centre."""
    original = model.halting.gate_center
    low, high = -100.0, 200.0
    try:
        with _counting(model):
            for _ in range(steps):
                model.halting.gate_center = (low + high) / 2
                if too_deep(model):
                    high = model.halting.gate_center
                else:
                    low = model.halting.gate_center
    finally:
        model.halting.gate_center = original
    return low, high


def solve_gate_center(model: nn.Module, target_gflops: float, images: torch.Tensor, steps: int = 30) -> float:
    """The A-ViT gate centre at which `model` executes at most `target_gflops` GMACs per image on average
    over `images` (a few of the user's own: A-ViT's FLOPs depend on the image), within 2% of it, in
    `steps` (default 30) bisection steps. `model`'s centre is left as it was."""
    target = check_target(target_gflops)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("A-ViT's FLOPs depend on the image: give `images`, a (B, C, H, W) batch of your own")
    original = model.halting.gate_center

    def cost_at(center: float) -> float:
        model.halting.gate_center = center
        return gflops(model, images)

    try:
        with _counting(model):
            # a centre of 1e4: no token halts before the last block; -1e4: every token after the first
            dense, lowest = cost_at(1e4), cost_at(-1e4)
        if target >= dense:
            raise _above_dense(target, dense)
        if target < lowest:
            raise _below_reach(target, lowest, dense, "avit")
        low, high = bisect_gate_center(model, lambda m: gflops(m, images) > target, steps)
        with _counting(model):
            reached, above = cost_at(low), cost_at(high)
    finally:
        model.halting.gate_center = original
    if reached < (1 - TOLERANCE) * target:
        raise _between(target, (f"gate_center={low:.6g}", reached), (f"gate_center={high:.6g}", above))
    return low


def solve_diffrate_counts(
    model: nn.Module, target_gflops: float, steps: int = 30
) -> tuple[list[int], list[int]]:
    """DiffRate counts (prune_kept, merge_kept) for the DiffRate-patched `model` executing at most
    `target_gflops` GMACs per image, within 2%: the authors' DeiT-S profile scaled by a strength in
    [0, 1] (`policies.diffrate.profile_counts`), bisected in `steps` (default 30) steps. The model's counts
    are left as they were."""
    from .policies.diffrate import profile_counts

    target = check_target(target_gflops)
    policy = get_policy(model)
    original = (policy.prune_kept, policy.merge_kept)

    def cost(strength: float) -> float:
        policy.prune_kept, policy.merge_kept = profile_counts(model, strength)
        return gflops(model)

    try:
        with _counting(model):
            dense = cost(0.0)
            if target >= dense:
                raise _above_dense(target, dense)
            lowest = cost(1.0)
            if target < lowest:
                raise _below_reach(target, lowest, dense, "diffrate (the authors' DeiT-S 2.3 GFLOPs profile)")
            low, high = 1.0, 0.0  # cost(low) <= target < cost(high)
            for _ in range(steps):
                mid = (low + high) / 2
                low, high = (mid, high) if cost(mid) <= target else (low, mid)
            reached = cost(low)
            if reached < (1 - TOLERANCE) * target:
                raise _between(target, (f"strength {low:.6g}", reached), (f"strength {high:.6g}", cost(high)))
            return profile_counts(model, low)
    finally:
        policy.prune_kept, policy.merge_kept = original
