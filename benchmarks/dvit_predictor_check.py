"""Is a DynamicViT run's shortfall its predictor's ranking or its fine-tuned backbone?

    .venv/bin/python benchmarks/dvit_predictor_check.py

For each DynamicViT fine-tune of the study (runs/study/dynamicvit@<rho>, `tokensparse demo --study`),
crosses the two things the fine-tune changed: the backbone (the fine-tuned one, or the shipped dense
model's) and the token selection (the learned predictors, or static centre pruning at the same token
counts). Each of the four models is evaluated on the validation split (held-out training items; the
test split is not used) with the share of object patches kept at the last stage. A learned row below
its static row with the same backbone says the predictors rank tokens worse than a fixed centre
prior. Writes benchmarks/results/dvit_predictor_check.md.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from results_dir import add_update_flag, results_folder

import tokensparse
from tokensparse.bench import machine_description, today
from tokensparse.data import build_dataset, build_loader
from tokensparse.evaluate import evaluate
from tokensparse.train import load_trained


def with_backbone(model: torch.nn.Module, source: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose ViT weights are `source`'s (a DynamicViT keeps its predictors)."""
    model = copy.deepcopy(model)
    own = model.state_dict()
    backbone = {k: v for k, v in source.state_dict().items() if k in own}
    missing = [k for k in own if k not in backbone and "score_predictor" not in k]
    if missing:
        raise ValueError(f"the backbone lacks {missing[:3]}")
    model.load_state_dict(backbone, strict=False)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("runs/study"))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--val-limit", type=int, default=None)
    parser.add_argument(
        "--out", type=Path, default=None, help="default: dvit_predictor_check.md in the results folder"
    )
    add_update_flag(parser)
    args = parser.parse_args()
    args.out = args.out or results_folder(args) / "dvit_predictor_check.md"
    missing = [r for r in args.ratios if not (args.work / f"dynamicvit@{r}" / "config.json").is_file()]
    if missing:
        raise SystemExit(
            f"the study's DynamicViT runs at rho {missing} are not in {args.work}: make them with "
            "`tokensparse demo --study` (or pass --work FOLDER, the work folder that holds them)"
        )
    torch.manual_seed(0)
    data = build_dataset("fashion-mnist-clutter", split="val", limit=args.val_limit, return_box=True)
    loader = build_loader(data, 128, is_training=False)
    teacher = tokensparse.pretrained("clutter-vit").eval()
    dense = evaluate(teacher, loader, progress=False)
    rows = [("dense", "shipped", "none", dense)]
    for ratio in args.ratios:
        run = args.work / f"dynamicvit@{ratio}"
        learned = load_trained(run)[0].eval()
        tuned = with_backbone(teacher, learned)
        models = {
            ("fine-tuned", "learned"): learned,
            ("fine-tuned", "static"): tokensparse.static_prune(copy.deepcopy(tuned), keep_ratio=ratio),
            ("shipped", "learned"): with_backbone(learned, teacher),
            ("shipped", "static"): tokensparse.static_prune(copy.deepcopy(teacher), keep_ratio=ratio),
        }
        for (backbone, selection), model in models.items():
            result = evaluate(model.eval(), loader, progress=False)
            rows.append((f"rho {ratio}", backbone, selection, result))
            print(rows[-1][:3], f"{result['top1']:.2f}", flush=True)

    lines = [
        "# DynamicViT: the predictors' ranking against static pruning, on each backbone",
        "",
        "- command: `.venv/bin/python benchmarks/dvit_predictor_check.py`",
        f"- date: {today()}",
        f"- machine: {machine_description('cpu')}",
        f"- runs: {args.work}/dynamicvit@<rho> from `tokensparse demo --study`; the backbone is the run's fine-tuned ViT or the "
        "shipped dense model `tokensparse.pretrained('clutter-vit')`; selection is the run's learned predictors or static centre "
        "pruning at the same token counts",
        f"- data: {'all ' if args.val_limit is None else 'the first '}{len(data)} validation images (held-out training items)",
        "",
        "| setting | backbone | selection | top-1 (%) | vs dense (pt) | executed GMACs | object patches kept at last stage |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for setting, backbone, selection, r in rows:
        kept = r.get("object_kept")
        lines.append(
            f"| {setting} | {backbone} | {selection} | {r['top1']:.2f} | {r['top1'] - dense['top1']:+.2f} | "
            f"{r['gflops']:.4f} | {'' if kept is None or selection == 'none' else f'{100 * kept:.1f}%'} |"
        )
    lines.append("")
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
