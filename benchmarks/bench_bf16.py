"""bf16 inference on CPU: speed next to fp32, and what it costs in top-1 on the study's test split.

    .venv/bin/python benchmarks/bench_bf16.py            # after `tokensparse demo --study` (runs/study)

Speed: dense, DynamicViT rho 0.7 and A-ViT (gate scale 10, centre 3, on the mixed busy/plain batch of
benchmarks/bench_avit.py) on DeiT-S with random weights, batch 32, each in float32 and with the model
and images cast to bfloat16; all six timed round by round in rotating order in one process
(tokensparse.bench.interleaved), medians. Top-1: the shipped dense model, the study's DynamicViT 0.7
and its reported A-ViT (gate centre as in the study's results.json) on all 10000 items of the
cluttered Fashion-MNIST test split, in float32 and in bfloat16. Writes
benchmarks/results/bf16_cpu.md. Needs a CPU with bf16 support (AVX-512 BF16 / AMX) to be fast.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import timm
import torch
from results_dir import add_update_flag, results_folder

import tokensparse
from tokensparse.bench import interleaved, machine_description, mixed_batch, today
from tokensparse.data import build_dataset, build_loader
from tokensparse.train import load_trained

RESULTS = Path(__file__).resolve().parent / "results"


def speed(rounds: int, batch: int) -> list[tuple[str, float, float]]:
    torch.manual_seed(0)
    dense = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    models = {
        "dense": dense,
        "dynamicvit 0.7": tokensparse.dynamicvit(copy.deepcopy(dense), keep_ratio=0.7).eval(),
        "avit (centre 3)": tokensparse.avit(copy.deepcopy(dense), gate_scale=10.0, gate_center=3.0).eval(),
    }
    images = mixed_batch(batch, (224, 224), 0)
    contenders = {}
    for name, model in models.items():
        for dtype in (torch.float32, torch.bfloat16):
            m, x = copy.deepcopy(model).to(dtype), images.to(dtype)
            contenders[f"{name} / {str(dtype).removeprefix('torch.')}"] = lambda m=m, x=x: m(x)
    with torch.inference_mode():
        timings = interleaved(contenders, rounds=rounds, warmup=2)
    base = timings["dense / float32"].median
    return [(n, base / t.median, t.spread) for n, t in timings.items()]


def top1(model: torch.nn.Module, loader, dtype: torch.dtype) -> float:
    model = copy.deepcopy(model).eval().to(dtype)
    hits = total = 0
    with torch.inference_mode():
        for images, labels, *_ in loader:
            hits += (model(images.to(dtype)).float().argmax(-1) == labels).sum().item()
            total += len(labels)
    return 100.0 * hits / total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--study", type=Path, default=Path("runs/study"), help="the study's work folder")
    parser.add_argument(
        "--study-report", type=Path, default=RESULTS / "study", help="the study's report (results.json)"
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="default: bf16_cpu.md in the results folder")
    add_update_flag(parser)
    args = parser.parse_args()
    args.out = args.out or results_folder(args) / "bf16_cpu.md"

    study = json.loads((args.study_report / "results.json").read_text())
    avit_row = study["results"]["avit"]  # the reported A-ViT: the full-budget run, or the chosen grid run
    avit_run = avit_row["grid_run"] if avit_row.get("budget") == "grid" else "avit"
    missing = [
        name for name in ("dynamicvit@0.7", avit_run) if not (args.study / name / "config.json").is_file()
    ]
    if missing:
        raise SystemExit(
            f"the study's runs {missing} are not in {args.study}: make them with `tokensparse demo --study` "
            "(or pass --study FOLDER, the work folder that holds them)"
        )
    rows = speed(args.rounds, args.batch_size)
    center = avit_row["gate_center_evaluated"]
    models = {
        "dense (shipped)": tokensparse.pretrained(study["config"]["teacher"]),
        "dynamicvit@0.7": load_trained(args.study / "dynamicvit@0.7")[0],
        f"avit (gate centre {center:g}, as trained)": load_trained(args.study / avit_run)[0],
    }
    test = build_dataset("fashion-mnist-clutter", split="test", limit=args.test_limit)
    loader = build_loader(test, 250, is_training=False)
    accuracy = []
    for name, model in models.items():
        fp32, bf16 = top1(model, loader, torch.float32), top1(model, loader, torch.bfloat16)
        accuracy.append((name, fp32, bf16))
        print(name, fp32, bf16, flush=True)

    lines = [
        "# bf16 inference on CPU",
        "",
        "- command: `.venv/bin/python benchmarks/bench_bf16.py"
        + ("" if args.rounds == 10 else f" --rounds {args.rounds}")
        + "`",
        f"- date: {today()}",
        f"- machine: {machine_description('cpu')}",
        "- bf16: the model and the images cast to torch.bfloat16 (no autocast); fp32 otherwise identical",
        "",
        f"## Speed: DeiT-S, batch {args.batch_size}, random weights, mixed busy/plain images, "
        f"{args.rounds} interleaved rounds (medians)",
        "",
        "| contender | speedup vs dense float32 | IQR/median |",
        "|---|---:|---:|",
    ]
    lines += [f"| {n} | {s:.2f}x | {100 * spread:.1f}% |" for n, s, spread in rows]
    lines += [
        "",
        f"## Top-1 on the study's test split ({len(test)} items), from the study's models (`{args.study}`)",
        "",
        "| model | float32 top-1 (%) | bfloat16 top-1 (%) | change (pt) |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {n} | {a:.2f} | {b:.2f} | {b - a:+.2f} |" for n, a, b in accuracy]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
