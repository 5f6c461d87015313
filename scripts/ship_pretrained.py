"""Ship a finished dense training run as a package model: safetensors, metrics and a card.

    .venv/bin/python scripts/ship_pretrained.py runs/teacher clutter-vit --command "make teacher" \
        --previous runs/teacher-stage1

--previous names the run(s) the shipped run started from (its --checkpoint), in order: their
validation curves come first in the shipped metrics and the card (one curve over all stages, each
line with its stage), and the plateau rule reads the whole curve. A run that started from the
package's shipped weights themselves (--checkpoint src/tokensparse/models/<name>.safetensors) takes
--continues-shipped instead: the shipped metrics (all earlier stages) come first.

    .venv/bin/python scripts/ship_pretrained.py runs/teacher-stage3 clutter-vit --continues-shipped \
        --command "make teacher"

Checks before writing: the run's config matches the registry entry (architecture, classes, image size);
the weights are stored in fp16 if that keeps the fp32 logits within 1e-3 of the run's on 256 validation
canvases, else in fp32. The card states the command, machine, date, the validation curve and whether it plateaued
(the last 20% of epochs add < 0.3 pt).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tokensparse.bench import machine_description, today
from tokensparse.data import build_dataset
from tokensparse.models import PRETRAINED, pretrained
from tokensparse.study.report import plateau_gain


def stage_metrics(shipped: str | None, runs: list[Path]) -> list[dict]:
    """One validation curve over all stages: the shipped metrics (if the first run continued them),
    then each run's metrics.jsonl, every line numbered by its epoch overall and its stage."""
    metrics = [json.loads(line) for line in (shipped or "").splitlines() if line.strip()]
    first = (metrics[-1]["stage"] if metrics else 0) + 1
    for stage, run in enumerate(runs, start=first):
        for line in (run / "metrics.jsonl").read_text().splitlines():
            if line.strip():
                m = json.loads(line)
                m["stage_epoch"], m["epoch"], m["stage"] = m["epoch"], len(metrics) + 1, stage
                metrics.append(m)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path)
    parser.add_argument("name", choices=sorted(PRETRAINED))
    parser.add_argument("--command", required=True, help="the command that trained the run (for the card)")
    parser.add_argument(
        "--previous", type=Path, nargs="*", default=[], help="earlier stages the run started from, in order"
    )
    parser.add_argument(
        "--continues-shipped",
        action="store_true",
        help="the run started from the shipped weights: the shipped metrics are its earlier stages",
    )
    parser.add_argument("--note", default="", help="a sentence for the card (how the stages were run)")
    args = parser.parse_args()
    entry = PRETRAINED[args.name]
    config = json.loads((args.run / "config.json").read_text())
    shipped_metrics = None
    if args.continues_shipped:
        started = Path(config.get("checkpoint") or "")
        if not started.is_file() or started.resolve() != entry.path.resolve():
            raise SystemExit(
                f"{args.run} did not start from the shipped {entry.path} (its checkpoint: {started})"
            )
        shipped_metrics = entry.path.with_suffix(".metrics.jsonl").read_text()  # read before it is replaced
    for key, want in (
        ("model", entry.model),
        ("num_classes", entry.num_classes),
        ("img_size", entry.img_size),
    ):
        if config[key] != want:
            raise SystemExit(f"{args.run}: {key} is {config[key]!r}, the entry {args.name!r} wants {want!r}")
    if config["model_kwargs"] != entry.model_kwargs:
        raise SystemExit(f"{args.run}: model_kwargs {config['model_kwargs']} != {entry.model_kwargs}")
    weights = load_file(str(args.run / "model.safetensors"))
    val = build_dataset(entry.dataset, split="val", limit=256)
    images = torch.stack([val[i][0] for i in range(len(val))])
    for storage in (torch.float16, torch.float32):  # fp16 when the fp32 logits stay within 1e-3
        stored = {k: v.to(storage).contiguous() for k, v in weights.items()}
        save_file(stored, str(entry.path), {"name": args.name})
        shipped = pretrained(args.name)
        reference = pretrained(args.name)
        reference.load_state_dict(weights)
        with torch.no_grad():
            gap = (shipped(images) - reference(images)).abs().max().item()
        print(f"{storage}: fp32 logits move by {gap:.2e}")
        if gap <= 1e-3:
            break

    metrics = stage_metrics(shipped_metrics, [*args.previous, args.run])
    entry.path.with_suffix(".metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    top1 = [m["val_top1"] for m in metrics]
    tail = max(1, math.ceil(0.2 * len(top1)))  # the epochs the card names
    gain = plateau_gain(top1)
    rows = "\n".join(
        f"| {m['epoch']} | {m['stage']} | {m['train_loss']:.4f} | {m['val_top1']:.2f} | {m['val_top5']:.2f} | {m['lr']:.2e} |"
        for m in metrics
    )
    entry.card.write_text(
        f"""# {args.name}: the shipped dense model

- Architecture: timm `{entry.model}` with {entry.model_kwargs}, {entry.img_size}x{entry.img_size} input,
  {entry.num_classes} classes; weights stored in {str(storage).removeprefix("torch.")} ({entry.path.name}, fp16 is used only
  when the fp32 logits stay within 1e-3), logits within {gap:.1e} of the trained weights on 256 validation canvases.
- Data: `{entry.dataset}` training split (55000 Fashion-MNIST training items, a fresh layout every epoch);
  validation = the 5000 held-out training items (fixed canvases). The test split was not used.
- Command: `{args.command}` (it trains {", ".join(f"`{r}`" for r in [*args.previous, args.run])}{" after the stages shipped before" if args.continues_shipped else ""}, each stage
  from the previous one's weights, then ships the last with `scripts/ship_pretrained.py`). {args.note}
- Machine: {machine_description()}. Date shipped: {today()}.
- Final validation top-1 {top1[-1]:.2f}% (top-5 {metrics[-1]["val_top5"]:.2f}%). The last {tail} of {len(top1)} epochs
  (20%) added {gain:+.2f} pt: {"plateaued (< 0.3 pt)" if abs(gain) < 0.3 else "NOT plateaued by the 0.3 pt rule"}.

| epoch | stage | train loss | val top-1 | val top-5 | lr |
|---:|---:|---:|---:|---:|---:|
{rows}
"""
    )
    print(f"wrote {entry.path}, {entry.card} (val top-1 {top1[-1]:.2f}%, last-20% gain {gain:+.2f} pt)")


if __name__ == "__main__":
    main()
