"""Foundation backbones: ToMe and EViT at about 35% fewer FLOPs against the dense model and their truncation
bound, on DINOv2-S, CLIP-B, SigLIP-B and EVA02-S (timm), CPU float32, batch 32 and 1, one process.

    .venv/bin/python benchmarks/bench_backbones.py --update-results      # the README's speed table
    .venv/bin/python benchmarks/bench_backbones.py --rounds 1 1 --warmup 0 --models eva02_small   # smoke

For each model and batch size the contenders run round by round in rotating order: the dense model, each
method at `--reduction` of the dense GMACs (`target_gflops=`: ToMe's r schedule and EViT's keep rate solved
for it, within 2%), and each method's truncation bound (the dense blocks on the method's token counts,
sliced between attention and MLP where it reduces them: reduction with zero overhead; rotary positions
and relative-position bias carried). EViT needs a class token: SigLIP has none. Medians; random weights
(the token counts are fixed by the budget, so the speed does not depend on them). Writes
benchmarks/results/backbones_cpu_float32.{md,json} with --update-results (else runs/bench/).
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys

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
from tokensparse.flops import input_size

# name in the table -> (timm model, its arguments: 224 px images, the size the others run at)
MODELS = {
    "dinov2_small": ("vit_small_patch14_dinov2", dict(img_size=224)),
    "clip_base": ("vit_base_patch16_clip_224", {}),
    "siglip_base": ("vit_base_patch16_siglip_224", {}),
    "eva02_small": ("eva02_small_patch14_224", {}),
}


def bench(key: str, batch: int, reduction: float, rounds: int, warmup: int):
    name, kwargs = MODELS[key]
    torch.manual_seed(0)
    dense = timm.create_model(name, pretrained=False, **kwargs).eval()
    images = torch.randn(batch, *input_size(dense))
    dense_gflops = executed_gflops(dense, images[:1])
    target = (1 - reduction) * dense_gflops
    contenders = {"dense": lambda: dense(images)}
    flops = {"dense": dense_gflops}
    methods = {"tome": tokensparse.tome, "evit": tokensparse.evit}
    if getattr(dense, "cls_token", None) is None:
        methods.pop("evit")
    for method, make in methods.items():
        sparse = make(copy.deepcopy(dense), target_gflops=target).eval()
        sparse(images)
        info = tokensparse.sparsity_info(sparse)
        counts, mlp = info.tokens_per_block[0].tolist(), info.mlp_tokens[0].tolist()
        contenders[method] = lambda s=sparse: s(images)
        contenders[f"{method} bound"] = lambda c=counts, m=mlp: truncated_forward(dense, images, c, m)
        flops[method] = executed_gflops(sparse, images[:1])
    seconds = time_contenders(contenders, f"{key} b{batch}", rounds, warmup, "cpu", True)
    base = seconds["dense"].median
    rows = [BenchRow("dense", name, dense_gflops, batch / base, 1.0, None, seconds["dense"].spread)]
    for method in methods:
        timing, bound = seconds[method], seconds[f"{method} bound"]
        rows.append(
            BenchRow(
                method,
                f"{name}, {flops[method] / dense_gflops:.0%} of dense GMACs",
                flops[method],
                batch / timing.median,
                base / timing.median,
                base / bound.median,
                timing.spread,
                bound_spread=bound.spread,
            )
        )
    return make_result(key, batch, "cpu", torch.float32, rounds, rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1])
    parser.add_argument("--rounds", type=int, nargs="+", default=[8, 40], help="rounds per batch size")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reduction", type=float, default=0.35, help="share of the dense GMACs to remove")
    parser.add_argument("--out", default="backbones_cpu_float32", help="result file stem")
    add_update_flag(parser)
    args = parser.parse_args()
    rounds = args.rounds + [args.rounds[-1]] * (len(args.batch_sizes) - len(args.rounds))
    results = []
    with torch.no_grad():
        for key in args.models:
            for batch, n in zip(args.batch_sizes, rounds):
                result = bench(key, batch, args.reduction, n, args.warmup)
                print(f"{key} batch {batch}:\n{result.table()}\n", flush=True)
                results.append(result)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/bench_backbones.py", *sys.argv[1:]])
    path = write_results(
        results_folder(args),
        args.out,
        f"Foundation backbones: ToMe and EViT at {args.reduction:.0%} fewer GMACs, CPU float32",
        command,
        results,
        "one process; per model and batch size the dense model, ToMe and EViT at the budget (target_gflops) and "
        "each one's truncation bound (the dense blocks on its token counts) timed round by round in rotating "
        "order; median seconds per batch; random weights; speedup = dense median / contender median; bound = "
        "dense median / bound median; share of bound = speedup / bound",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
