"""How long and how fast should DynamicViT's backbone train? Validation curves of schedules, from the shipped model.

    .venv/bin/python benchmarks/dvit_schedule.py

DynamicViT's authors train 30 epochs over ImageNet with the backbone at lr x 0.01 (and at lr 0 for
the first 5). The study scales that to a few epochs of 12000 fresh canvases, where a backbone at
0.01 x 1e-2 barely moves while three stages of pruning change what every later block sees. This runs
DynamicViT rho 0.7 under a few schedules (backbone lr scale x epochs; the backbone fixed for the
first sixth of them, the authors' 5 of 30) and the dense model fine-tuned on the same data at the
best schedule's backbone lr (`dense-ft`: how much of a gain is only more training of the dense model),
and writes each run's validation top-1 after every epoch (held-out training items; the test split
is not used) to benchmarks/results/dvit_schedule.md. The study's DynamicViT schedule is chosen from
this table. With --predictor-lrs the first bracket also runs at other predictor lrs, the backbone's
lr held at the chosen one. Runs live in runs/dvit-schedule/ and are reused when finished.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from results_dir import add_update_flag, results_folder

from tokensparse.bench import machine_description, today
from tokensparse.config import TrainConfig
from tokensparse.demo import DemoConfig, model_settings
from tokensparse.models import pretrained_entry
from tokensparse.train import train

LR = 1e-2  # the predictors' lr in the study (DemoConfig.dynamicvit_lr)


def run(out: Path, limit: int, **kw) -> list[dict]:
    if not (out / "model.safetensors").is_file():
        settings = dict(
            **model_settings(DemoConfig()),
            batch_size=128,
            train_limit=limit,
            val_limit=None,
            warmup_epochs=0,
            seed=0,
            output=str(out),
            resume=True,
        )
        train(TrainConfig(**(settings | kw)))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def dvit_row(args, name: str, lr: float, scale: float, epochs: int, fixed: int, key: float | None) -> tuple:
    """One DynamicViT rho 0.7 run (predictors at `lr`, backbone at `lr * scale` after `fixed` epochs) as a
    table row; `key` is the backbone lr scale the row competes under when the scale is chosen (None: it does not)."""
    curve = run(
        args.work / name,
        args.limit,
        method="dynamicvit",
        keep_ratio=0.7,
        epochs=epochs,
        lr=lr,
        backbone_lr_scale=scale,
        backbone_fixed_epochs=fixed,
    )
    return name, key, f"predictors {lr:g}, backbone {lr * scale:g} after {fixed} fixed", curve


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scales", type=float, nargs="+", default=[0.1, 0.01, 0.3])
    parser.add_argument("--epochs", type=int, nargs="+", default=[4, 6])
    parser.add_argument(
        "--predictor-lrs",
        type=float,
        nargs="*",
        default=[],
        help=f"also run the first bracket with these predictor lrs (default {LR:g}), the backbone's lr held at the chosen one",
    )
    parser.add_argument("--limit", type=int, default=12000, help="training items per epoch")
    parser.add_argument("--work", type=Path, default=Path("runs/dvit-schedule"))
    parser.add_argument(
        "--out", type=Path, default=None, help="default: dvit_schedule.md in the results folder"
    )
    add_update_flag(parser)
    args = parser.parse_args()
    args.out = args.out or results_folder(args) / "dvit_schedule.md"
    rows = []
    chosen_scale = args.scales[0]  # replaced by the first bracket's choice
    for epochs in args.epochs:
        fixed = max(1, round(epochs / 6))
        # the 4-epoch bracket sweeps the lr scale; longer schedules run at the scale it chose
        scales = args.scales if epochs == args.epochs[0] else [chosen_scale]
        for scale in scales:
            rows.append(
                dvit_row(args, f"dynamicvit@0.7-bb{scale:g}-{epochs}ep", LR, scale, epochs, fixed, scale)
            )
        if epochs == args.epochs[0]:
            chosen_scale = max(rows, key=lambda row: row[3][-1]["val_top1"])[1]
            for predictor_lr in args.predictor_lrs:  # the predictors' lr, the backbone's held
                name = f"dynamicvit@0.7-plr{predictor_lr:g}-bb{LR * chosen_scale:g}-{epochs}ep"
                scale = LR * chosen_scale / predictor_lr
                rows.append(dvit_row(args, name, predictor_lr, scale, epochs, fixed, None))
        # the control: the dense model trained as long, at the backbone's lr
        dense_lr = LR * chosen_scale
        name = f"dense-ft-lr{dense_lr:g}-{epochs}ep"
        curve = run(args.work / name, args.limit, method="dense", epochs=epochs, lr=dense_lr)
        rows.append((name, None, f"all weights {dense_lr:g}, cross-entropy only", curve))
    # chosen on validation, by the final epoch's top-1 (the study reports the final weights)
    best = max((row for row in rows if row[1] is not None), key=lambda row: row[3][-1]["val_top1"])
    teacher = DemoConfig().teacher  # the model _model_settings fine-tunes from
    shipped = pretrained_entry(teacher).path.with_suffix(".metrics.jsonl").read_text().splitlines()
    teacher_top1 = json.loads(shipped[-1])["val_top1"]
    minutes = sum(m["epoch_seconds"] for *_, curve in rows for m in curve) / 60
    longest = max(args.epochs)
    head = "| run | lr | " + " | ".join(f"ep {i + 1}" for i in range(longest)) + " |"
    lines = [
        "# DynamicViT's fine-tuning schedule, chosen on validation",
        "",
        f"- command: `.venv/bin/python benchmarks/dvit_schedule.py"
        f"{' --scales ' + ' '.join(f'{x:g}' for x in args.scales) if args.scales != parser.get_default('scales') else ''}"
        f"{' --epochs ' + ' '.join(map(str, args.epochs)) if args.epochs != parser.get_default('epochs') else ''}"
        f"{' --predictor-lrs ' + ' '.join(f'{x:g}' for x in args.predictor_lrs) if args.predictor_lrs else ''}`",
        f"- date: {today()}",
        f"- machine: {machine_description()}",
        f"- from `tokensparse.pretrained('{teacher}')` (validation top-1 {teacher_top1:.2f} after its training); "
        f"{args.limit} fresh training canvases per epoch, batch 128, cosine lr, no warm-up; "
        "DynamicViT rho 0.7 with the authors' loss (ratio 2, MSE token + KL logits distillation 0.5), "
        "cls_token/pos_embed frozen",
        "- validation top-1 (%) after each epoch on all 5000 held-out training items (the test split is not used)",
        f"- training time of the runs: {minutes:.0f} min (their epoch_seconds summed; finished runs are reused)",
        f"- chosen: {best[0]} (highest final validation top-1); the lr scale is swept at {args.epochs[0]} epochs "
        "and longer schedules run at the scale chosen there; each dense control runs as long, at that backbone lr",
        "",
        head,
        "|---|---|" + "---:|" * longest,
    ]
    for name, _, lr, curve in rows:
        vals = [f"{m['val_top1']:.2f}" for m in curve] + [""] * (longest - len(curve))
        lines.append(f"| {name} | {lr} | " + " | ".join(vals) + " |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
