"""The study's report: index.md (tables, the papers' claims checked, curves) and its figures.

`tokensparse.demo` runs the study and calls `_write_report` and `_figures` with its results.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .bench import machine_description, today
from .data import build_dataset, build_loader
from .models import pretrained, pretrained_entry

if TYPE_CHECKING:
    from .demo import DemoConfig

_REUSED: list[str] = []
"""Steps of this study reused from earlier runs with the same settings (the report names them)."""


def _closest(results: dict[str, dict], prefix: str, target: float) -> str | None:
    names = [n for n in results if n.startswith(prefix)]
    return min(names, key=lambda n: abs(results[n]["gflops"] - target)) if names else None


def _vs_dense(r: dict) -> str:
    """Top-1 vs dense in pt (paired on the same items, from _evaluate_all), ± its 95% interval (none for dense)."""
    return f"{r['vs_dense']:+.2f}" + (f" ± {r['vs_dense_ci']:.2f}" if r["vs_dense_ci"] else "")


def _headline_table(results: dict[str, dict], headline: list[str]) -> str:
    dense = results["dense"]
    lines = [
        "| method | top-1 (%) | vs dense (pt, 95% CI) | GMACs | MACs vs dense | speedup |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in headline:
        r = results[name]
        lines.append(
            f"| {name} | {r['top1']:.2f} | {_vs_dense(r)} | {r['gflops']:.4f} | "
            f"{r['gflops'] / dense['gflops']:.2f} | {_fmt(r.get('speedup'), '.2f')}x |"
        )
    return "\n".join(lines)


def _figures(cfg, builders, results, curves, headline, report: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from .viz import token_maps

    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    families = [
        ("dynamicvit@", "o", "DynamicViT (fine-tuned)"),
        ("avit@", "P", "A-ViT (fine-tuned; gate centres)"),
        ("evit@", "s", "EViT (training-free)"),
        ("tome@", "D", "ToMe (training-free)"),
        ("random@", "v", "random (training-free)"),
        ("static@", "^", "static (training-free)"),
    ]
    for prefix, marker, label in families:
        names = sorted((n for n in results if n.startswith(prefix)), key=lambda n: results[n]["gflops"])
        if not names:
            continue
        xs = [results[n]["gflops"] for n in names]
        ys = [results[n]["top1"] for n in names]
        ax.plot(xs, ys, marker=marker, label=label)
        for n, x, y in zip(names, xs, ys):
            ax.annotate(n.split("@")[1], (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
    for name in (n for n in results if "-ft@" in n):
        ax.scatter([results[name]["gflops"]], [results[name]["top1"]], marker="x", c="grey", zorder=4)
        ax.annotate(name, (results[name]["gflops"], results[name]["top1"]), fontsize=6, xytext=(3, -8),
                    textcoords="offset points")  # fmt: skip
    dense = results["dense"]
    ax.scatter(
        [dense["gflops"]], [dense["top1"]], marker="*", s=160, c="k", label="dense (shipped)", zorder=5
    )
    if "dense-ft" in results:
        ft = results["dense-ft"]
        ax.scatter(
            [ft["gflops"]], [ft["top1"]], marker="*", s=100, c="grey", label="dense-ft (control)", zorder=5
        )
    ax.axhline(dense["top1"] - 0.5, color="k", lw=0.6, ls=":", label="dense - 0.5 pt")
    _finish(fig, ax, "executed GMACs per image (multiply-adds)", "top-1 on the test split (%)",
            "accuracy vs executed compute (cluttered Fashion-MNIST)", report / "accuracy_vs_gflops.png")  # fmt: skip
    figures = {"accuracy": "accuracy_vs_gflops.png"}

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, points in curves.items():
        if points:
            ax.plot([p["epoch"] for p in points], [p["val_top1"] for p in points], marker=".", label=name)
    # the curves are on the validation split: so is their reference, the shipped dense model there
    from .evaluate import evaluate

    val = build_dataset("fashion-mnist-clutter", split="val", limit=cfg.val_limit)
    dense_val = evaluate(pretrained(cfg.teacher), build_loader(val, cfg.batch_size, is_training=False),
                         device=cfg.device, progress=False)["top1"]  # fmt: skip
    ax.axhline(dense_val, color="k", lw=0.6, ls=":", label=f"dense (shipped), {dense_val:.2f}")
    _finish(fig, ax, "fine-tuning epoch", "validation top-1 (%)", "fine-tuning curves (validation split)",
            report / "finetune_curves.png")  # fmt: skip
    figures["curves"] = "finetune_curves.png"

    test = build_dataset("fashion-mnist-clutter", split="test", limit=6)
    images = torch.stack([test[i][0] for i in range(len(test))])
    titles = [test.classes[int(test[i][1])] for i in range(len(test))]
    for key in ("dynamicvit", "avit"):
        name = next(n for n in headline if n.startswith(f"{key}@"))
        token_maps(builders[name](), images, report / f"token_maps_{key}.png", IMAGENET_DEFAULT_MEAN,
                   IMAGENET_DEFAULT_STD, titles)  # fmt: skip
        figures[key] = f"token_maps_{key}.png"
    from .policies.tome import tome

    tome_name = next(n for n in headline if n.startswith("tome@"))
    token_maps(
        tome(pretrained(cfg.teacher), r=int(tome_name.split("@r")[1]), trace_source=True),
        images,
        report / "token_maps_tome.png",
        IMAGENET_DEFAULT_MEAN,
        IMAGENET_DEFAULT_STD,
        titles,
    )
    figures["tome"] = "token_maps_tome.png"
    return figures


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    """Label, grid and legend a study figure, save it at `path` and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plateau_gain(top1: list[float]) -> float:
    """What the last 20% of epochs added to validation top-1 (nan with too few epochs): < 0.3 pt = plateau."""
    tail = max(1, math.ceil(0.2 * len(top1)))
    return top1[-1] - top1[-tail - 1] if len(top1) > tail else float("nan")


