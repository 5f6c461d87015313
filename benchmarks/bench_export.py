"""Dense vs DynamicViT where users deploy: eager PyTorch, torch.compile and onnxruntime, one process.

    .venv/bin/python benchmarks/bench_export.py                  # DeiT-S, CPU fp32, batch 32 and 1
    .venv/bin/python benchmarks/bench_export.py --rounds 1 1 --out smoke   # smoke test

For each batch size the six contenders (dense and DynamicViT rho 0.7, each eager, compiled and exported
to ONNX) are timed round by round in rotating order in one process; medians. Random weights (speed does
not depend on them; DynamicViT's token counts do not depend on the image). Writes
benchmarks/results/export_<device>_<dtype>.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import tempfile
from pathlib import Path

import timm
import torch
from results_dir import add_update_flag, results_folder

import tokensparse
from tokensparse.bench import BenchRow, executed_gflops, make_result, time_contenders, write_results
from tokensparse.export import export_onnx, onnx_session, run_onnx

BACKENDS = ("eager", "torch.compile", "onnxruntime")


def bench_batch(model_name: str, keep_ratio: float, batch: int, rounds: int, warmup: int, folder: Path):
    torch.manual_seed(0)
    dense = timm.create_model(model_name, pretrained=False).eval()
    sparse = tokensparse.dynamicvit(copy.deepcopy(dense), keep_ratio=keep_ratio).eval()
    images = torch.randn(batch, 3, *dense.patch_embed.img_size)
    contenders, models = {}, {"dense": dense, "dynamicvit": sparse}
    for name, model in models.items():
        contenders[f"{name}/eager"] = lambda m=model: m(images)
        compiled = torch.compile(model, fullgraph=True)
        contenders[f"{name}/torch.compile"] = lambda m=compiled: m(images)
        path = export_onnx(model, folder / f"{name}_b{batch}.onnx", batch_size=batch).path
        session = onnx_session(path)
        contenders[f"{name}/onnxruntime"] = lambda s=session: run_onnx(s, images)
    seconds = time_contenders(contenders, f"export b{batch}", rounds, warmup, "cpu", True)
    rows = []
    for name, model in models.items():
        flops = executed_gflops(model, images[:1])
        for backend in BACKENDS:
            timing = seconds[f"{name}/{backend}"]
            t = timing.median
            rows.append(
                BenchRow(
                    name,
                    backend,
                    flops,
                    batch / t,
                    seconds[f"dense/{backend}"].median / t,
                    spread=timing.spread,
                )
            )
    return make_result(model_name, batch, "cpu", torch.float32, rounds, rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--keep-ratio", type=float, default=0.7)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1])
    parser.add_argument("--rounds", type=int, nargs="+", default=[30, 200], help="rounds per batch size")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="export_cpu_float32", help="result file stem")
    add_update_flag(parser)
    args = parser.parse_args()
    rounds = args.rounds + [args.rounds[-1]] * (len(args.batch_sizes) - len(args.rounds))
    results = []
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        for batch, n in zip(args.batch_sizes, rounds):
            result = bench_batch(args.model, args.keep_ratio, batch, n, args.warmup, Path(folder))
            print(f"batch {batch}:\n{result.table()}\n", flush=True)
            results.append(result)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/bench_export.py", *sys.argv[1:]])
    path = write_results(
        results_folder(args),
        args.out,
        f"Exported models: dense vs DynamicViT (keep ratio {args.keep_ratio}), {args.model}, CPU float32",
        command,
        results,
        "one process per batch size; dense and DynamicViT each run eagerly, through torch.compile(fullgraph="
        "True) and as an ONNX file in onnxruntime (CPU provider, torch's thread count), all six timed round by "
        "round in rotating order; median seconds per batch; random weights; the setting column names the "
        "backend; speedup = the same backend's dense median / contender median (images/s compares backends)",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
