"""The GPU speed suite, one command: dense against DynamicViT 0.7, EViT 0.7, ToMe r=13 and A-ViT
(gate centre 3, mixed plain/busy images) on DeiT-S and DeiT-B, in fp16 and bf16 (timm's blocks use
PyTorch's scaled_dot_product_attention), at batch 1, 64 and 256, eagerly, and through torch.compile for
the cases `--compile` names (each compile costs tens of seconds). Every case times its contenders
paired and interleaved (medians of `--rounds`), with the truncation bound in the same run: the dense
blocks on DynamicViT's pre-sliced token counts, pruning with zero overhead. Random weights.

    python benchmarks/gpu_suite.py                      # one GPU, about 5 minutes
    python benchmarks/gpu_suite.py --smoke              # CPU, seconds: a tiny ViT, fp32, batch 1 and 4

Writes gpu_suite_<device>.md / .json (command, device name, date) under runs/bench/, or into
benchmarks/results/ with --update-results. With onnxruntime's CUDA provider installed, DeiT-S dense and
DynamicViT also run exported (fp32, batch 64).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import timm
import torch
from results_dir import add_update_flag, results_folder

import tokensparse
from tokensparse.bench import interleaved, machine_description, mixed_batch, today, truncated_forward

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def contenders(name: str, img_size: int) -> dict[str, torch.nn.Module]:
    make = lambda: timm.create_model(name, img_size=img_size).eval()  # noqa: E731
    r = (
        13 if img_size >= 224 else 1
    )  # ToMe's DeiT setting at 224 px; the smoke run's 16 patches take 1 a block
    return {
        "dense": make(),
        "DynamicViT 0.7": tokensparse.dynamicvit(make(), keep_ratio=0.7).eval(),
        "EViT 0.7": tokensparse.evit(make(), keep_ratio=0.7).eval(),
        f"ToMe r={r}": tokensparse.tome(make(), r=r).eval(),
        "A-ViT (centre 3)": tokensparse.avit(make(), gate_center=3.0).eval(),
    }


def run_case(name, img_size, dtype, batch, device, rounds, compiled) -> dict:
    torch.manual_seed(0)
    models = {k: m.to(device=device, dtype=dtype) for k, m in contenders(name, img_size).items()}
    images = mixed_batch(batch, (img_size, img_size)).to(device=device, dtype=dtype)
    with torch.no_grad():
        models["DynamicViT 0.7"](images)
    counts = tokensparse.sparsity_info(models["DynamicViT 0.7"]).tokens_per_block[0].tolist()
    dense = models["dense"]
    calls = {"truncation bound (DynamicViT's counts)": lambda: truncated_forward(dense, images, counts)}
    notes = {}
    for label, model in models.items():
        fn = model
        if compiled:
            try:
                fn = torch.compile(model, fullgraph=label != "A-ViT (centre 3)")
                with torch.no_grad():
                    fn(images)
            except Exception as err:  # a method that does not compile: say so, time it eagerly
                notes[label] = f"compile failed ({type(err).__name__}); eager"
                fn = model
        calls[label] = lambda fn=fn: fn(images)
    with torch.no_grad():
        timings = interleaved(calls, rounds=rounds, warmup=2, device=device)
    base = timings["dense"].median
    bound = base / timings["truncation bound (DynamicViT's counts)"].median
    rows = {
        label: {
            "median_ms": 1e3 * t.median,
            "spread": t.spread,
            "img_s": batch / t.median,
            "speedup": base / t.median,
            "share_of_bound": (base / t.median) / bound if label == "DynamicViT 0.7" else None,
            "note": notes.get(label, ""),
        }
        for label, t in timings.items()
    }
    return {"model": name, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
            "mode": "torch.compile" if compiled else "eager", "bound": bound, "rows": rows}  # fmt: skip


def onnx_cases(device, rounds) -> list[dict]:
    """DeiT-S dense and DynamicViT 0.7 exported (fp32, batch 64) under onnxruntime's CUDA provider."""
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    if "CUDAExecutionProvider" not in ort.get_available_providers() or device.type != "cuda":
        return []
    import tempfile

    images = mixed_batch(64, (224, 224))
    calls = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, model in list(contenders("deit_small_patch16_224", 224).items())[:2]:
            path = tokensparse.export_onnx(model, f"{tmp}/{len(calls)}.onnx", batch_size=64).path
            session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
            feed = {session.get_inputs()[0].name: images.numpy()}
            calls[label] = lambda s=session, f=feed: s.run(None, f)
        timings = interleaved(calls, rounds=rounds, warmup=2)
    base = timings["dense"].median
    rows = {k: {"median_ms": 1e3 * t.median, "spread": t.spread, "img_s": 64 / t.median, "speedup": base / t.median,
                "share_of_bound": None, "note": ""} for k, t in timings.items()}  # fmt: skip
    return [{"model": "deit_small_patch16_224", "dtype": "float32", "batch": 64, "mode": "onnxruntime CUDA",
             "bound": None, "rows": rows}]  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--smoke", action="store_true", help="CPU, a tiny ViT, fp32, batch 1 and 4: checks the suite runs"
    )
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 20; smoke 2)")
    p.add_argument(
        "--compile", nargs="*", default=["deit_small_patch16_224:float16:64"], metavar="MODEL:DTYPE:BATCH",
        help="cases also timed through torch.compile (default: %(default)s)",
    )  # fmt: skip
    add_update_flag(p)
    args = p.parse_args()
    if args.smoke:
        device, models, dtypes, batches, img = (
            torch.device("cpu"),
            ["deit_tiny_patch16_224"],
            ["float32"],
            [1, 4],
            64,
        )
        args.compile, rounds = [], args.rounds or 2
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU here: run with --smoke for the CPU check", file=sys.stderr)
            return 2
        device, dtypes, batches, img = torch.device("cuda"), ["float16", "bfloat16"], [1, 64, 256], 224
        models, rounds = ["deit_small_patch16_224", "deit_base_patch16_224"], args.rounds or 20
    wall = time.perf_counter()
    cases = []
    for name in models:
        for dtype in dtypes:
            for batch in batches:
                cases.append(run_case(name, img, DTYPES[dtype], batch, device, rounds, False))
                if f"{name}:{dtype}:{batch}" in args.compile:
                    cases.append(run_case(name, img, DTYPES[dtype], batch, device, rounds, True))
                print(f"{time.perf_counter() - wall:6.0f}s  {name} {dtype} batch {batch}", flush=True)
    cases += onnx_cases(device, rounds)
    machine = machine_description(device)
    command = "python benchmarks/gpu_suite.py " + " ".join(sys.argv[1:])
    out = results_folder(args) / f"gpu_suite_{'smoke' if args.smoke else device.type}"
    record = {"command": command.strip(), "machine": machine, "date": today(), "rounds": rounds,
              "wall_seconds": time.perf_counter() - wall, "cases": cases}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    lines = [
        "# GPU suite: dense vs token methods" + (" (smoke run on CPU)" if args.smoke else ""),
        "",
        f"- command: `{record['command']}`",
        f"- machine: {machine}",
        f"- date: {record['date']}",
        f"- method: random weights, mixed plain/busy images, {rounds} interleaved rounds per case after 2 warm-up "
        "rounds, medians; speedup = dense median / contender median in the same case; bound = dense / the "
        "dense blocks on DynamicViT 0.7's pre-sliced token counts; share = DynamicViT's speedup / bound",
        f"- wall time: {record['wall_seconds']:.0f} s",
        "",
        "| model | dtype | batch | mode | contender | img/s | speedup | spread | share of bound | note |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for case in cases:
        for label, row in case["rows"].items():
            share = "" if row["share_of_bound"] is None else f"{row['share_of_bound']:.2f}"
            lines.append(
                f"| {case['model']} | {case['dtype']} | {case['batch']} | {case['mode']} | {label} | {row['img_s']:.0f} | "
                f"{row['speedup']:.2f}x | {row['spread']:.0%} | {share} | {row['note']} |"
            )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
