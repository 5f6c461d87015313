"""The main job and the study: the papers' claims checked on the built-in cluttered Fashion-MNIST.

Both start where the papers start, from a converged dense model shipped with the package
(`tokensparse.pretrained("clutter-vit")`, its own teacher), fine-tune DynamicViT and A-ViT with their
authors' recipes, compare them with ToMe, EViT (authors' form), random and static pruning and an
object oracle at matched executed FLOPs, time the headline rows in one paired, interleaved run, and
write `index.md` with the table, the claims, the fine-tuning curves and figures. Every choice is made
on the validation split (held-out training items); every reported number is on Fashion-MNIST's test
split. Finished steps (a training run, an evaluation) are kept under the work folder and reused by a
re-run of the same command; a killed fine-tune resumes.

- `config`: `DemoConfig` (the demo's short schedule) and `study_config()` (the full study).
- `runs`: the fine-tunes (`train_study`), A-ViT's start and the choice of its loss weights.
- `contenders`: the typed rows (`Contender`), their test evaluation over seeds and the timing.
- `report`: index.md, the claims and the figures.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from ..data import build_dataset, build_loader
from ..evaluate import evaluate
from ..models import pretrained
from ..training import json_safe
from .config import DemoConfig, study_config
from .contenders import Contender, contenders, evaluate_all, moved_gate_contenders, test_set, time_all
from .report import figures, headline_rows, headline_table, write_report
from .runs import StudyRuns, calibrate_gate_center, curves, gate_center_for_cut, log, train_study

__all__ = [
    "Contender",
    "DemoConfig",
    "StudyRuns",
    "calibrate_gate_center",
    "demo",
    "gate_center_for_cut",
    "run_study",
    "study_config",
    "train_study",
]


def run_study(cfg: DemoConfig, train_only: bool = False) -> Path | None:
    """Fine-tune (or reuse), evaluate, time and report; returns the report's index.md (None with
    `train_only`: the fine-tunes alone, so that a later run evaluates and times on an idle machine)."""
    wall = time.perf_counter()
    study = train_study(cfg)
    if train_only:
        log("the study's fine-tunes are in place" if not study.missing else f"not trained: {study.missing}")
        return None
    work, report = Path(cfg.work), Path(cfg.report)
    report.mkdir(parents=True, exist_ok=True)
    val = build_dataset("fashion-mnist-clutter", split="val", limit=cfg.calibration_images)
    val_images = torch.stack([val[i][0] for i in range(len(val))])
    test = test_set(cfg)
    log("evaluating every contender on the test split")
    rows = contenders(cfg, study, test) + moved_gate_contenders(cfg, study, val_images)
    results, reused = evaluate_all(cfg, rows, test, work / "evaluations.json")
    headline = headline_rows(cfg, results, rows)
    log("timing the headline rows (paired, interleaved)")
    timed = [r for r in rows if r.name in headline and r.family != "oracle"]  # the oracle needs its labels
    seconds = time_all(cfg, timed)
    for name in (r.name for r in timed):
        results[name]["speedup"] = seconds["dense"] / seconds[name]
        results[name]["bench_img_s"] = cfg.bench_batch / seconds[name]
    log("drawing figures")
    untrained = _untrained(cfg, study)
    fine_tuning = curves(study.runs)
    pictures = figures(cfg, study, rows, results, fine_tuning, untrained, report)
    minutes = (time.perf_counter() - wall) / 60
    notes = [
        f"wall time of this command: {minutes:.1f} min"
        + (
            f" ({len(study.reused)} fine-tunes and {reused} evaluations reused from earlier runs with the same "
            "settings, each run's config.json compared)"
            if study.reused or reused
            else ""
        )  # fmt: skip
    ]
    devices = _run_devices(study.runs.values())
    if devices:
        notes.append(
            f"fine-tunes trained with device {devices} (each run's config.json); evaluated and timed here"
        )
    if study.missing:
        notes.append(f"INTERIM: not trained yet, so missing from the tables: {', '.join(study.missing)}")
    index = write_report(cfg, study, rows, results, headline, fine_tuning, untrained, pictures, notes, report)
    record = {
        # the work folder as the command named it inside the checkout, else by its name alone (no machine paths)
        "config": dataclasses.asdict(cfg) | {"work": _shown(cfg.work)},
        "wall_minutes": minutes,
        "avit_start": {"gate_center": study.start_center, "untrained_depth": study.start_depth, **untrained},
        "avit_grid": study.grid,
        "missing": study.missing,
        "results": results,
        "curves": fine_tuning,
    }
    (report / "results.json").write_text(json.dumps(json_safe(record), indent=1, allow_nan=False))
    print()
    print(headline_table(results, headline))
    print(f"\nreport: {index}")
    return index


def _shown(folder: str) -> str:
    path = Path(folder)
    if not path.is_absolute():
        return folder
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return path.name


def _untrained(cfg: DemoConfig, study: StudyRuns) -> dict[str, float]:
    """On validation: the dense model's top-1, and where the untrained A-ViT halts at the start centre."""
    from ..policies.avit import avit

    loader = build_loader(
        build_dataset("fashion-mnist-clutter", split="val", limit=cfg.val_limit, return_box=True),
        cfg.batch_size,
        is_training=False,
    )
    dense = evaluate(pretrained(cfg.teacher), loader, device=cfg.device, progress=False)
    model = avit(pretrained(cfg.teacher), gate_scale=cfg.gate_scale, gate_center=study.start_center)
    halting = evaluate(model, loader, device=cfg.device, progress=False)
    keys = ("mean_depth", "object_depth", "background_depth")
    return {"dense_val_top1": dense["top1"], "untrained_val_top1": halting["top1"]} | {
        k: halting[k] for k in keys
    }


def _run_devices(runs) -> str:
    """'cuda (27 runs)' or 'cpu (3 runs), cuda (24 runs)': where the study's fine-tunes trained."""
    counts: dict[str, int] = {}
    for run in set(runs):
        device = json.loads((Path(run) / "config.json").read_text()).get("device", "?")
        counts[device] = counts.get(device, 0) + 1
    return ", ".join(f"{d} ({n} run{'s' * (n > 1)})" for d, n in sorted(counts.items()))


def demo(**overrides) -> Path:
    """The README's main job (the short schedule)."""
    return run_study(DemoConfig(**overrides))
