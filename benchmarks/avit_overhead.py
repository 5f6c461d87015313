"""Where A-ViT's batch-1 time goes outside timm's blocks: wall time per engine hook.

    .venv/bin/python benchmarks/avit_overhead.py

Issue 12 item 4 asks A-ViT at batch 1 to run at >= 0.85 of its executed-FLOP ratio, the halting
bookkeeping no longer the cost. This wraps the A-ViT policy's hooks (and the engine's embedding) in
wall-clock timers and runs the same batch-1 forward as benchmarks/bench_avit.py (random weights,
one plain-or-busy image, gate scale 10, gate centre 3), next to the dense blocks run on A-ViT's own
per-block token counts (`tokensparse.bench.truncated_forward`, the bound), in rotating order.
`run_block` is the blocks themselves; everything else is overhead a zero-cost implementation would
not pay. It also counts the ATen ops each hook dispatches, and times a few small tensor ops and a
short Python list comprehension alone and right after one of the model's blocks (what the
bookkeeping's work costs where it runs), and the per-block halting step eager against
torch.compile (the one fusion PyTorch offers without a hand-written kernel). Writes
benchmarks/results/avit_overhead.md. Run it alone: it is a timing.
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
from results_dir import add_update_flag, results_folder
from torch.utils._python_dispatch import TorchDispatchMode

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
    parser.add_argument(
        "--out", type=Path, default=None, help="default: avit_overhead.md in the results folder"
    )
    add_update_flag(parser)
    args = parser.parse_args()
    args.out = args.out or results_folder(args) / "avit_overhead.md"

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
        counts = [int(c) for c in tokensparse.sparsity_info(sparse).tokens_per_block[0].tolist()]
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
        ops = ops_per_forward(sparse, images)
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
            "ATen ops (views included) per forward: "
            + ", ".join(f"`{name}` {count}" for name, count in ops.items())
            + f" ({ops['after_block'] / len(dense.blocks):.0f} per block after the blocks).",
            "",
            f"A-ViT {ms['dense'] / ms['avit']:.2f}x dense, the bound {ms['dense'] / ms['bound']:.2f}x; the blocks "
            f"inside A-ViT take {hooks['run_block']:.2f} ms against the bound's whole forward of {ms['bound']:.2f} ms.",
            "",
        ]
    lines += cold_ops_section(args.models[0])
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


class _CountOps(TorchDispatchMode):
    """Counts the ATen ops dispatched inside it (views included)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_forward(model: torch.nn.Module, images: torch.Tensor) -> dict[str, int]:
    """ATen ops dispatched by each A-ViT hook in one forward (outside the blocks: the bookkeeping)."""
    counted: dict[str, int] = collections.defaultdict(int)
    originals = {name: getattr(avit_module.AViTPolicy, name) for name in ("begin", "after_block", "end")}

    def counting(name: str, inner):
        def wrapper(*a, **k):
            with _CountOps() as mode:
                try:
                    return inner(*a, **k)
                finally:
                    counted[name] += mode.count

        return wrapper

    try:
        for name, inner in originals.items():
            setattr(avit_module.AViTPolicy, name, counting(name, inner))
        with torch.no_grad():
            model(images)
    finally:
        for name, inner in originals.items():
            setattr(avit_module.AViTPolicy, name, inner)
    return dict(counted)


def cold_ops_section(model_name: str, rounds: int = 300) -> list[str]:
    """What a few small ops (and a little Python) cost alone and right after one of the model's blocks."""
    torch.manual_seed(0)
    dense = timm.create_model(model_name, pretrained=False).eval()
    block, tokens = dense.blocks[6], 110
    x = torch.randn(1, tokens, dense.embed_dim)
    cumulative, values = torch.zeros(tokens), [0.1 * i for i in range(tokens)]

    def tensor_ops():  # the halting score and the cumulative sum: select, mul, sub, sigmoid, add_
        cumulative.add_(torch.sigmoid(x[0, :, 0] * 10.0 - 3.0))

    def python_list():
        return [v + 1.0 for v in values if v < 1e9]

    def halting_step(y, rows, acc):  # one block's halting rule on the pack, as AViTPolicy runs it
        h = torch.sigmoid(y[:, 0] * 10.0 - 3.0)
        cumulative = rows[0] + h
        runs_on = cumulative < 0.99
        ponder_step = rows[1] * (cumulative > 0.99)
        weight = torch.where(runs_on, h, ponder_step)
        counts = (rows[2:4] * runs_on).sum(1)
        return cumulative, rows[1] - h, ponder_step, acc + y * weight[:, None], counts

    compiled = torch.compile(halting_step, dynamic=True, fullgraph=True)
    rows, acc = torch.rand(4, tokens), torch.zeros(tokens, dense.embed_dim)
    with torch.no_grad():
        start = time.perf_counter()
        compiled(x[0], rows, acc)
        compile_seconds = time.perf_counter() - start
        identical = all(
            torch.equal(a, b)
            for a, b in zip(halting_step(x[0], rows, acc), compiled(x[0], rows, acc), strict=True)
        )
    work = {
        "the halting step, eager": lambda: halting_step(x[0], rows, acc)[-1].tolist(),
        "the halting step, torch.compile(dynamic=True)": lambda: compiled(x[0], rows, acc)[-1].tolist(),
        "5 small tensor ops (halting score + cumulative sum)": tensor_ops,
        f"a {tokens}-item list comprehension": python_list,
    }
    times: dict[tuple[str, bool], list[float]] = collections.defaultdict(list)
    with torch.no_grad():
        for r in range(rounds):
            for name, job in work.items():
                for after_block in (r % 2 == 0, r % 2 == 1):
                    if after_block:
                        block(x)
                    start = time.perf_counter()
                    job()
                    times[(name, after_block)].append(time.perf_counter() - start)
    us = {key: 1e6 * statistics.median(v) for key, v in times.items()}
    return [
        f"## What small work costs right after a block ({model_name}, block 6 on {tokens} tokens)",
        "",
        f"{rounds} rounds, alone and right after the block alternating; median microseconds.",
        "",
        "| work | alone | right after a block | ratio |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {us[(name, False)]:.1f} | {us[(name, True)]:.1f} | {us[(name, True)] / us[(name, False)]:.1f}x |"
            for name in work
        ),
        "",
        f"torch.compile of the halting step took {compile_seconds:.1f} s to compile here; its outputs are "
        f"{'' if identical else 'not '}bitwise identical to eager's.",
        "",
    ]


if __name__ == "__main__":
    main()
