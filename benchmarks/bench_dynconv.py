"""Dynamic ConvNeXt-T and Swin-T speed vs the dense timm models, next to the executed-FLOP ratio.

    .venv/bin/python benchmarks/bench_dynconv.py                     # CPU fp32, rho 0.7, batch 32 and 1
    .venv/bin/python benchmarks/bench_dynconv.py --rounds 1 1 --batch-sizes 2 1 --img-size 64 \\
        --model-kwargs '{"depths": [1, 1, 9, 1]}' --results-dir /tmp/bench   # smoke test

One process per model, dense and dynamic timed round by round in rotating order (tokensparse.bench's
`interleaved`), medians, random weights (speed does not depend on them, the kept positions are
always int(N * ratio)). Writes benchmarks/results/dynconv_<device>_<dtype>.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
from pathlib import Path

import timm
import torch
from results_dir import add_update_flag, results_folder

from tokensparse.bench import (
    DTYPES,
    BenchResult,
    BenchRow,
    interleaved,
    machine_description,
    today,
    write_results,
)
from tokensparse.policies.dynspatial import dynamic_spatial, spatial_flops

MODELS = ("convnext_tiny", "swin_tiny_patch4_window7_224")


def bench_model(
    name: str,
    keep_ratio: float,
    batch_size: int,
    rounds: int,
    device: str,
    dtype: torch.dtype,
    img_size: int,
    model_kwargs: dict,
) -> BenchResult:
    torch.manual_seed(0)
    kwargs = dict(model_kwargs)
    if name.startswith("swin"):
        kwargs.setdefault("img_size", img_size)
    dense = timm.create_model(name, pretrained=False, **kwargs).eval()
    dynamic = dynamic_spatial(copy.deepcopy(dense), keep_ratio=keep_ratio).eval()
    size = (img_size, img_size)
    flops = {"dense": spatial_flops(dense, size), "dynamic": spatial_flops(dynamic, size)}  # fp32 CPU, eval
    dense, dynamic = dense.to(device=device, dtype=dtype), dynamic.to(device=device, dtype=dtype)
    images = torch.randn(batch_size, 3, *size, device=device, dtype=dtype)
    with torch.inference_mode():
        timings = interleaved(
            {"dense": lambda: dense(images), "dynamic": lambda: dynamic(images)},
            rounds=rounds,
            warmup=3,
            device=device,
        )
    dense_s, dynamic_s = timings["dense"].median, timings["dynamic"].median
    ratio = flops["dynamic"] / flops["dense"]
    rows = [
        BenchRow("dense", "-", flops["dense"] / 1e9, batch_size / dense_s, 1.0),
        BenchRow(
            "dynamic",
            f"keep_ratio={keep_ratio}, FLOPs {ratio:.3f}x dense",
            flops["dynamic"] / 1e9,
            batch_size / dynamic_s,
            dense_s / dynamic_s,
        ),
    ]
    return BenchResult(
        model=name,
        batch_size=batch_size,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        rounds=rounds,
        machine=machine_description(device),
        date=today(),
        rows=rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--keep-ratio", type=float, default=0.7)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1])
    parser.add_argument("--rounds", type=int, nargs="+", default=[30, 200], help="rounds per batch size")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument(
        "--model-kwargs", default="{}", help="JSON passed to timm.create_model (small smoke runs)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--results-dir", type=Path, default=None, help="default: the results folder")
    add_update_flag(parser)
    parser.add_argument("--out", default=None, help="result file stem (default: dynconv_<device>_<dtype>)")
    args = parser.parse_args()
    args.results_dir = args.results_dir or results_folder(args)
    rounds = args.rounds + [args.rounds[-1]] * (len(args.batch_sizes) - len(args.rounds))
    results = []
    for name in args.models:
        for batch, n in zip(args.batch_sizes, rounds):
            result = bench_model(
                name,
                args.keep_ratio,
                batch,
                n,
                args.device,
                DTYPES[args.dtype],
                args.img_size,
                json.loads(args.model_kwargs),
            )
            print(f"{name}, batch {batch}:\n{result.table()}\n", flush=True)
            results.append(result)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/bench_dynconv.py", *sys.argv[1:]])
    path = write_results(
        args.results_dir,
        args.out or f"dynconv_{args.device.split(':')[0]}_{args.dtype}",
        f"Dynamic ConvNeXt / Swin throughput, keep ratio {args.keep_ratio}",
        command,
        results,
        "one process per model; the dense timm model and its dynamic version (tokensparse.dynamic_convnext / "
        "dynamic_swin, gathered inference) timed round by round in rotating order; median seconds per batch; "
        "random weights; speedup = dense median / dynamic median; GFLOPs = executed multiply-adds per image "
        "(tokensparse.policies.dynspatial.spatial_flops); the tables are grouped by model in --models order",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
