"""Evaluation: accuracy, executed GFLOPs per image, throughput and how much of the image was used."""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from .engine import get_policy, sparsity_info
from .flops import flops_from_info, model_flops


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device | str = "cpu",
    progress: bool = True,
    amp: bool = False,
    per_item: bool = False,
) -> dict[str, Any]:
    """Top-1/top-5 (%), mean executed GMACs per image (multiply-adds, what the papers call FLOPs; the
    result's `gflops`), img/s, and keep ratio per stage or mean depth, of `model` on `loader`'s batches.

    Runs the model in eval mode (the inference form: tokens removed) on `device` (default "cpu"), with a
    tqdm bar unless `progress` is False, and with `amp` (default False) under autocast (bfloat16 on the
    CPU, float16 on a GPU). Under torch.distributed the counts are summed over ranks, each rank reading
    its own shard. When the loader also yields object
    boxes (fashion-mnist-clutter with return_box=True), `object_kept` is the share of the patches
    overlapping the object that survive to the last block (pruning methods) and `object_depth` /
    `background_depth` the mean halting depth on and off the object (A-ViT). With `per_item`,
    `correct` is a string of '1'/'0' (top-1 right or not) per item in the loader's order, for paired
    comparisons of two models on the same items (`paired_difference`); one process only.
    """
    if per_item and dist.is_available() and dist.is_initialized():
        raise ValueError("evaluate(per_item=True) needs a single process: each rank sees only its shard")
    device = torch.device(device)
    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    policy = get_policy(model)
    totals = torch.zeros(5, dtype=torch.float64)  # items, top1, top5, flops, non-finite outputs
    stage_kept: torch.Tensor | None = None
    depth_sum, halting = 0.0, False
    seconds = 0.0
    right: list[torch.Tensor] = []
    cover = torch.zeros(
        5, dtype=torch.float64
    )  # object patches, kept of them, object depth, bg patches, bg depth
    # each image's data set index, for policies whose decisions are random per image (TokenPolicy.image_indices)
    order = getattr(loader.sampler, "indices", None)
    seen = 0
    for batch in tqdm(loader, desc="eval", disable=not progress, leave=False):
        images, labels = batch[0].to(device), batch[1].to(device)
        if policy is not None:
            span = range(seen, seen + len(labels))
            policy.image_indices = torch.tensor([order[i] for i in span] if order is not None else list(span))
        seen += len(labels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=amp):
            logits = model(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - tic
        logits = logits.float()
        finite = torch.isfinite(logits).all(1)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct = (top5 == labels.unsqueeze(1)) & finite.unsqueeze(1)  # a NaN output is never right
        if per_item:
            right.append(correct[:, 0].cpu())
        flops = flops_from_info(model) if policy is not None else model_flops(model, images)
        totals += torch.tensor(
            [
                len(labels),
                correct[:, 0].sum().item(),
                correct.any(1).sum().item(),
                flops.sum().item(),
                (~finite).sum().item(),
            ],
            dtype=torch.float64,
        )
        if policy is not None:
            info = sparsity_info(model)
            if info.keep_decisions:
                kept = torch.stack([d.float().mean(1) for d in info.keep_decisions], 1).sum(0).double().cpu()
                stage_kept = kept if stage_kept is None else stage_kept + kept
            depth = policy.token_depth(info)
            if depth is not None:  # a halting method (A-ViT): report token depths
                halting = True
                depth_sum += float(depth.double().mean(dim=1).sum())
            if len(batch) > 2 and hasattr(model, "patch_embed"):  # token models; not ConvNeXt / Swin
                cover += _object_cover(model, info, depth, batch[2])
    extra = torch.cat([torch.tensor([depth_sum, seconds], dtype=torch.float64), cover])
    if dist.is_available() and dist.is_initialized():
        # Every rank joins every collective, also a rank whose shard is empty (it has no stage counts
        # yet): first agree on the number of stages, then sum.
        backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        stages = torch.tensor([0 if stage_kept is None else len(stage_kept)], device=backend_device)
        dist.all_reduce(stages, op=dist.ReduceOp.MAX)
        if stages.item() > 0 and stage_kept is None:
            stage_kept = torch.zeros(int(stages.item()), dtype=torch.float64)
        for t in [totals, extra] + ([stage_kept] if stage_kept is not None else []):
            moved = t.to(backend_device)
            dist.all_reduce(moved)
            t.copy_(moved.cpu())
        extra[1] /= dist.get_world_size()
    if totals[0] == 0:
        raise ValueError("evaluation saw no images: the validation set (or --val-limit) is empty")
    items = totals[0].item()
    result: dict[str, Any] = {
        "top1": 100.0 * totals[1].item() / items,
        "top5": 100.0 * totals[2].item() / items,
        "gflops": totals[3].item() / items / 1e9,
        "img_s": totals[0].item() / extra[1].item() if extra[1] > 0 else float("nan"),
        "images": int(totals[0].item()),
    }
    if per_item:
        result["correct"] = "".join("1" if r else "0" for r in torch.cat(right).tolist())
    if totals[4] > 0:
        result["nonfinite_outputs"] = int(totals[4].item())
        warnings.warn(
            f"{result['nonfinite_outputs']} of {result['images']} images got non-finite logits (NaN/inf "
            "weights?); they count as wrong",
            stacklevel=2,
        )
    if stage_kept is not None:
        result["keep_ratio_per_stage"] = [round(v / items, 4) for v in stage_kept.tolist()]
    if halting:
        result["mean_depth"] = extra[0].item() / items
        if extra[2] > 0:
            result["object_depth"] = extra[4].item() / extra[2].item()
            result["background_depth"] = extra[6].item() / max(extra[5].item(), 1.0)
    elif extra[2] > 0:
        result["object_kept"] = extra[3].item() / extra[2].item()
    if policy is not None:
        policy.image_indices = None
    model.train(was_training)
    return result


def paired_difference(correct: str | list[str], reference: str, z: float = 1.96) -> tuple[float, float]:
    """Top-1 difference (pt) of a model against a reference on the same items, and the half-width of
    its confidence interval (normal approximation over the paired per-item differences; `z` = 1.96, the
    default, gives 95%).

    `correct` and `reference` are `evaluate(per_item=True)["correct"]` strings over the same items in
    the same order; `correct` may be a list of them (one model trained with several seeds), whose
    per-item answers are averaged first. Pairing removes the items both get right or both get wrong
    from the spread, so the interval is much narrower than that of two independent accuracies.
    """
    runs = [correct] if isinstance(correct, str) else list(correct)
    if not runs or any(len(c) != len(reference) for c in runs) or not reference:
        raise ValueError(
            "paired_difference needs evaluations of the same items, got "
            f"{[len(c) for c in runs]} and {len(reference)}"
        )
    mean = torch.tensor([[int(a) for a in c] for c in runs], dtype=torch.float64).mean(0)
    d = mean - torch.tensor([int(b) for b in reference], dtype=torch.float64)
    spread = d.std().item() if len(d) > 1 else 0.0
    return 100.0 * d.mean().item(), 100.0 * z * spread / len(d) ** 0.5


def _object_cover(
    model: nn.Module, info, token_depth: torch.Tensor | None, boxes: torch.Tensor
) -> torch.Tensor:
    """[object patches, of them kept, depth sum on them, background patches, depth sum on them]."""
    from .data import box_patch_mask

    patch = model.patch_embed.patch_size[0]
    size = tuple(model.patch_embed.img_size)
    on_object = box_patch_mask(boxes.cpu(), size, patch).flatten(1).to(torch.float64)
    out = torch.zeros(5, dtype=torch.float64)
    out[0] = on_object.sum()
    out[3] = (1 - on_object).sum()
    if token_depth is not None:
        depth = token_depth[:, info.num_prefix :].cpu().to(torch.float64)
        out[2] = (depth * on_object).sum()
        out[4] = (depth * (1 - on_object)).sum()
    else:
        kept = info.keep_mask.cpu().to(torch.float64)
        if kept.shape == on_object.shape:
            out[1] = (kept * on_object).sum()
    return out
