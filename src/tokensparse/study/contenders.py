"""The study's contenders: every model the report evaluates, typed (`Contender`), evaluated on the test
split with each seed's per-item answers cached, and the headline rows timed in one paired run."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..bench import interleaved
from ..data import build_dataset, build_loader
from ..evaluate import evaluate, paired_difference
from ..flops import gflops
from ..models import pretrained, pretrained_entry
from ..training import load_trained
from .config import DemoConfig
from .runs import StudyRuns, gate_center_for_cut, headline_gflops, match, seed_name, sha256


@dataclass(frozen=True)
class Contender:
    """One row of the study: a method at one setting, built once per seed it was trained with.

    name:     the row's name in tables and results.json ("dynamicvit@0.7").
    family:   what the figure groups it with: dense, dense-ft, dynamicvit, avit, avit-moved, evit, tome,
              random, static, oracle, or "<method>-ft" for a fine-tuned baseline.
    setting:  the setting as a reader reads it ("keep ratio 0.7", "r=4", "gate centre 3.79 (trained)").
    value:    the setting's number (keep ratio, r, FLOP cut), for ordering and labels; None without one.
    builds:   one zero-argument builder per seed (eval-mode models).
    keys:     one cache key per seed (a run's name, or the row's name when training-free).
    weights:  the weights file each build loads (the shipped teacher, or a run's model.safetensors).
    seeds:    the training seeds (0 alone for training-free rows).
    extra:    facts the report prints (A-ViT's trained and evaluated gate centres).
    """

    name: str
    family: str
    setting: str
    value: float | None
    builds: tuple[Callable[[], nn.Module], ...]
    keys: tuple[str, ...]
    weights: tuple[Path, ...]
    seeds: tuple[int, ...] = (0,)
    extra: dict = field(default_factory=dict)


def contenders(cfg: DemoConfig, study: StudyRuns, test_set) -> list[Contender]:
    """Every contender whose runs are finished, in table order."""
    from ..policies.baselines import random_prune, static_prune
    from ..policies.evit import evit
    from ..policies.tome import tome
    from .oracle import clutter_object_masks, object_oracle

    runs = study.runs
    teacher_path = pretrained_entry(cfg.teacher).path
    dense_model = pretrained(cfg.teacher)

    def dense_copy() -> nn.Module:
        return copy.deepcopy(dense_model)

    def loaded(name: str) -> Callable[[], nn.Module]:
        return lambda: load_trained(runs[name])[0]

    def free(name: str, family: str, setting: str, value, build) -> Contender:
        return Contender(name, family, setting, value, (build,), (name,), (teacher_path,))

    def trained(name: str, family: str, setting: str, value, run: str, extra=None) -> Contender | None:
        names = [(s, seed_name(run, s)) for s in cfg.seeds if seed_name(run, s) in runs]
        names = names or ([(cfg.seed, run)] if run in runs else [])
        if not names:
            return None
        return Contender(
            name,
            family,
            setting,
            value,
            tuple(loaded(n) for _, n in names),
            tuple(n for _, n in names),
            tuple(runs[n] / "model.safetensors" for _, n in names),
            tuple(s for s, _ in names),
            extra or {},
        )

    rows: list[Contender | None] = [free("dense", "dense", "shipped", None, dense_copy)]
    rows.append(trained("dense-ft", "dense-ft", "fine-tuned control", None, "dense-ft"))
    for ratio in cfg.dynamicvit_ratios:
        rows.append(
            trained(f"dynamicvit@{ratio}", "dynamicvit", f"keep ratio {ratio}", ratio, f"dynamicvit@{ratio}")
        )
    start = study.start_center
    gates = {"gate_center_trained": start, "gate_center_evaluated": start, "grid_run": study.chosen}
    avit = trained("avit", "avit", f"gate centre {start:g} (trained)", start, "avit", gates)
    if avit is None and study.chosen is not None:  # an interim report: the chosen grid run, labelled so
        canvases = cfg.avit_grid_epochs * cfg.avit_grid_limit
        avit = trained("avit", "avit", f"gate centre {start:g} (trained; the chosen grid run's {canvases:,} "
                       "canvases, the full-budget runs not trained yet)", start, study.chosen,
                       gates | {"budget": "grid"})  # fmt: skip
    rows.append(avit)
    for ratio in cfg.curve_ratios:
        rows.append(free(f"random@{ratio}", "random", f"keep ratio {ratio}", ratio,
                         lambda r=ratio: random_prune(dense_copy(), keep_ratio=r, seed=0)))  # fmt: skip
        rows.append(free(f"static@{ratio}", "static", f"keep ratio {ratio}", ratio,
                         lambda r=ratio: static_prune(dense_copy(), keep_ratio=r)))  # fmt: skip
    # EViT (the authors' token counts) and ToMe at the settings whose executed FLOPs match each DynamicViT's
    for ratio in cfg.dynamicvit_ratios:
        if f"dynamicvit@{ratio}" not in runs:
            continue
        target = gflops(load_trained(runs[f"dynamicvit@{ratio}"])[0].eval(), batch=2)
        rate = match(lambda r: evit(dense_copy(), keep_ratio=r), [x / 100 for x in range(30, 100, 2)], target)
        rows.append(free(f"evit@{rate:g}", "evit", f"keep rate {rate:g}", rate,
                         lambda r=rate: evit(dense_copy(), keep_ratio=r)))  # fmt: skip
        patches = dense_model.patch_embed.num_patches
        r_match = int(match(lambda r: tome(dense_copy(), r=int(r)), range(1, patches // 2), target))
        rows.append(free(f"tome@r{r_match}", "tome", f"r={r_match}", r_match,
                         lambda r=r_match: tome(dense_copy(), r=r)))  # fmt: skip
    # DiffRate: its search (the teacher frozen) and its rule at the authors' profile scaled to the budget
    target = headline_gflops(cfg, runs)
    if target is not None:
        from ..policies.diffrate import diffrate

        rows.append(trained("diffrate", "diffrate", f"searched for {target:.4g} GMACs (backbone frozen)",
                            None, "diffrate"))  # fmt: skip
        rows.append(free("diffrate-profile", "diffrate-profile", f"authors' DeiT-S profile at {target:.4g} GMACs",
                         None, lambda: diffrate(dense_copy(), target_gflops=target)))  # fmt: skip
    for name, (method, setting) in study.baselines.items():
        rows.append(trained(name, f"{method}-ft", f"{setting} (fine-tuned)", None, name))
    headline = f"dynamicvit@{cfg.keep_ratio}"
    if cfg.oracle and headline in runs:
        patch = dense_model.patch_embed.patch_size[0]
        masks = clutter_object_masks(test_set, patch)
        predictors = {k: v for k, v in load_trained(runs[headline])[0].state_dict().items()
                      if k.startswith("score_predictor.")}  # fmt: skip

        def shipped_oracle() -> nn.Module:
            from ..policies.dynamicvit import dynamicvit

            model = dynamicvit(dense_copy(), keep_ratio=cfg.keep_ratio)
            model.load_state_dict(predictors, strict=False)
            return object_oracle(model, masks)

        rows.append(Contender(f"oracle@{cfg.keep_ratio}", "oracle", "object first, shipped backbone",
                              cfg.keep_ratio, (shipped_oracle,), (f"oracle@{cfg.keep_ratio}",),
                              (runs[headline] / "model.safetensors",)))  # fmt: skip
        rows.append(Contender(f"oracle-ft@{cfg.keep_ratio}", "oracle", "object first, fine-tuned backbone",
                              cfg.keep_ratio, (lambda: object_oracle(load_trained(runs[headline])[0], masks),),
                              (f"oracle-ft@{cfg.keep_ratio}",), (runs[headline] / "model.safetensors",)))  # fmt: skip
    return [row for row in rows if row is not None]


def moved_gate_contenders(cfg: DemoConfig, study: StudyRuns, images: torch.Tensor) -> list[Contender]:
    """The secondary A-ViT curve: the first seed's model with its gate centre moved after training to
    execute each of `avit_cuts` fewer FLOPs than dense on validation images (not where it trained)."""
    if "avit" not in study.runs:
        return []
    run = study.runs["avit"]
    model = load_trained(run)[0]
    rows = []
    for cut in cfg.avit_cuts:
        center = gate_center_for_cut(model, images, cut, study.dense_val_gflops)

        def build(c: float = center) -> nn.Module:
            moved = load_trained(run)[0]
            moved.halting.gate_center = c
            return moved

        rows.append(
            Contender(f"avit-moved@{cut:g}", "avit-moved", f"gate moved to {center:g} ({cut:.0%} fewer on val)",
                      cut, (build,), (f"avit-moved@{cut:g}",), (run / "model.safetensors",),
                      extra={"gate_center_trained": study.start_center, "gate_center_evaluated": center})
        )  # fmt: skip
    return rows


def test_set(cfg: DemoConfig):
    return build_dataset("fashion-mnist-clutter", split="test", limit=cfg.test_limit, return_box=True)


def evaluate_all(cfg: DemoConfig, rows: list[Contender], dataset, cache: Path) -> tuple[dict[str, dict], int]:
    """Test-split metrics of every contender, averaged over its seeds.

    Each seed's evaluation is cached in `cache` and reused only when made from the same weights file
    (by content) on the same test items. A row gets `top1` (mean over seeds), `seeds` (each seed's
    top-1, with several), `seed_spread` (max - min), and `vs_dense` / `vs_dense_ci`: its difference to
    the dense model on the same items and the half-width of that difference's 95% interval, paired per
    item over the seed-averaged answers. Also returns how many evaluations came from the cache."""
    loader = build_loader(dataset, cfg.batch_size, is_training=False)
    cached = json.loads(cache.read_text()) if cache.is_file() else {}
    digests = {path: sha256(path)[:16] for row in rows for path in set(row.weights)}
    per_key: dict[str, dict] = {}
    reused = 0
    for row in tqdm(rows, desc="evaluations", leave=False):
        for key, build, path in zip(row.keys, row.builds, row.weights, strict=True):
            source = f"{digests[path]}/test_limit={cfg.test_limit}"
            hit = cached.get(key, {})
            if hit.get("source") == source and "correct" in hit:
                per_key[key], reused = hit, reused + 1
                continue
            per_key[key] = {
                **evaluate(build(), loader, device=cfg.device, progress=False, per_item=True),
                "source": source,
            }
            cached[key] = per_key[key]
            cache.write_text(json.dumps(cached, indent=1))
    dense_correct = per_key["dense"]["correct"]
    results = {}
    for row in rows:
        each = [per_key[key] for key in row.keys]
        numbers = {k for k, v in each[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        out = {k: sum(e[k] for e in each) / len(each) for k in numbers if all(k in e for e in each)}
        out |= {k: v for k, v in each[0].items() if k not in numbers and k not in ("source", "correct")}
        diff, half = paired_difference([e["correct"] for e in each], dense_correct)
        out |= {
            "vs_dense": diff,
            "vs_dense_ci": half,
            "setting": row.setting,
            "family": row.family,
            **row.extra,
        }
        if len(each) > 1:
            tops = [e["top1"] for e in each]
            out |= {"seeds": dict(zip(map(str, row.seeds), tops)), "seed_spread": max(tops) - min(tops)}
        results[row.name] = out
    return results, reused


def time_all(cfg: DemoConfig, rows: list[Contender]) -> dict[str, float]:
    """Median seconds per batch of each row's first seed, paired and interleaved in one run."""
    test = build_dataset("fashion-mnist-clutter", split="test", limit=cfg.bench_batch)
    images = torch.stack([test[i][0] for i in range(len(test))]).to(cfg.device)
    models = {row.name: row.builds[0]().eval().to(cfg.device) for row in rows}
    with torch.inference_mode():
        timings = interleaved(
            {n: (lambda m=m: m(images)) for n, m in models.items()},
            rounds=cfg.bench_rounds,
            warmup=2,
            device=cfg.device,
        )
    return {name: t.median for name, t in timings.items()}
