"""The main job: a small study of the papers' claims on the built-in cluttered Fashion-MNIST.

Trains a small dense ViT, fine-tunes DynamicViT (rho 0.7) and A-ViT from it with distillation,
evaluates them and the training-free baselines (ToMe, EViT, random, static) at matched FLOPs, times
all contenders in one paired, interleaved run, and writes `report/index.md` with the table and
figures. Every finished step (a training run, an evaluation) is kept under the work folder and
reused by a re-run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .bench import interleaved, machine_description, today
from .data import build_dataset, build_loader
from .evaluate import evaluate
from .flops import gflops
from .train import TrainConfig, load_trained, train

SMALL_VIT = {"patch_size": 8, "embed_dim": 64, "depth": 12, "num_heads": 2}


@dataclass
class DemoConfig:
    """Sizes of the study. `demo()` defaults fit ~5 minutes on 2 CPU cores; `replication()` is longer."""

    work: str = "runs/demo"
    report: str = "report"
    model: str = "vit_tiny_patch16_224"
    model_kwargs: dict[str, Any] = field(default_factory=lambda: dict(SMALL_VIT))
    train_limit: int | None = 6000
    val_limit: int | None = 2000
    dense_epochs: int = 10
    dense_lr: float = 2e-3
    finetune_epochs: int = 3
    finetune_limit: int | None = 6000
    finetune_batch_size: int = 64
    finetune_lr: float = 5e-4
    batch_size: int = 128
    keep_ratio: float = 0.7
    gate_scale: float = 10.0
    gate_center: float = 10.0
    curve_ratios: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
    bench_batch: int = 64
    bench_rounds: int = 15
    device: str = "cpu"
    seed: int = 0
    command: str = "tokensparse demo"


def replication_config(**overrides) -> DemoConfig:
    """The longer schedule of the same study (the committed replication): 20000 training images,
    6 dense epochs and 4 fine-tuning epochs, the whole 10000-image validation split; ~45 min on 2 CPU cores."""
    base = dict(
        train_limit=20000,
        val_limit=None,
        dense_epochs=6,
        finetune_epochs=4,
        finetune_limit=20000,
        finetune_batch_size=128,
        work="runs/replication",
        report="benchmarks/results/replication",
        bench_rounds=30,
        command="tokensparse demo --replication",
    )
    return DemoConfig(**{**base, **overrides})


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


_REUSED: list[str] = []


def _train_step(cfg: DemoConfig, name: str, **kw) -> Path:
    """Train one model unless its run folder already holds a finished model."""
    out = Path(cfg.work) / name
    if (out / "model.safetensors").is_file():
        _log(f"{name}: reusing {out}")
        _REUSED.append(f"training of {name}")
        return out
    _log(f"{name}: training -> {out}")
    settings = dict(
        model=cfg.model,
        model_kwargs=cfg.model_kwargs,
        batch_size=cfg.batch_size,
        val_limit=cfg.val_limit,
        device=cfg.device,
        seed=cfg.seed,
        output=str(out),
        resume=True,
    )
    train(TrainConfig(**(settings | kw)))
    return out


def _contenders(cfg: DemoConfig, runs: dict[str, Path]) -> dict[str, Callable[[], nn.Module]]:
    """Name -> builder of every model the report evaluates (eval mode)."""
    from .policies.baselines import random_prune, static_prune
    from .policies.evit import evit
    from .policies.tome import tome

    dense_model, _ = load_trained(runs["dense"])

    def dense_copy() -> nn.Module:
        return copy.deepcopy(dense_model)

    def dynamicvit_at(ratio: float) -> nn.Module:
        model, _ = load_trained(runs["dynamicvit"])
        model.score_predictor.keep_ratio = ratio
        return model

    def avit_at(center: float | None) -> nn.Module:
        model, _ = load_trained(runs["avit"])
        if center is not None:
            model.halting.gate_center = center
        return model

    builders: dict[str, Callable[[], nn.Module]] = {"dense": dense_copy}
    for ratio in cfg.curve_ratios:
        builders[f"dynamicvit@{ratio}"] = lambda r=ratio: dynamicvit_at(r)
        builders[f"evit@{ratio}"] = lambda r=ratio: evit(dense_copy(), keep_ratio=r)
        builders[f"random@{ratio}"] = lambda r=ratio: random_prune(dense_copy(), keep_ratio=r, seed=0)
        builders[f"static@{ratio}"] = lambda r=ratio: static_prune(dense_copy(), keep_ratio=r)
    for offset in (-4.0, -2.0, 0.0, 2.0, 4.0):
        center = cfg.gate_center + offset
        builders[f"avit@{center:g}"] = lambda c=center: avit_at(c)
    target = gflops(dynamicvit_at(cfg.keep_ratio).eval(), batch=2)
    r_match = _match_tome_r(dense_model, target)
    for r in sorted({max(1, r_match // 2), r_match, r_match + max(1, r_match // 2)}):
        builders[f"tome@r{r}"] = lambda r=r: tome(dense_copy(), r=r)
    return builders


def _match_tome_r(dense: nn.Module, target: float) -> int:
    """The ToMe r whose executed GFLOPs come closest to `target` (DynamicViT's)."""
    from .policies.tome import tome

    best, best_gap = 1, float("inf")
    for r in range(1, dense.patch_embed.num_patches // 2):
        gap = abs(gflops(tome(copy.deepcopy(dense), r=r).eval(), batch=2) - target)
        if gap < best_gap:
            best, best_gap = r, gap
    return best


def _evaluate_all(cfg: DemoConfig, builders, cache: Path) -> dict[str, dict]:
    val = build_dataset("fashion-mnist-clutter", split="val", limit=cfg.val_limit, return_box=True)
    loader = build_loader(val, cfg.batch_size, is_training=False)
    results = json.loads(cache.read_text()) if cache.is_file() else {}
    if results:
        _REUSED.append(f"{len(set(results) & set(builders))} evaluations")
    for name, build in builders.items():
        if name in results:
            continue
        _log(f"evaluating {name}")
        results[name] = evaluate(build(), loader, device=cfg.device, progress=True)
        cache.write_text(json.dumps(results, indent=1))
    return results


def _time_all(cfg: DemoConfig, builders, names: list[str]) -> dict[str, float]:
    """Median seconds per batch of every named contender, paired and interleaved in one run."""
    val = build_dataset("fashion-mnist-clutter", split="val", limit=cfg.bench_batch)
    images = torch.stack([val[i][0] for i in range(len(val))]).to(cfg.device)
    models = {name: builders[name]().eval().to(cfg.device) for name in names}
    with torch.inference_mode():
        timings = interleaved(
            {n: (lambda m=m: m(images)) for n, m in models.items()},
            rounds=cfg.bench_rounds,
            warmup=2,
            device=cfg.device,
        )
    return {name: t.median for name, t in timings.items()}


def run_study(cfg: DemoConfig) -> Path:
    """Train (or reuse), evaluate, time and report; returns the report's index.md."""
    torch.manual_seed(cfg.seed)
    _REUSED.clear()
    work, report = Path(cfg.work), Path(cfg.report)
    work.mkdir(parents=True, exist_ok=True)
    report.mkdir(parents=True, exist_ok=True)
    runs = {
        "dense": _train_step(
            cfg,
            "dense",
            method="dense",
            epochs=cfg.dense_epochs,
            lr=cfg.dense_lr,
            train_limit=cfg.train_limit,
            warmup_epochs=min(2, cfg.dense_epochs - 1),
            smoothing=0.1,
        )
    }
    start = str(runs["dense"] / "model.safetensors")
    finetune = dict(
        batch_size=cfg.finetune_batch_size,
        checkpoint=start,
        epochs=cfg.finetune_epochs,
        lr=cfg.finetune_lr,
        train_limit=cfg.finetune_limit,
        warmup_epochs=0,
    )
    runs["dynamicvit"] = _train_step(
        cfg, "dynamicvit", method="dynamicvit", keep_ratio=cfg.keep_ratio, **finetune
    )
    runs["avit"] = _train_step(
        cfg, "avit", method="avit", gate_scale=cfg.gate_scale, gate_center=cfg.gate_center, **finetune
    )
    builders = _contenders(cfg, runs)
    results = _evaluate_all(cfg, builders, work / "evaluations.json")
    headline = _headline(cfg, results)
    _log("timing the headline contenders (paired, interleaved)")
    seconds = _time_all(cfg, builders, headline)
    for name in headline:
        results[name]["speedup"] = seconds["dense"] / seconds[name]
        results[name]["bench_img_s"] = cfg.bench_batch / seconds[name]
    _log("drawing figures")
    figures = _figures(cfg, builders, results, report)
    index = _write_report(cfg, results, headline, figures, report)
    (report / "results.json").write_text(
        json.dumps({"config": dataclasses.asdict(cfg), "results": results}, indent=1)
    )
    _log(f"report: {index}")
    return index


def _headline(cfg: DemoConfig, results: dict[str, dict]) -> list[str]:
    rho = cfg.keep_ratio
    tome_names = [n for n in results if n.startswith("tome@")]
    target = results[f"dynamicvit@{rho}"]["gflops"]
    tome_match = min(tome_names, key=lambda n: abs(results[n]["gflops"] - target))
    return [
        "dense",
        f"dynamicvit@{rho}",
        f"avit@{cfg.gate_center:g}",
        tome_match,
        f"evit@{rho}",
        f"random@{rho}",
        f"static@{rho}",
    ]


def _figures(cfg: DemoConfig, builders, results: dict[str, dict], report: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from .viz import token_maps

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for family, marker in [
        ("dynamicvit", "o"),
        ("evit", "s"),
        ("random", "v"),
        ("static", "^"),
        ("tome", "D"),
        ("avit", "P"),
    ]:
        points = sorted((r["gflops"], r["top1"]) for n, r in results.items() if n.startswith(family + "@"))
        if points:
            ax.plot(*zip(*points), marker=marker, label=family)
    ax.scatter(
        [results["dense"]["gflops"]],
        [results["dense"]["top1"]],
        marker="*",
        s=160,
        c="k",
        label="dense",
        zorder=5,
    )
    ax.set_xlabel("executed GFLOPs per image")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("accuracy vs executed FLOPs (cluttered Fashion-MNIST val)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(report / "accuracy_vs_gflops.png", dpi=120)
    plt.close(fig)

    val = build_dataset("fashion-mnist-clutter", split="val", limit=6)
    images = torch.stack([val[i][0] for i in range(len(val))])
    titles = [val.classes[int(val[i][1])] for i in range(len(val))]
    figures = {"accuracy": "accuracy_vs_gflops.png"}
    for name, key in [(f"dynamicvit@{cfg.keep_ratio}", "dynamicvit"), (f"avit@{cfg.gate_center:g}", "avit")]:
        token_maps(
            builders[name](),
            images,
            report / f"token_maps_{key}.png",
            IMAGENET_DEFAULT_MEAN,
            IMAGENET_DEFAULT_STD,
            titles,
        )
        figures[key] = f"token_maps_{key}.png"
    from .policies.tome import tome

    tome_name = _headline(cfg, results)[3]
    dense, _ = load_trained(Path(cfg.work) / "dense")
    token_maps(
        tome(dense, r=int(tome_name.split("@r")[1]), trace_source=True),
        images,
        report / "token_maps_tome.png",
        IMAGENET_DEFAULT_MEAN,
        IMAGENET_DEFAULT_STD,
        titles,
    )
    figures["tome"] = "token_maps_tome.png"
    return figures


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _write_report(cfg: DemoConfig, results, headline, figures, report: Path) -> Path:
    dense = results["dense"]
    reused = (
        "; steps reused from an earlier run of the same command: " + ", ".join(_REUSED) if _REUSED else ""
    )
    lines = [
        "# tokensparse study: cluttered Fashion-MNIST",
        "",
        f"- command: `{cfg.command}`{reused}",
        f"- date: {today()}",
        f"- machine: {machine_description(cfg.device)}",
        f"- model: {cfg.model} with {json.dumps(cfg.model_kwargs)}, 64x64 images (64 patches + class token)",
        f"- data: fashion-mnist-clutter, train {cfg.train_limit or 'all 60000'} images (fine-tuning "
        f"{cfg.finetune_limit or 'all'}), validation {cfg.val_limit or 'all 10000'} (Fashion-MNIST's test split)",
        f"- schedule: dense {cfg.dense_epochs} epochs from scratch; DynamicViT (rho {cfg.keep_ratio}) and A-ViT "
        f"(gate scale {cfg.gate_scale:g}, centre {cfg.gate_center:g}) fine-tuned {cfg.finetune_epochs} epochs from it "
        "with distillation; ToMe, EViT, random and static pruning training-free on the dense model",
        "- speedup: one paired, interleaved timing run of the table's rows (median per batch of "
        f"{cfg.bench_batch}, {cfg.bench_rounds} rounds), relative to dense",
        "",
        "| method | top-1 (%) | top-5 (%) | executed GFLOPs | FLOPs vs dense | img/s | speedup | object patches kept at last stage |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in headline:
        r = results[name]
        kept = None if name.startswith("tome@") else r.get("object_kept")  # merged, not dropped: no keep set
        extra = "" if kept is None else f"{100 * kept:.1f}%"
        if "object_depth" in r:
            extra = f"depth {r['object_depth']:.2f} on object vs {r['background_depth']:.2f} off"
        lines.append(
            f"| {name} | {r['top1']:.2f} | {r['top5']:.2f} | {r['gflops']:.4f} | {r['gflops'] / dense['gflops']:.2f} "
            f"| {_fmt(r.get('bench_img_s'), '.0f')} | {_fmt(r.get('speedup'), '.2f')}x | {extra} |"
        )
    lines += (
        ["", "## Claims", ""]
        + _claims(cfg, results)
        + [
            "",
            "## All evaluated settings",
            "",
            "| setting | top-1 (%) | executed GFLOPs | keep ratio per stage / mean depth |",
            "|---|---:|---:|---|",
        ]
    )
    for name, r in results.items():
        detail = r.get("keep_ratio_per_stage", r.get("mean_depth", ""))
        lines.append(f"| {name} | {r['top1']:.2f} | {r['gflops']:.4f} | {detail if detail != '' else ''} |")
    lines += [
        "",
        "## Figures",
        "",
        f"![accuracy vs GFLOPs]({figures['accuracy']})",
        "",
        f"DynamicViT: patches kept after each stage (dropped ones greyed)\n\n![]({figures['dynamicvit']})",
        "",
        f"A-ViT: blocks computed per patch\n\n![]({figures['avit']})",
        "",
        f"ToMe: merged groups at the end of the network\n\n![]({figures['tome']})",
        "",
    ]
    index = report / "index.md"
    index.write_text("\n".join(lines))
    return index


def _claims(cfg: DemoConfig, results: dict[str, dict]) -> list[str]:
    """Each paper claim checked against this run's numbers, pass or not, with the numbers."""
    dense = results["dense"]
    rho = cfg.keep_ratio
    dvit, avit = results[f"dynamicvit@{rho}"], results[f"avit@{cfg.gate_center:g}"]

    def line(ok: bool, text: str) -> str:
        return f"- {'holds' if ok else 'does NOT hold'}: {text}"

    saved_d = 1 - dvit["gflops"] / dense["gflops"]
    saved_a = 1 - avit["gflops"] / dense["gflops"]
    out = [
        line(
            saved_d >= 0.30 and dense["top1"] - dvit["top1"] <= 0.5,
            f"DynamicViT rho {rho}: {100 * saved_d:.1f}% fewer executed FLOPs (claim >= 30%), top-1 "
            f"{dvit['top1']:.2f} vs dense {dense['top1']:.2f} ({dvit['top1'] - dense['top1']:+.2f} pt; claim >= -0.5)",
        ),
        line(
            saved_a >= 0.25 and dense["top1"] - avit["top1"] <= 0.5,
            f"A-ViT: {100 * saved_a:.1f}% fewer executed FLOPs (claim >= 25%), top-1 {avit['top1']:.2f} "
            f"({avit['top1'] - dense['top1']:+.2f} pt; claim >= -0.5)",
        ),
    ]
    for base in ("random", "static"):
        b = results[f"{base}@{rho}"]
        out.append(
            line(
                dvit["top1"] - b["top1"] >= 2.0,
                f"learned pruning vs {base} at equal FLOPs: {dvit['top1']:.2f} vs {b['top1']:.2f} "
                f"({dvit['top1'] - b['top1']:+.2f} pt; claim >= +2)",
            )
        )
    kept = dvit.get("object_kept")
    if kept is not None:
        out.append(
            line(kept >= 0.9, f"kept tokens cover {100 * kept:.1f}% of the object's patches (claim >= 90%)")
        )
    return out


def demo(**overrides) -> Path:
    """The README's main job (~5 minutes on 2 CPU cores)."""
    return run_study(DemoConfig(**overrides))