def _dynamicvit_epochs(cfg: DemoConfig) -> str:
    """'0.5 (8 epochs), 0.7, 0.9 (4 epochs each)': the ratios and how long each fine-tuned."""
    own = [r for r in cfg.dynamicvit_ratios if cfg.dynamicvit_epochs_for(r) != cfg.dynamicvit_epochs]
    other = [r for r in cfg.dynamicvit_ratios if r not in own]
    parts = [f"{r} ({cfg.dynamicvit_epochs_for(r)} epochs)" for r in own]
    if other:
        parts.append(
            f"{', '.join(map(str, other))} ({cfg.dynamicvit_epochs} epochs{' each' * (len(other) > 1)})"
        )
    return ", ".join(parts)


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _write_report(
    cfg: DemoConfig,
    results,
    headline,
    figures,
    curves,
    gate_center,
    gate_centers,
    avit_val,
    prior_depth,
    report: Path,
) -> Path:
    dense = results["dense"]
    reused = (
        "; steps reused from earlier runs with the same settings (each run's config.json compared): "
        + ", ".join(_REUSED)
        if _REUSED
        else ""
    )
    entry = pretrained_entry(cfg.teacher)
    test_items = cfg.test_limit or 10000
    lines = [
        "# tokensparse study: cluttered Fashion-MNIST",
        "",
        f"- command: `{cfg.command}`{reused}",
        f"- date: {today()}",
        f"- machine: {machine_description(cfg.device)}",
        f"- starting point: the shipped dense model `tokensparse.pretrained({cfg.teacher!r})` ({entry.model} with "
        f"{json.dumps(entry.model_kwargs)}, 64x64 images, 64 patches + class token), also every fine-tune's teacher",
        f"- data: fashion-mnist-clutter; fine-tuning on {cfg.finetune_limit} training items per epoch (fresh "
        f"canvases every epoch); choices (A-ViT's evaluation gate centres, curves) on the validation split "
        f"(held-out training items{'' if cfg.val_limit is None else f', first {cfg.val_limit}'}); every number below on "
        f"{'all 10000' if cfg.test_limit is None else f'the first {test_items}'} items of Fashion-MNIST's test split",
        f"- DynamicViT: rho {_dynamicvit_epochs(cfg)}, the authors' "
        f"recipe scaled: predictors at lr {cfg.dynamicvit_lr:g} from the start, backbone at "
        f"{cfg.dynamicvit_backbone_lr_scale:g}x (theirs: 0.01x over 30 epochs) after "
        f"{min(cfg.backbone_fixed_epochs, cfg.dynamicvit_epochs)} epoch(s) at lr 0 (theirs: 5 of 30), cls_token/pos_embed "
        "frozen, MSE token distillation + logits KL from the dense model, ratio weight 2",
        *(
            [
                f"- dense-ft (the control): the shipped dense model fine-tuned {cfg.dynamicvit_epochs} epochs on the same "
                f"data at DynamicViT's backbone lr ({cfg.dynamicvit_lr * cfg.dynamicvit_backbone_lr_scale:g}, cross-entropy): "
                "what the same extra training gives the dense model"
            ]
            if cfg.dense_finetune
            else []
        ),
        f"- A-ViT: gate scale {cfg.gate_scale:g}, prior centred at depth {prior_depth}, {cfg.avit_epochs} epochs at lr "
        f"{cfg.avit_lr:g}, no distillation (the authors' default), fine-tuned from each starting gate centre ("
        + "; ".join(
            f"{start:g}: validation top-1 {v['top1']:.2f} at the headline cut ({v['origin']})"
            for start, v in avit_val.items()
        )
        + f"); the run from {gate_center:g} is reported, evaluated with its gate centre moved to execute "
        + ", ".join(f"{cut:.0%} ({center:g})" for cut, center in gate_centers.items())
        + f" fewer FLOPs than dense on 256 validation images; the headline row is {cfg.avit_headline_cut:.0%}",
        "- EViT and ToMe: the setting whose executed FLOPs match each DynamicViT's; random and static: DynamicViT's "
        "token counts. "
        + (
            f"Each baseline is also fine-tuned {cfg.baseline_epochs} epoch(s) at lr {cfg.baseline_lr:g} (rows `-ft@`)."
            if cfg.baseline_epochs
            else "The baselines are training-free."
        ),
        "- vs dense: top-1 difference on the same test items, ± the half-width of its 95% confidence interval "
        "(normal approximation over the per-item paired differences); a claim is read on the point estimate",
        "- GMACs: executed multiply-adds per image (what the papers call FLOPs); speedup: one paired, interleaved "
        f"timing run of the table's rows (median per batch of {cfg.bench_batch}, {cfg.bench_rounds} rounds) vs dense",
        "",
        "| method | top-1 (%) | vs dense (pt, 95% CI) | top-5 (%) | executed GMACs | vs dense | img/s | speedup | object patches kept at last stage |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in headline:
        r = results[name]
        kept = None if name.startswith("tome") else r.get("object_kept")
        extra = "" if kept is None else f"{100 * kept:.1f}%"
        if "object_depth" in r:
            extra = f"depth {r['object_depth']:.2f} on object vs {r['background_depth']:.2f} off"
        lines.append(
            f"| {name} | {r['top1']:.2f} | {_vs_dense(r)} | {r['top5']:.2f} | {r['gflops']:.4f} | "
            f"{r['gflops'] / dense['gflops']:.2f} | {_fmt(r.get('bench_img_s'), '.0f')} | {_fmt(r.get('speedup'), '.2f')}x "
            f"| {extra} |"
        )
    lines += (
        ["", "## Claims", ""]
        + _claims(cfg, results, gate_centers[cfg.avit_headline_cut])
        + ["", "## Fine-tuning curves", ""]
    )
    lines += [
        "Validation top-1 after each epoch (the last 20% of epochs' gain says whether it plateaued).",
        "",
        "| run | "
        + " | ".join(f"ep {i + 1}" for i in range(max(len(c) for c in curves.values())))
        + " | plateaued |",
        "|---|" + "---:|" * (max(len(c) for c in curves.values()) + 1),
    ]
    for name, points in curves.items():
        tops = [p["val_top1"] for p in points]
        gain = plateau_gain(tops)
        state = f"{'yes' if abs(gain) < 0.3 else 'no'} ({gain:+.2f} pt)" if math.isfinite(gain) else "-"
        lines.append(f"| {name} | " + " | ".join(f"{t:.2f}" for t in tops) + f" | {state} |")
    lines += [
        "",
        "## All evaluated settings",
        "",
        "| setting | top-1 (%) | executed GMACs | keep ratio per stage / mean depth |",
        "|---|---:|---:|---|",
    ]
    for name, r in results.items():
        detail = r.get("keep_ratio_per_stage", r.get("mean_depth", ""))
        detail = f"{detail:.2f}" if isinstance(detail, float) else detail
        lines.append(f"| {name} | {r['top1']:.2f} | {r['gflops']:.4f} | {detail} |")
    lines += [
        "",
        "## Figures",
        "",
        f"![accuracy vs GMACs]({figures['accuracy']})",
        "",
        f"![fine-tuning curves]({figures['curves']})",
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


def _claims(cfg: DemoConfig, results: dict[str, dict], gate_center: float) -> list[str]:
    """Each paper claim checked against this run's numbers, pass or not, with the numbers."""
    dense = results["dense"]
    rho = cfg.keep_ratio
    dvit, avit = results[f"dynamicvit@{rho}"], results[f"avit@{gate_center:g}"]

    def line(ok: bool, text: str) -> str:
        return f"- {'holds' if ok else 'does NOT hold'}: {text}"

    saved_d = 1 - dvit["gflops"] / dense["gflops"]
    saved_a = 1 - avit["gflops"] / dense["gflops"]
    out = [
        line(
            saved_d >= 0.30 and dense["top1"] - dvit["top1"] <= 0.5,
            f"DynamicViT rho {rho}: {100 * saved_d:.1f}% fewer executed FLOPs (claim >= 30%), top-1 "
            f"{dvit['top1']:.2f} vs dense {dense['top1']:.2f} ({_vs_dense(dvit)} pt; claim >= -0.5)",
        ),
        line(
            saved_a >= 0.25 and dense["top1"] - avit["top1"] <= 0.5,
            f"A-ViT (gate centre {gate_center:g}): {100 * saved_a:.1f}% fewer executed FLOPs (claim >= 25%), top-1 "
            f"{avit['top1']:.2f} ({_vs_dense(avit)} pt; claim >= -0.5)",
        ),
    ]
    if "dense-ft" in results:
        ft = results["dense-ft"]
        out.append(
            f"- control: the dense model fine-tuned on the same data and schedule (`dense-ft`) scores {ft['top1']:.2f} "
            f"({ft['top1'] - dense['top1']:+.2f} pt vs the shipped dense); DynamicViT rho {rho} vs it: "
            f"{dvit['top1'] - ft['top1']:+.2f} pt, A-ViT {avit['top1'] - ft['top1']:+.2f} pt"
        )
    for base in ("random", "static"):
        for name in [f"{base}@{rho}"] + [n for n in results if n.startswith(f"{base}-ft@")]:
            b = results[name]
            out.append(
                line(
                    dvit["top1"] - b["top1"] >= 2.0,
                    f"learned pruning vs {name} at equal token counts: {dvit['top1']:.2f} vs {b['top1']:.2f} "
                    f"({dvit['top1'] - b['top1']:+.2f} pt; claim >= +2)",
                )
            )
    kept = dvit.get("object_kept")
    if kept is not None:
        out.append(
            line(kept >= 0.9, f"kept tokens cover {100 * kept:.1f}% of the object's patches (claim >= 90%)")
        )
    if "object_depth" in avit:
        out.append(
            line(
                avit["object_depth"] > avit["background_depth"],
                f"A-ViT halts later on the object: depth {avit['object_depth']:.2f} on it vs "
                f"{avit['background_depth']:.2f} off it",
            )
        )
    for prefix in ("tome@", "evit@"):
        other = _closest(results, prefix, dvit["gflops"])
        if other:
            o = results[other]
            out.append(
                f"- against {other} at {o['gflops']:.4f} GMACs (DynamicViT {dvit['gflops']:.4f}): DynamicViT "
                f"{dvit['top1'] - o['top1']:+.2f} pt; A-ViT at {avit['gflops']:.4f} GMACs {avit['top1'] - o['top1']:+.2f} pt"
            )
    return out
