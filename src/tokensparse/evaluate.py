"""Evaluation: accuracy, executed GFLOPs per image, throughput and how much of the image was used."""

from __future__ import annotations

import time
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
) -> dict[str, Any]:
    """Top-1/top-5 (%), mean executed GFLOPs per image, img/s, and keep ratio per stage or mean depth.

    Runs the model in eval mode (the inference form: tokens removed); under torch.distributed the
    counts are summed over ranks, each rank reading its own shard.
    """
    device = torch.device(device)
    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    policy = get_policy(model)
    totals = torch.zeros(4, dtype=torch.float64)  # items, top1, top5, flops
    stage_kept: torch.Tensor | None = None
    depth_sum = 0.0
    seconds = 0.0
    for batch in tqdm(loader, desc="eval", disable=not progress, leave=False):
        images, labels = batch[0].to(device), batch[1].to(device)
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
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct = top5 == labels.unsqueeze(1)
        flops = flops_from_info(model) if policy is not None else model_flops(model, images)
        totals += torch.tensor(
            [len(labels), correct[:, 0].sum().item(), correct.any(1).sum().item(), flops.sum().item()],
            dtype=torch.float64,
        )
        if policy is not None:
            info = sparsity_info(model)
            if info.keep_decisions:
                kept = torch.stack([d.float().mean(1) for d in info.keep_decisions], 1).sum(0).double().cpu()
                stage_kept = kept if stage_kept is None else stage_kept + kept
            if "mean_depth" in info.extra:
                depth_sum += float(info.extra["mean_depth"].double().sum())
    extra = torch.tensor([depth_sum, seconds], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        for t in [totals, extra] + ([stage_kept] if stage_kept is not None else []):
            moved = t.to(backend_device)
            dist.all_reduce(moved)
            t.copy_(moved.cpu())
        extra[1] /= dist.get_world_size()
    items = max(totals[0].item(), 1.0)
    result: dict[str, Any] = {
        "top1": 100.0 * totals[1].item() / items,
        "top5": 100.0 * totals[2].item() / items,
        "gflops": totals[3].item() / items / 1e9,
        "img_s": totals[0].item() / extra[1].item() if extra[1] > 0 else float("nan"),
        "images": int(totals[0].item()),
    }
    if stage_kept is not None:
        result["keep_ratio_per_stage"] = [round(v / items, 4) for v in stage_kept.tolist()]
    if policy is not None and getattr(policy, "method", "") == "avit":
        result["mean_depth"] = extra[0].item() / items
    model.train(was_training)
    return result
