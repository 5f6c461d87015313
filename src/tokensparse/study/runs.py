"""The study's training phase: every fine-tune from the shipped teacher, kept in the work folder and
reused (same settings) or resumed (killed) by a re-run; A-ViT's starting gate centre and the choice of
its loss weights on validation."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..budget import bisect_gate_center
from ..data import build_dataset
from ..flops import gflops
from ..models import pretrained, pretrained_entry
from ..training import TrainConfig, config_differences, load_trained, train
from .config import DemoConfig


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Progress:
    """The study's overall progress: steps done of all, elapsed time and a rough ETA."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def step(self, what: str) -> None:
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        eta_text = f", about {eta / 60:.0f} min left" if math.isfinite(eta) and self.done > 1 else ""
        self.done += 1
        log(f"[{self.done}/{self.total}] {what} ({elapsed / 60:.1f} min so far{eta_text})")


def model_settings(cfg: DemoConfig) -> dict:
    """The TrainConfig fields that name the shipped teacher as the starting model."""
    entry = pretrained_entry(cfg.teacher)
    return dict(
        model=entry.model,
        model_kwargs=dict(entry.model_kwargs),
        dataset=entry.dataset,
        checkpoint=str(entry.path),
    )


@dataclass
class StudyRuns:
    """What the training phase leaves: the finished run folders by name, A-ViT's start and its grid."""

    runs: dict[str, Path]
    start_center: float
    start_depth: float
    prior_depth: int
    grid: dict[str, dict]  # grid run name -> its (ponder, prior, distill) setting and last validation epoch
    chosen: str | None  # the grid run whose setting trained at the full budget
    dense_val_gflops: float
    # fine-tuned baselines: run name -> (method, setting as a reader reads it)
    baselines: dict[str, tuple[str, str]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # runs not finished (cfg.train False)
    reused: list[str] = field(default_factory=list)  # runs found finished with the same settings


def seed_name(name: str, seed: int) -> str:
    """The run folder of `name` trained with `seed` (seed 0 keeps the plain name)."""
    return name if seed == 0 else f"{name}-seed{seed}"


def selected(name: str, only: tuple[str, ...] | None) -> bool:
    """Whether `--runs ONLY` trains the run `name`: its folder name, or the part before '@' (`tome-ft`
    names the ToMe fine-tune whose r is matched to DynamicViT's FLOPs at run time). None: every run."""
    return only is None or name in only or name.split("@")[0] in only


def grid_name(ponder: float, prior: float, distill: float) -> str:
    return f"avit-grid-p{ponder:g}-d{prior:g}-kd{distill:g}"


class _Trainer:
    """Fine-tunes one run from the shipped teacher unless its folder already holds it."""

    def __init__(self, cfg: DemoConfig, progress: Progress) -> None:
        self.cfg, self.progress = cfg, progress
        self.runs: dict[str, Path] = {}
        self.baselines: dict[str, tuple[str, str]] = {}
        self.missing: list[str] = []
        self.reused: list[str] = []

    def __call__(self, name: str, seed: int | None = None, **kw) -> Path | None:
        cfg = self.cfg
        out = Path(cfg.work) / name
        settings = dict(
            **model_settings(cfg),
            batch_size=cfg.batch_size,
            train_limit=cfg.finetune_limit,
            fresh_subset=True,
            val_limit=cfg.val_limit,
            device=cfg.device,
            workers=cfg.workers,
            seed=cfg.seed if seed is None else seed,
            output=str(out),
            resume=True,
        )
        run_cfg = TrainConfig(**(settings | kw))
        if (out / "model.safetensors").is_file():
            differences = _differences(run_cfg, out)
            if differences:
                raise ValueError(
                    f"{out} holds a finished run with other settings ({'; '.join(differences)}); "
                    "delete it or choose another work folder"
                )
            log(f"{name}: reusing {out} (same settings)")
            self.reused.append(name)
        elif not cfg.train or not selected(name, cfg.only):
            self.missing.append(name)
            return None
        else:
            self.progress.step(f"fine-tuning {name}")
            train(run_cfg)
        self.runs[name] = out
        return out


def _differences(cfg: TrainConfig, out: Path) -> list[str]:
    """The settings in which the finished run in `out` differs from `cfg` (where it lives aside).

    Unlike a resume, a reuse also needs the same number of epochs; an image size left unset matches
    the one train() derived and recorded."""
    saved = json.loads((out / "config.json").read_text())
    cfg = cfg.resolved()
    derived = {"img_size": saved.get("img_size")} if cfg.img_size is None else {}
    return config_differences(
        cfg, saved, derived, ("output", "resume", "overwrite", "device", "keep_checkpoints", "workers")
    )


def train_study(cfg: DemoConfig) -> StudyRuns:
    """Every fine-tune of the study, in the order that answers most first: A-ViT's loss-weight grid,
    then the headline rows (dense-ft, DynamicViT at `keep_ratio`, A-ViT's chosen setting) seed by
    seed, then DynamicViT's other ratios and the fine-tuned baselines. With `cfg.train` False nothing
    trains: the finished runs are used and the others listed in `missing`."""
    torch.manual_seed(cfg.seed)
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    claim_work(work, cfg.teacher)
    progress = Progress(_training_steps(cfg))
    val = build_dataset("fashion-mnist-clutter", split="val", limit=cfg.calibration_images)
    val_images = torch.stack([val[i][0] for i in range(len(val))])
    teacher = pretrained(cfg.teacher)
    prior_depth = cfg.avit_prior_depth or max(1, round(len(teacher.blocks) * 8 / 12))
    start_depth = cfg.avit_start_depth or prior_depth
    start = calibrate_gate_center(teacher, val_images, cfg.gate_scale, start_depth)
    log(f"A-ViT starts from gate centre {start:g} (the untrained model's mean depth {start_depth:g})")
    fine_tune = _Trainer(cfg, progress)

    def avit(name: str, setting: tuple[float, float, float], seed: int, **schedule) -> Path | None:
        ponder, prior, distill = setting
        return fine_tune(
            name,
            seed,
            method="avit",
            gate_scale=cfg.gate_scale,
            gate_center=start,
            prior_depth=prior_depth,
            ponder_weight=ponder,
            prior_weight=prior,
            distill_weight=distill,
            lr=cfg.avit_lr,
            smoothing=cfg.avit_smoothing,
            drop_path=cfg.avit_drop_path,
            **schedule,
        )

    def dynamicvit(ratio: float, seed: int) -> None:
        epochs = cfg.dynamicvit_epochs_for(ratio)
        fine_tune(
            seed_name(f"dynamicvit@{ratio}", seed),
            seed,
            method="dynamicvit",
            keep_ratio=ratio,
            epochs=epochs,
            warmup_epochs=cfg.dynamicvit_warmup_epochs,
            lr=cfg.dynamicvit_lr,
            backbone_lr_scale=cfg.dynamicvit_backbone_lr_scale,
            backbone_fixed_epochs=min(cfg.backbone_fixed_epochs, epochs),
        )

    grid_schedule = dict(
        epochs=cfg.avit_grid_epochs,
        warmup_epochs=cfg.avit_grid_warmup_epochs,
        train_limit=cfg.avit_grid_limit,
    )
    full_schedule = dict(epochs=cfg.avit_epochs, warmup_epochs=cfg.avit_warmup_epochs)
    if cfg.avit_val_limit is not None:
        full_schedule["val_limit"] = cfg.avit_val_limit
    grid = {}
    for setting in cfg.avit_grid:
        if avit(grid_name(*setting), setting, cfg.seed, **grid_schedule) is not None:
            grid[grid_name(*setting)] = last_epoch(fine_tune.runs[grid_name(*setting)]) | {"setting": setting}
    dense_gflops = gflops(teacher, val_images)
    chosen = choose_avit(cfg, grid, dense_gflops) if grid else None
    for seed in cfg.seeds:
        if cfg.dense_finetune:
            fine_tune(
                seed_name("dense-ft", seed),
                seed,
                method="dense",
                epochs=cfg.dynamicvit_epochs,
                warmup_epochs=cfg.dynamicvit_warmup_epochs,
                lr=cfg.dynamicvit_lr * cfg.dynamicvit_backbone_lr_scale,
            )
        dynamicvit(cfg.keep_ratio, seed)
        if chosen is None:
            fine_tune.missing.append(seed_name("avit", seed))
        elif seed == cfg.seed and grid_schedule == full_schedule | {"train_limit": cfg.finetune_limit}:
            fine_tune.runs[seed_name("avit", seed)] = fine_tune.runs[chosen]  # the demo: the grid run is it
        else:
            avit(seed_name("avit", seed), grid[chosen]["setting"], seed, **full_schedule)
    for ratio in cfg.dynamicvit_ratios:
        if ratio != cfg.keep_ratio:
            dynamicvit(ratio, cfg.seed)
    if cfg.baseline_epochs:
        _baseline_finetunes(cfg, fine_tune, teacher)
    if cfg.diffrate:
        _diffrate_search(cfg, fine_tune)
    return StudyRuns(
        fine_tune.runs,
        start,
        float(start_depth),
        prior_depth,
        grid,
        chosen,
        dense_gflops,
        fine_tune.baselines,
        fine_tune.missing,
        fine_tune.reused,
    )


def _baseline_finetunes(cfg: DemoConfig, fine_tune: _Trainer, teacher: nn.Module) -> None:
    """Random, static, EViT at `keep_ratio` and ToMe at the r matching DynamicViT's FLOPs, fine-tuned."""
    from ..policies.tome import tome

    for method in ("random", "static", "evit", "tome"):
        setting: dict = {"keep_ratio": cfg.keep_ratio}
        label, shown = f"{cfg.keep_ratio}", f"keep ratio {cfg.keep_ratio}"
        if method == "tome":
            dvit = fine_tune.runs.get(f"dynamicvit@{cfg.keep_ratio}")
            if dvit is None:
                fine_tune.missing.append("tome-ft")
                continue
            target = gflops(load_trained(dvit)[0].eval(), batch=2)
            patches = teacher.patch_embed.num_patches
            r = int(match(lambda r: tome(copy.deepcopy(teacher), r=int(r)), range(1, patches // 2), target))
            setting, label, shown = {"tome_r": r}, f"r{r}", f"r={r}"
        if fine_tune(
            f"{method}-ft@{label}",
            method=method,
            epochs=cfg.baseline_epochs,
            warmup_epochs=0,
            lr=cfg.baseline_lr,
            **setting,
        ):
            fine_tune.baselines[f"{method}-ft@{label}"] = (method, shown)


def headline_gflops(cfg: DemoConfig, runs: dict[str, Path]) -> float | None:
    """Executed GMACs per image of DynamicViT at `keep_ratio` (the budget the FLOP-matched rows meet)."""
    dvit = runs.get(f"dynamicvit@{cfg.keep_ratio}")
    return None if dvit is None else round(gflops(load_trained(dvit)[0].eval(), batch=2), 6)


def _diffrate_search(cfg: DemoConfig, fine_tune: _Trainer) -> None:
    """DiffRate's search on the shipped teacher (frozen) for DynamicViT's executed GMACs: the authors'
    recipe (`Method` diffrate), `diffrate_epochs` epochs of `finetune_limit` fresh canvases."""
    from ..policies.diffrate_search import deit_s_flop_weight

    target = headline_gflops(cfg, fine_tune.runs)
    if target is None:
        fine_tune.missing.append("diffrate")
        return
    weight = (
        {"flop_weight": deit_s_flop_weight(pretrained(cfg.teacher))} if cfg.diffrate_deit_s_scaled else {}
    )
    fine_tune(
        "diffrate",
        method="diffrate",
        target_gflops=target,
        epochs=cfg.diffrate_epochs,
        method_settings=weight,
    )


def _training_steps(cfg: DemoConfig) -> int:
    """How many fine-tunes `train_study` runs at most, for the progress line."""
    per_seed = 2 + cfg.dense_finetune
    return (
        len(cfg.avit_grid)
        + per_seed * len(cfg.seeds)
        + len(cfg.dynamicvit_ratios)
        - 1
        + 4 * bool(cfg.baseline_epochs)
        + bool(cfg.diffrate)
    )


def last_epoch(run: Path) -> dict:
    """The last line of a run's metrics.jsonl (validation at its trained settings)."""
    lines = [line for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])


def choose_avit(cfg: DemoConfig, grid: dict[str, dict], dense_gflops: float) -> str:
    """The grid run with the highest validation top-1 among those whose trained gates execute
    `avit_target_cut` fewer FLOPs than dense; with none in that window, the one closest to its middle.
    Each grid entry gets its `fewer_flops` share."""
    low, high = cfg.avit_target_cut
    for m in grid.values():
        m["fewer_flops"] = 1 - m["val_gflops"] / dense_gflops
    inside = [name for name, m in grid.items() if low <= m["fewer_flops"] <= high]
    if inside:
        chosen = max(inside, key=lambda n: grid[n]["val_top1"])
    else:
        chosen = min(grid, key=lambda n: abs(grid[n]["fewer_flops"] - (low + high) / 2))
    for name, m in grid.items():
        m["chosen"] = name == chosen
        m["in_window"] = name in inside
    log(f"A-ViT grid: {chosen} chosen ({'among' if inside else 'none inside'} {low:.0%}-{high:.0%} fewer "
        f"FLOPs; validation top-1 {grid[chosen]['val_top1']:.2f} at {grid[chosen]['fewer_flops']:.1%} fewer)")  # fmt: skip
    return chosen


def calibrate_gate_center(
    dense: nn.Module, images: torch.Tensor, gate_scale: float, target_depth: float, steps: int = 20
) -> float:
    """The A-ViT gate centre at which the (untrained) model's mean token depth is `target_depth`.

    Bisection on validation images: a lower centre makes every halting score larger, so tokens halt
    earlier. A-ViT's fine-tuning starts from this point and its prior pulls the depths towards
    `target_depth` (the paper's depth 8 of 12 for DeiT, with its gate centres set by hand).
    """
    from ..policies.avit import avit, avit_stats

    model = avit(copy.deepcopy(dense), gate_scale=gate_scale, gate_center=0.0, early_exit=False).eval()

    def too_deep(m: nn.Module) -> bool:
        m(images)
        return float(avit_stats(m).mean_depth.mean()) > target_depth

    return _bisect_gate_center(model, too_deep, steps)


def _bisect_gate_center(model: nn.Module, too_deep: Callable[[nn.Module], bool], steps: int) -> float:
    """The middle of `budget.bisect_gate_center`'s bracket, to 2 decimals (the model keeps its centre)."""
    low, high = bisect_gate_center(model, too_deep, steps)
    return round((low + high) / 2, 2)


def gate_center_for_cut(
    model: nn.Module, images: torch.Tensor, cut: float, dense_gflops: float, steps: int = 16
) -> float:
    """The gate centre at which the A-ViT `model` executes `cut` fewer FLOPs than dense on `images`
    (bisection; the model is left at its original centre)."""
    if not 0.0 < cut < 1.0:
        raise ValueError(f"cut must be in (0, 1), got {cut!r}")
    return _bisect_gate_center(model, lambda m: gflops(m, images) > (1.0 - cut) * dense_gflops, steps)


def match(build: Callable[[float], nn.Module], candidates, target: float) -> float:
    """The candidate setting whose model's executed GFLOPs come closest to `target`."""
    return min(candidates, key=lambda s: abs(gflops(build(s).eval(), batch=2) - target))


def claim_work(work: Path, teacher: str) -> None:
    """Tie the work folder to the shipped teacher's weights (by content): its runs were fine-tuned from
    them, and a run's config.json names only the teacher's path, which a newly shipped teacher keeps."""
    sha = sha256(pretrained_entry(teacher).path)
    record = work / "teacher.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("sha256") != sha:
            raise ValueError(
                f"{work} holds runs fine-tuned from another {saved.get('name', teacher)!r} (weights sha256 "
                f"{saved.get('sha256', '?')[:12]}, now {sha[:12]}); move it aside or choose another work folder"
            )
        return
    record.write_text(json.dumps({"name": teacher, "sha256": sha}) + "\n")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def curves(runs: dict[str, Path]) -> dict[str, list[dict]]:
    """Each fine-tune's validation curve (with A-ViT's halting depth on and off the object), from its
    metrics.jsonl; a run listed under two names (the demo's chosen grid run) appears once."""
    keys = ("epoch", "train_loss", "val_top1", "val_gflops", "val_mean_depth", "val_object_depth",
            "val_background_depth", "val_object_kept")  # fmt: skip
    out, seen = {}, set()
    for name, path in runs.items():
        if path in seen:
            continue
        seen.add(path)
        metrics = path / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        out[name] = [{k: m[k] for k in keys if k in m} for m in map(json.loads, filter(None, lines))]
    return out
