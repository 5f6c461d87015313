"""A-ViT speed vs the dense model and the FLOP ratio, written to benchmarks/results/.

    .venv/bin/python benchmarks/bench_avit.py                            # CPU fp32, batch 32 and 1
    .venv/bin/python benchmarks/bench_avit.py --device cuda --dtype bfloat16 --batch-sizes 256 1

Batches mix plain (flat colour) and busy (noise) images, so images halt at different depths; with
random weights, gate centres 2-5 at gate scale 10 make tokens halt at all depths. The bound is the
ratio of executed FLOPs (dense / A-ViT: tokens still running, in images whose class token still
runs). Target: speedup >= 0.9 of that ratio.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from results_dir import add_update_flag, results_folder

from tokensparse.bench import DTYPES, bench_avit, write_results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["deit_tiny_patch16_224", "deit_small_patch16_224"])
    parser.add_argument("--gate-centers", type=float, nargs="+", default=[3.0, 5.0])
    parser.add_argument("--gate-scale", type=float, default=10.0)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1])
    parser.add_argument("--rounds", type=int, nargs="+", default=[20, 100], help="rounds per batch size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--out", default=None, help="result file stem (default: avit_<device>_<dtype>)")
    add_update_flag(parser)
    args = parser.parse_args()
    rounds = args.rounds + [args.rounds[-1]] * (len(args.batch_sizes) - len(args.rounds))
    results = []
    for model in args.models:
        for batch, n in zip(args.batch_sizes, rounds):
            result = bench_avit(
                model,
                gate_centers=args.gate_centers,
                gate_scale=args.gate_scale,
                batch_size=batch,
                rounds=n,
                warmup=3,
                device=args.device,
                dtype=DTYPES[args.dtype],
            )
            print(f"{model} batch {batch}:\n{result.table()}\n", flush=True)
            results.append(result)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/bench_avit.py", *sys.argv[1:]])
    path = write_results(
        results_folder(args),
        args.out or f"avit_{args.device.split(':')[0]}_{args.dtype}",
        "A-ViT throughput on batches mixing plain and busy images",
        command,
        results,
        "one process; dense and A-ViT (inference form: halted tokens removed, images whose class token "
        "halted leave the batch) timed round by round in rotating order; median seconds per batch; random "
        "weights; bound = executed-FLOP ratio dense / A-ViT on the same batch; share of bound = speedup / bound; "
        "at batch 1 also timed: timm's dense blocks on A-ViT's own per-block token counts, stopping where the "
        "image exits (`tokensparse.bench.truncated_forward`: A-ViT with zero bookkeeping)",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
