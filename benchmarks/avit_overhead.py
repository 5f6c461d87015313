"""Where A-ViT's batch-1 time goes outside timm's blocks: wall time per engine hook.

    .venv/bin/python benchmarks/avit_overhead.py

Issue 12 item 4 asks A-ViT at batch 1 to run at >= 0.85 of its executed-FLOP ratio, the halting
bookkeeping no longer the cost. This wraps the A-ViT policy's hooks (and the engine's embedding) in
wall-clock timers and runs the same batch-1 forward as benchmarks/bench_avit.py (random weights,
one plain-or-busy image, gate scale 10, gate centre 3), next to the dense blocks run on A-ViT's own
per-block token counts (`tokensparse.bench.truncated_forward`, the bound), in rotating order.
`run_block` is the blocks themselves; everything else is overhead a zero-cost implementation would
not pay. Writes benchmarks/results/avit_overhead.md. Run it alone: it is a timing.
"""

from __future__ import annotations

import argparse
import collections
import copy
import inspect
import statistics
import time
from pathlib import Path

import timm
import torch

import tokensparse
from tokensparse import engine
from tokensparse.bench import machine_description, mixed_batch, today, truncated_forward
from tokensparse.policies import avit as avit_module

HOOKS = (
    "begin",
    "before_block",
    "run_block",
    "after_block",
    "end",
    "halting_score",
    "halting_step_",
    "_repack",
    "_pack_end",
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["deit_tiny_patch16_224", "deit_small_patch16_224"])
    parser.add_argument("--gate-center", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "avit_overhead.md")
    args = parser.parse_args()

    spent: dict[str, float] = collections.defaultdict(float)

    def timed(owner, name: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                spent[name] += time.perf_counter() - start

        static = isinstance(inspect.getattr_static(owner, name), staticmethod)
        setattr(owner, name, staticmethod(wrapper) if static else wrapper)

    for name in HOOKS:
        timed(avit_module.AViTPolicy, name)
    timed(engine, "embed")

    lines = [
        "# A-ViT at batch 1: wall time per engine hook",
        "",
        "- command: `.venv/bin/python benchmarks/avit_overhead.py`",
        f"- date: {today()}",
        f"- machine: {machine_description('cpu')}",
        f"- method: random weights, one image (`tokensparse.bench.mixed_batch(1)`), gate scale 10, gate centre "
        f"{args.gate_center:g}, inference form; {args.rounds} rounds, A-ViT, its bound (timm's blocks on A-ViT's own "
        "per-block token counts) and dense in rotating order; medians per forward. Hooks nest: `after_block` "
        "includes `halting_score`, `halting_step_` and `_repack`; `end` includes `_pack_end`.",
        "",
    ]
    for model_name in args.models:
        torch.manual_seed(0)
        dense = timm.create_model(model_name, pretrained=False).eval()
        images = mixed_batch(1, tuple(dense.patch_embed.img_size), 0)
        sparse = tokensparse.avit(copy.deepcopy(dense), gate_scale=10.0, gate_center=args.gate_center).eval()
        with torch.no_grad():
            sparse(images)
        counts = [max(int(c), 1) for c in tokensparse.sparsity_info(sparse).tokens_per_block[0].tolist()]
        runs = {
            "avit": lambda s=sparse, x=images: s(x),
            "bound": lambda d=dense, x=images, c=counts: truncated_forward(d, x, c),
            "dense": lambda d=dense, x=images: d(x),
        }
        totals: dict[str, list[float]] = {k: [] for k in runs}
        per_hook: dict[str, list[float]] = collections.defaultdict(list)
        with torch.no_grad():
            for _ in range(3):
                for run in runs.values():
                    run()
            for r in range(args.rounds):
                order = list(runs)[r % 3 :] + list(runs)[: r % 3]
                for key in order:
                    spent.clear()
                    start = time.perf_counter()
                    runs[key]()
                    totals[key].append(time.perf_counter() - start)
                    if key == "avit":
                        for name in (*HOOKS, "embed"):
                            per_hook[name].append(spent.get(name, 0.0))
        ms = {k: 1e3 * statistics.median(v) for k, v in totals.items()}
        hooks = {k: 1e3 * statistics.median(v) for k, v in per_hook.items()}
        outside = ms["avit"] - hooks["run_block"] - hooks["embed"]
        print(model_name, ms, hooks, flush=True)
        lines += [
            f"## {model_name}, batch 1",
            "",
            f"Per-block token counts: {counts}.",
            "",
            "| forward | ms (median) |",
            "|---|---:|",
            *(f"| {k} | {v:.2f} |" for k, v in ms.items()),
            "",
            "| A-ViT hook | ms per forward (median) |",
            "|---|---:|",
            *(f"| {k} | {v:.2f} |" for k, v in hooks.items()),
            f"| everything outside the blocks and the embedding | {outside:.2f} |",
            "",
            f"A-ViT {ms['dense'] / ms['avit']:.2f}x dense, the bound {ms['dense'] / ms['bound']:.2f}x; the blocks "
            f"inside A-ViT take {hooks['run_block']:.2f} ms against the bound's whole forward of {ms['bound']:.2f} ms.",
            "",
        ]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
