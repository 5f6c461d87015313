"""DynamicViT speed vs the dense model and the truncation bound, written to benchmarks/results/.

    .venv/bin/python benchmarks/bench_dynamicvit.py                      # CPU fp32, batch 32 and 1
    .venv/bin/python benchmarks/bench_dynamicvit.py --device cuda --dtype bfloat16 --batch-sizes 256 1
    .venv/bin/python benchmarks/bench_dynamicvit.py --authors-code /path/to/DynamicViT   # + the authors' code

One process, contenders interleaved round by round, medians; random weights (speed does not depend
on them). Two bounds: truncation (dense blocks on pre-sliced token counts) and predictor (the same plus
the predictor MLPs' matmuls, no top-k/gather). Targets: >= 0.98 of the truncation bound; the authors' implementation measured
1.58-1.62x dense at batch 32 and 1.25-1.37x at batch 1 on a 2-core CPU here.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from authors import authors_dynamicvit
from results_dir import add_update_flag, results_folder

from tokensparse.bench import DTYPES, bench_dynamicvit, write_results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--keep-ratio", type=float, default=0.7)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1])
    parser.add_argument("--rounds", type=int, nargs="+", default=[30, 200], help="rounds per batch size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument(
        "--authors-code",
        default=None,
        help="a checkout of the authors' DynamicViT repository, to time their code in the same run",
    )
    parser.add_argument("--out", default=None, help="result file stem (default: dynamicvit_<device>_<dtype>)")
    add_update_flag(parser)
    args = parser.parse_args()
    rounds = args.rounds + [args.rounds[-1]] * (len(args.batch_sizes) - len(args.rounds))
    results = []
    for batch, n in zip(args.batch_sizes, rounds):
        result = bench_dynamicvit(
            args.model,
            keep_ratios=[args.keep_ratio],
            batch_size=batch,
            rounds=n,
            warmup=3,
            device=args.device,
            dtype=DTYPES[args.dtype],
            also_time=(
                {
                    "authors' DynamicViT": lambda dense, ratio: authors_dynamicvit(
                        args.authors_code, dense, ratio
                    )
                }
                if args.authors_code
                else None
            ),
        )
        print(f"batch {batch}:\n{result.table()}\n", flush=True)
        results.append(result)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/bench_dynamicvit.py", *sys.argv[1:]])
    path = write_results(
        results_folder(args),
        args.out or f"dynamicvit_{args.device.split(':')[0]}_{args.dtype}",
        f"DynamicViT throughput: {args.model}, keep ratio {args.keep_ratio}",
        command,
        results,
        "one process; dense, DynamicViT and the truncation bound (the same dense timm blocks fed pre-sliced "
        "token counts: pruning with zero overhead) timed round by round in rotating order; median seconds "
        "per batch; random weights; speedup = dense median / contender median; share of bound = speedup / "
        "bound speedup; predictor bound = the truncation bound plus the predictor MLPs run on the tokens before "
        "each pruning location (their matmuls, no top-k or gather), share of predictor bound = speedup / "
        "predictor bound speedup",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
