"""The training loop, readable top to bottom: `build_run` sets a run up (data, student and teacher,
optimiser and schedule from timm's factories, AMP, Mixup, the run folder, resume), `train` runs its
epochs with DDP, AMP, non-finite-step skipping and an atomic checkpoint every epoch visible.

    tokensparse train --method dynamicvit --model deit_small_patch16_224 --checkpoint dense.pth ...
    torchrun --nproc_per_node=2 -m tokensparse train ...        # DDP: gloo on CPU, nccl on CUDA
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from tqdm.auto import tqdm

from ..checkpoints import read_state_dict, save_checkpoint
from ..config import TrainConfig
from ..data import CLUTTER_NAME, build_dataset, build_loader, class_names, num_classes
from ..evaluate import evaluate
from ..policies.registry import get_method
from . import run_dir
from .build import (
    apply_fixed_epochs,
    build_criterion,
    build_model,
    group_lrs,
    load_teacher,
    parameter_groups,
    setup_distributed,
    sparsify_for,
)


def _autocast(device: torch.device, enabled: bool):
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def compute_loss(cfg, model, criterion, teacher, images, targets) -> tuple[torch.Tensor, dict[str, float]]:
    """The method's objective on one batch (a function so tests can inject faults)."""
    return criterion.step(model, images, targets, teacher)


