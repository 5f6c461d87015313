"""Where DiffRate's time goes beyond its truncation bound: torch's profiler over DiffRate's forward and the
bound's, DeiT-S at the authors' 2.9-GFLOPs counts, CPU float32, ATen self time by operator.

    .venv/bin/python benchmarks/diffrate_overhead.py --update-results

The bound (`truncated_forward`) runs the dense blocks on DiffRate's token counts; DiffRate runs the same
blocks plus, in 11 of 12 blocks, the class token's attention row, a top-k and gather of the kept tokens,
the merge's cosine similarities and scatter, and attention with the token sizes as a mask. The table
groups operators into the blocks' own work (linears, attention, norms, activations, residuals) and the
rest, and gives each group's self time per forward for both: the time DiffRate's selection and merging
take, and whether the blocks themselves run as fast as the bound's. Random weights (the counts are fixed).
Writes
benchmarks/results/diffrate_overhead.md with --update-results (else runs/bench/).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import shlex
import sys
from collections import defaultdict

import timm
import torch
from results_dir import add_update_flag, results_folder
from torch.profiler import ProfilerActivity, profile

import tokensparse
from tokensparse.bench import truncated_forward
from tokensparse.bench.timing import machine_description

# the blocks' own operators (what the truncation bound also runs); everything else is DiffRate's
BLOCK_OPS = (
    "aten::addmm",
    "aten::mm",
    "aten::bmm",
    "aten::linear",
    "aten::matmul",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::native_layer_norm",
    "aten::gelu",
    "aten::add",
    "aten::mul",
    "aten::convolution",
    "aten::_convolution",
    "aten::mkldnn_convolution",
)


def self_times(run, iterations: int) -> dict[str, float]:
    """Mean self CPU seconds per forward of each ATen operator in `iterations` profiled calls of `run`."""
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iterations):
            run()
    times: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            times[event.key] += event.self_cpu_time_total / 1e6 / iterations
    return dict(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=10)
    add_update_flag(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    dense = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    sparse = tokensparse.diffrate(copy.deepcopy(dense), published=2.9).eval()
    images = torch.randn(args.batch_size, 3, 224, 224)
    with torch.no_grad():
        sparse(images)
        info = tokensparse.sparsity_info(sparse)
        counts, mlp = info.tokens_per_block[0].tolist(), info.mlp_tokens[0].tolist()
        runs = {
            "diffrate": self_times(lambda: sparse(images), args.iterations),
            "bound": self_times(lambda: truncated_forward(dense, images, counts, mlp), args.iterations),
        }
    groups = {name: defaultdict(float) for name in runs}
    for name, times in runs.items():
        for op, seconds in times.items():
            groups[name]["blocks' operators" if op in BLOCK_OPS else op] += seconds
    total = {name: sum(times.values()) for name, times in runs.items()}
    rows = sorted(
        set(groups["diffrate"]) | set(groups["bound"]), key=lambda k: -groups["diffrate"].get(k, 0.0)
    )
    lines = [
        "# DiffRate's time beyond its truncation bound (profiler self time)",
        "",
        "- command: `python "
        + " ".join(shlex.quote(a) for a in ["benchmarks/diffrate_overhead.py", *sys.argv[1:]])
        + "`",
        f"- machine: {machine_description('cpu')}",
        f"- date: {datetime.date.today().isoformat()}",
        f"- model: deit_small_patch16_224 (random weights), DiffRate published=2.9, batch {args.batch_size}, "
        f"{args.iterations} profiled forwards each after one warm-up, torch.no_grad, float32",
        "",
        "| operator (self time, ms per forward) | DiffRate | bound | DiffRate share of its forward |",
        "|---|---:|---:|---:|",
    ]
    for key in rows:
        d, b = groups["diffrate"].get(key, 0.0), groups["bound"].get(key, 0.0)
        if d < 0.001 * total["diffrate"] and b < 0.001 * total["bound"]:
            continue
        lines.append(f"| {key} | {d * 1e3:.1f} | {b * 1e3:.1f} | {d / total['diffrate']:.1%} |")
    key = "blocks' operators"
    outside = total["diffrate"] - groups["diffrate"][key]
    bound_outside = total["bound"] - groups["bound"][key]
    lines += [
        f"| all ATen self time | {total['diffrate'] * 1e3:.1f} | {total['bound'] * 1e3:.1f} | 100% |",
        "",
        f"ATen self time per forward: DiffRate {total['diffrate'] * 1e3:.1f} ms, the bound "
        f"{total['bound'] * 1e3:.1f} ms (ratio {total['bound'] / total['diffrate']:.3f}). Outside the blocks' "
        f"operators DiffRate spends {outside * 1e3:.1f} ms ({outside / total['diffrate']:.1%} of its time), the "
        f"bound {bound_outside * 1e3:.1f} ms (its slicing copies); in the blocks' operators DiffRate "
        f"{groups['diffrate'][key] * 1e3:.1f} ms, the bound {groups['bound'][key] * 1e3:.1f} ms. What the "
        "operators do not account for (Python and dispatch between them) is the rest of a wall-clock gap.",
    ]
    path = results_folder(args) / "diffrate_overhead.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
