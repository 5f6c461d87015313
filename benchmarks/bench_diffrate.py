"""DiffRate speed: dense vs DiffRate vs its truncation bound, eager and exported to onnxruntime, one process.

    .venv/bin/python benchmarks/bench_diffrate.py                  # DeiT-S at the authors' 2.9 GFLOPs counts
    .venv/bin/python benchmarks/bench_diffrate.py --rounds 1 1 --warmup 0   # smoke test
    .venv/bin/python benchmarks/bench_diffrate.py --compile   # also torch.compile of dense, DiffRate, bound

For each batch size (32 and 1) five contenders run round by round in rotating order in one process:
the dense model and DiffRate (the authors' searched DeiT-S counts at 2.9 GFLOPs, `published=2.9`),
each eager and as an ONNX file in onnxruntime (CPU provider), and the truncation bound (the same dense
timm blocks on DiffRate's token counts, sliced between each block's attention and MLP where DiffRate
reduces them: compression with zero overhead). With --compile, the three also compiled (torch.compile,
inductor, static shapes: DiffRate's counts are fixed), DiffRate against the compiled bound. Medians;
random weights (the counts are fixed, so the speed does not depend on them). Target: DiffRate at least
0.95 of the bound. Writes
benchmarks/results/diffrate_cpu_float32.{md,json} with --update-results (else runs/bench/).
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
from tokensparse.bench import (
    BenchRow,
    executed_gflops,
    make_result,
    time_contenders,
    truncated_forward,
    write_results,
)
from tokensparse.export import export_onnx, onnx_session, run_onnx


def bench_batch(
    model_name: str, budget: float, batch: int, rounds: int, warmup: int, folder: Path, compiled: bool = False
):
    torch.manual_seed(0)
    dense = timm.create_model(model_name, pretrained=False).eval()
    sparse = tokensparse.diffrate(copy.deepcopy(dense), published=budget).eval()
    images = torch.randn(batch, 3, *dense.patch_embed.img_size)
    sparse(images)
    info = tokensparse.sparsity_info(sparse)
    counts, mlp = info.tokens_per_block[0].tolist(), info.mlp_tokens[0].tolist()
    contenders = {
        "dense/eager": lambda: dense(images),
        "diffrate/eager": lambda: sparse(images),
        "bound/eager": lambda: truncated_forward(dense, images, counts, mlp),
    }
    for name, model in (("dense", dense), ("diffrate", sparse)):
        session = onnx_session(export_onnx(model, folder / f"{name}_b{batch}.onnx", batch_size=batch).path)
        contenders[f"{name}/onnxruntime"] = lambda s=session: run_onnx(s, images)
    backends = ["eager", "onnxruntime"]
    if compiled:  # torch.compile (inductor, static shapes) of all three; compiled once before timing
        backends.insert(1, "compiled")
        bound_fn = torch.compile(lambda im: truncated_forward(dense, im, counts, mlp), dynamic=False)
        for name, fn in (("dense", dense), ("diffrate", sparse), ("bound", bound_fn)):
            fn = fn if name == "bound" else torch.compile(fn, dynamic=False)
            fn(images)
            contenders[f"{name}/compiled"] = lambda f=fn: f(images)
    seconds = time_contenders(contenders, f"diffrate b{batch}", rounds, warmup, "cpu", True)
    dense_gflops, sparse_gflops = executed_gflops(dense, images[:1]), executed_gflops(sparse, images[:1])
    rows = []
    for backend in backends:
        base = seconds[f"dense/{backend}"].median
        timed_bound = f"bound/{backend}" in seconds
        bound = base / seconds[f"bound/{backend}"].median if timed_bound else None
        for name, flops in (("dense", dense_gflops), ("diffrate", sparse_gflops)):
            timing = seconds[f"{name}/{backend}"]
            rows.append(
                BenchRow(
                    name,
                    f"{backend}" + (f", published {budget:g}" if name == "diffrate" else ""),
                    flops,
                    batch / timing.median,
                    base / timing.median,
                    bound if name == "diffrate" else None,
                    timing.spread,
                    bound_spread=seconds[f"bound/{backend}"].spread
                    if name == "diffrate" and timed_bound
                    else None,
                )
            )
    return make_result(model_name, batch, "cpu", torch.float32, rounds, rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument(
        "--published", type=float, default=2.9, help="the authors' budget whose counts to time"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1])
    parser.add_argument("--rounds", type=int, nargs="+", default=[30, 200], help="rounds per batch size")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="diffrate_cpu_float32", help="result file stem")
    parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile of dense, DiffRate and the bound"
    )
    add_update_flag(parser)
    args = parser.parse_args()
    rounds = args.rounds + [args.rounds[-1]] * (len(args.batch_sizes) - len(args.rounds))
    results = []
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        for batch, n in zip(args.batch_sizes, rounds):
            result = bench_batch(
                args.model, args.published, batch, n, args.warmup, Path(folder), args.compile
            )
            print(f"batch {batch}:\n{result.table()}\n", flush=True)
            results.append(result)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/bench_diffrate.py", *sys.argv[1:]])
    path = write_results(
        results_folder(args),
        args.out,
        f"DiffRate throughput: {args.model} at the authors' {args.published:g} GFLOPs counts, CPU float32",
        command,
        results,
        "one process per batch size; dense and DiffRate each eager, "
        + ("compiled (torch.compile, inductor, static shapes), " if args.compile else "")
        + "and as an ONNX file in onnxruntime (CPU provider), and the truncation bound (dense timm blocks on "
        "DiffRate's token counts, sliced between attention and MLP where it reduces them; eager"
        + (" and compiled" if args.compile else "")
        + "), timed round by round in rotating order; median seconds per batch; random weights; speedup = the "
        "same backend's dense median / contender median; bound = that backend's dense / bound median; share of "
        "bound = speedup / bound",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