@dataclass
class Run:
    """Everything the training loop uses, built by `build_run`: the process, data, models, optimiser
    and, when resuming, where the last run stopped."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    out: Path
    train_set: Any
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    model: nn.Module
    ddp_model: nn.Module  # the model, wrapped in DDP when there are several processes
    teacher: nn.Module | None
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    mixup: Mixup | None
    writer: Any = None  # TensorBoard's SummaryWriter on rank 0, when installed
    lock: run_dir.RunLock | None = None  # rank 0's lock on the run folder
    start_epoch: int = 0
    updates: int = 0  # optimiser steps taken (non-finite steps skipped do not count)
    nan_skipped: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def solved_knob(cfg: TrainConfig, model: nn.Module) -> TrainConfig:
    """`cfg` with its FLOP budget replaced by the method's knob as `sparsify_for` solved it on `model`
    (keep ratio, ToMe's r, ...): what config.json records, the loss reads and a resume re-solves to the
    same value."""
    from ..engine import get_policy

    knob = get_method(cfg.method).budget_knob
    if knob is None:
        raise ValueError(f"--method {cfg.method} takes no --target-gflops in training")
    try:
        value = get_policy(model).solved_setting(model, knob)
    except ValueError as err:
        raise ValueError(f"--target-gflops {cfg.target_gflops:g}: {err}") from None
    return cfg.with_setting(knob, value, target_gflops=None)


def build_run(cfg: TrainConfig) -> Run:
    """Set up a run as `cfg` (resolved) says: process group, data, student and teacher, optimiser,
    schedule, AMP and Mixup; claim the output folder and resume from its last checkpoint if asked."""
    rank, world, device = setup_distributed(cfg.device)
    run_dir.seed_everything(cfg.seed)  # every rank builds the same model (and the same teacher from it)

    subset = dict(fresh_subset=True, limit_seed=cfg.seed) if cfg.fresh_subset else {}
    train_set = build_dataset(
        cfg.dataset, cfg.data_root, "train", cfg.img_size, limit=cfg.train_limit, **subset
    )
    # the clutter set's object boxes: validation then reports halting depth / kept share on the object
    boxes = {"return_box": True} if cfg.dataset == CLUTTER_NAME else {}
    val_set = build_dataset(cfg.dataset, cfg.data_root, "val", cfg.img_size, limit=cfg.val_limit, **boxes)
    classes = num_classes(train_set)
    if classes < 2:
        raise ValueError(
            f"the training data ({cfg.dataset} {cfg.data_root or ''}) has {classes} class: a classifier needs at "
            "least two (every prediction would be right)"
        )
    image = train_set[0][0]
    img_size = int(image.shape[-1])
    train_loader = build_loader(
        train_set,
        cfg.batch_size,
        True,
        cfg.workers,
        cfg.seed,
        drop_last=len(train_set) >= cfg.batch_size * world,
    )
    val_loader = build_loader(val_set, cfg.batch_size, False, cfg.workers, cfg.seed)

    model = build_model(cfg, classes, img_size)
    teacher = None
    if cfg.distill_weight:  # resolved: a number for every method but the dense one, which has no teacher
        teacher = copy.deepcopy(model)
        if cfg.teacher:
            load_teacher(teacher, cfg.teacher, cfg.model)
        teacher.requires_grad_(False).eval().to(device)
    model = sparsify_for(cfg, model).to(device)
    budget = cfg.target_gflops
    if (
        budget is not None and get_method(cfg.method).budget_knob is not None
    ):  # the run trains, and records, the knob the budget solved on this model
        cfg = solved_knob(cfg, model)
        if rank == 0:
            knob = get_method(cfg.method).budget_knob
            print(
                f"--target-gflops {budget:g}: {knob} {cfg.get(knob):.6g}, solved on the model's inference form",
                file=sys.stderr,
            )
    criterion = build_criterion(cfg, len(getattr(model, "blocks", ())))

    optimizer = create_optimizer_v2(
        parameter_groups(model, cfg), opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        step_on_epochs=False,
        updates_per_epoch=len(train_loader),
    )
    scaler = torch.amp.GradScaler("cuda") if cfg.amp and device.type == "cuda" else None
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing, num_classes=classes
        )
    run = Run(
        cfg=cfg,
        rank=rank,
        world=world,
        device=device,
        out=Path(cfg.output),
        train_set=train_set,
        train_loader=train_loader,
        val_loader=val_loader,
        model=model,
        ddp_model=model,
        teacher=teacher,
        criterion=criterion,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        mixup=mixup,
    )

    run_facts = {"num_classes": classes, "img_size": img_size, "world_size": world}
    if budget is not None:
        run_facts["solved_for_gflops"] = budget
    if run.is_main:
        run.lock = run_dir.RunLock(run.out)
    try:
        _claim_and_resume(run, run_facts)
    except BaseException:
        if run.lock is not None:
            run.lock.release()
        raise
    return run


def _claim_and_resume(run: Run, run_facts: dict[str, Any]) -> None:
    """Claim the run folder (or check it for a resume), resume from its last checkpoint, write its files."""
    cfg, world, device, model = run.cfg, run.world, run.device, run.model
    saved_cfg = run_dir.claim_output(cfg, run.out, run_facts, run.is_main)
    if world > 1:  # no rank may look at the folder after rank 0 starts writing to it
        dist.barrier()
    loaded = run_dir.load_training_state(run.out) if saved_cfg is not None else None
    if loaded is not None:
        _resume(run, saved_cfg, *loaded)
    else:
        run_dir.seed_everything(
            cfg.seed + run.rank
        )  # each rank its own noise (drop path, Gumbel, augmentation)
    if run.is_main:
        _write_run_files(run, run_facts, resumed=loaded is not None)
        run.writer = _tensorboard(run.out)
    if world > 1:
        run.ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )


def _resume(
    run: Run, saved_cfg: dict[str, Any], weights: dict[str, torch.Tensor], state: dict[str, Any]
) -> None:
    """Continue `run` from its last checkpoint: weights, optimiser, schedule, scaler, teacher, random state."""
    cfg, out = run.cfg, run.out
    try:
        run.model.load_state_dict(weights)
        run.optimizer.load_state_dict(state["optimizer"])
        if saved_cfg.get("epochs") == cfg.epochs:
            run.scheduler.load_state_dict(state["scheduler"])
        if run.scaler is not None and state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])
        if run.teacher is not None:
            run.teacher.load_state_dict(read_state_dict(out / "teacher.safetensors"))
    except (RuntimeError, KeyError, ValueError) as err:
        raise ValueError(f"cannot resume from {out}/checkpoints: {str(err).splitlines()[0]}") from err
    per_rank = state.get("rng_per_rank", [state["rng"]])
    run_dir.set_rng_state(per_rank[run.rank] if run.rank < len(per_rank) else state["rng"], run.train_loader)
    run.start_epoch, run.nan_skipped = state["epoch"] + 1, state.get("nan_skipped", 0)
    # the update count, not epochs x batches: skipped non-finite steps do not advance the schedule
    run.updates = state.get("updates", run.start_epoch * len(run.train_loader))
    if saved_cfg.get("epochs") != cfg.epochs:  # the schedule of the new length, from this update on
        run.scheduler.step_update(num_updates=run.updates)
    run.history = state.get("history") or run_dir.read_metrics(out / "metrics.jsonl", run.start_epoch)
    if run.is_main:
        run_dir.write_metrics(out / "metrics.jsonl", run.history)  # lines a kill lost come back
        print(f"resumed from {out}/checkpoints after epoch {run.start_epoch}")


def _write_run_files(run: Run, run_facts: dict[str, Any], resumed: bool) -> None:
    """Rank 0: config.json, classes.json and the teacher's weights; stale checkpoint files removed."""
    out = run.out
    out.mkdir(parents=True, exist_ok=True)
    run_dir.clean_checkpoints(
        out / "checkpoints", run.start_epoch - 1 if resumed else None, run.cfg.keep_checkpoints
    )
    run_dir.atomic_write_text(
        json.dumps(dataclasses.asdict(run.cfg) | run_facts, indent=2), out / "config.json"
    )
    names = class_names(run.train_set)
    if names is not None:  # for `tokensparse predict`
        run_dir.atomic_write_text(json.dumps(names), out / "classes.json")
    if run.teacher is not None and not (out / "teacher.safetensors").exists():
        save_checkpoint(run.teacher, out / "teacher.safetensors")


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train as `cfg` says; return the last epoch's metrics (rank 0 also writes them to metrics.jsonl).

    Settings left None take the method's registered recipe; config.json records them.
    """
    given, cfg = cfg, cfg.resolved()
    run = build_run(cfg)
    if run.is_main:
        for note in given.schedule_notes(cfg):
            print(note, file=sys.stderr)
        print(_plan(run), file=sys.stderr, flush=True)
    try:
        return _train(run)
    finally:
        if run.lock is not None:
            run.lock.release()


def _train(run: Run) -> dict[str, Any]:
    """The epochs of a built run."""
    cfg = run.cfg
    model, optimizer, device = run.model, run.optimizer, run.device
    metrics: dict[str, Any] = {}
    streak = 0  # consecutive non-finite losses
    for epoch in range(run.start_epoch, cfg.epochs):
        _start_epoch(run, epoch)
        apply_fixed_epochs(optimizer, epoch)
        skipped_before = run.nan_skipped
        running, seen, tic = 0.0, 0, time.perf_counter()
        bar = tqdm(
            run.train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not run.is_main, leave=False
        )
        for images, targets, *_ in bar:
            images, targets = images.to(device), targets.to(device)
            if run.mixup is not None:
                images, targets = run.mixup(images, targets)
            with _autocast(device, cfg.amp):
                loss, _ = compute_loss(cfg, run.ddp_model, run.criterion, run.teacher, images, targets)
            if not _finite_on_every_rank(loss, run):  # skip the step on every rank, or DDP would hang
                run.nan_skipped, streak = run.nan_skipped + 1, streak + 1
                optimizer.zero_grad(set_to_none=True)
                if streak >= cfg.max_nan_streak:
                    raise FloatingPointError(
                        f"{streak} consecutive non-finite losses at epoch {epoch}, step {run.updates}: aborting; "
                        "lower the learning rate or enable gradient clipping (--clip-grad)"
                    )
                continue
            streak = 0
            _optimizer_step(run, loss)
            run.updates += 1
            run.scheduler.step_update(num_updates=run.updates)
            apply_fixed_epochs(optimizer, epoch)
            running += loss.item() * images.shape[0]
            seen += images.shape[0]
            img_s = seen * run.world / (time.perf_counter() - tic)
            bar.set_postfix(loss=f"{loss.item():.3f}", **_sparsity_postfix(model), img_s=f"{img_s:.0f}")
        bar.close()
        lrs = group_lrs(optimizer)
        run.scheduler.step(epoch + 1)
        val = evaluate(model, run.val_loader, device=device, progress=False, amp=cfg.amp)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": _mean_across_ranks(running, seen, device),
            "lr": max(lrs.values()),
            "lr_groups": lrs,
            "nan_skipped": run.nan_skipped,
            "nan_skipped_epoch": run.nan_skipped - skipped_before,
            "epoch_seconds": round(time.perf_counter() - tic, 2),
            **{f"val_{k}": v for k, v in val.items()},
        }
        _end_epoch(run, epoch, metrics)
    if run.is_main:
        save_checkpoint(model, run.out / "model.safetensors", {"method": cfg.method, "model": cfg.model})
    if run.writer is not None:
        run.writer.close()
    return metrics


def _plan(run: Run) -> str:
    """One line saying what the run will do."""
    cfg = run.cfg
    frozen = f", backbone frozen {cfg.backbone_fixed_epochs}" if cfg.backbone_fixed_epochs else ""
    start = f" from epoch {run.start_epoch + 1}" if run.start_epoch else ""
    return (
        f"{cfg.method} on {cfg.model}: {cfg.epochs} epochs of {len(run.train_set)} items{start} (warm-up "
        f"{cfg.warmup_epochs}{frozen}), batch {cfg.batch_size} x {run.world} process(es), lr {cfg.lr:g}, "
        f"into {run.out}"
    )


def _start_epoch(run: Run, epoch: int) -> None:
    """The epoch's shuffle (and, for the clutter set, fresh canvases); the model in train mode."""
    run.train_loader.sampler.set_epoch(epoch)
    if hasattr(run.train_set, "set_epoch"):
        run.train_set.set_epoch(epoch)
    run.ddp_model.train()


def _finite_on_every_rank(loss: torch.Tensor, run: Run) -> bool:
    finite = torch.isfinite(loss.detach())
    if run.world > 1:
        flag = finite.float().to(run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = flag.bool()
    return bool(finite)


def _optimizer_step(run: Run, loss: torch.Tensor) -> None:
    """Backward (scaled under fp16 AMP), gradient clipping, optimiser step."""
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
    else:
        loss.backward()
    if run.cfg.clip_grad:
        nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.clip_grad)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()


def _end_epoch(run: Run, epoch: int, metrics: dict[str, Any]) -> None:
    """Record the epoch: metrics history, checkpoint and training state (rank 0), logs; ranks meet after."""
    run.history.append(metrics)
    rng_states = run_dir.all_rng_states(run.world, run.train_loader)  # a collective: every rank takes part
    if run.is_main:
        run_dir.save_training_state(
            run.out,
            epoch,
            run.model,
            run.optimizer,
            run.scheduler,
            run.scaler,
            {
                "nan_skipped": run.nan_skipped,
                "updates": run.updates,
                "history": run.history,
                "rng_per_rank": rng_states,
            },
            run.cfg.keep_checkpoints,
        )
        run_dir.write_metrics(run.out / "metrics.jsonl", run.history)
        if run.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    run.writer.add_scalar(key, value, epoch + 1)
        print(_epoch_line(metrics), flush=True)
    if run.world > 1:
        dist.barrier()


def _sparsity_postfix(model: nn.Module) -> dict[str, str]:
    from ..engine import get_policy, sparsity_info

    policy = get_policy(model)
    return {} if policy is None else policy.progress(sparsity_info(model))


def _mean_across_ranks(total: float, count: int, device: torch.device) -> float:
    if dist.is_initialized():
        t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = t.tolist()
    return total / count if count else math.nan


def _epoch_line(m: dict[str, Any]) -> str:
    parts = [
        f"epoch {m['epoch']}",
        f"loss {m['train_loss']:.4f}",
        f"val top1 {m.get('val_top1', math.nan):.2f}",
    ]
    if "val_gflops" in m:
        parts.append(f"GFLOPs {m['val_gflops']:.3f}")
    if m.get("nan_skipped_epoch"):
        parts.append(f"skipped {m['nan_skipped_epoch']} non-finite steps")
    return "  ".join(parts)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))
