"""`tokensparse bench`."""

from __future__ import annotations

import argparse
import json
import sys

from ..checks import DTYPE_NAMES
from .args import (
    _add_device,
    _add_model_kwargs,
    _dtype,
    _methods,
    _non_negative_int,
    _positive_int,
    _ratio,
    resolve_device,
)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="executed GMACs, images/s and speedup vs dense for a timm ViT (random weights, no download)",
        description="Time the dense model and its sparsified versions in one interleaved run; report medians "
        "with their spread (IQR), speedups vs dense and vs the truncation bound (the same blocks fed "
        "pre-sliced token counts). GFLOPs count multiply-adds (MACs), as the papers do. With --run, the "
        "run's backbone weights and setting are timed (on random images).",
    )
    p.add_argument(
        "--model",
        default=None,
        help="timm model name (default: deit_small_patch16_224; deit_tiny_patch16_224 for avit)",
    )
    p.add_argument(
        "--method",
        default=None,
        choices=_methods(timed=True),
        help="token policy (default: the run's, else dynamicvit)",
    )
    p.add_argument(
        "--run",
        default=None,
        help="time a trained run (folder) or weights file (with --model and --method) instead of random weights",
    )
    p.add_argument(
        "--tome-r", type=int, nargs="+", default=None, help="ToMe: tokens merged per block (default: 8 13)"
    )
    p.add_argument(
        "--keep-ratios",
        type=_ratio,
        nargs="+",
        default=None,
        metavar="RHO",
        help="keep ratios of the pruning methods (default: the run's, else 0.5 0.7 0.9)",
    )
    p.add_argument(
        "--target-gflops",
        type=float,
        nargs="+",
        default=None,
        metavar="GMACS",
        help="FLOP budgets of DiffRate (default: the run's counts, else the authors' published budget for a "
        "DeiT they searched, else 63%% of the dense GMACs)",
    )
    p.add_argument(
        "--gate-scale", type=float, default=None, help="A-ViT gate scale (default: the run's, else 10)"
    )
    p.add_argument(
        "--gate-centers",
        type=float,
        nargs="+",
        default=None,
        help="A-ViT gate centres; with random weights 2-5 make tokens halt at all depths (default: the run's, "
        "else 3)",
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=8, help="images per timed forward (default: %(default)s)"
    )
    p.add_argument("--rounds", type=_positive_int, default=10, help="timed rounds per contender")
    p.add_argument(
        "--warmup", type=_non_negative_int, default=2, help="untimed rounds first (default: %(default)s)"
    )
    p.add_argument("--img-size", type=int, default=None, help="override the model's image size")
    _add_model_kwargs(p)
    _add_device(p)
    p.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(DTYPE_NAMES),
        help="weights and inputs (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.set_defaults(func=_bench)


def _bench_run(args: argparse.Namespace):
    """(dense model with the run's backbone weights, its name, the run's TrainConfig, the run's policy)
    for `bench --run`."""
    import dataclasses

    from ..flops import input_size
    from ..runs import load_with_config
    from ..training import build_model

    sparse, cfg = load_with_config(
        args.run, model=args.model, method=args.method, img_size=args.img_size, model_kwargs=args.model_kwargs
    )
    dense_cfg = dataclasses.replace(cfg, method="dense", checkpoint=None, pretrained=False, drop_path=0.0)
    dense = build_model(dense_cfg, sparse.num_classes, input_size(sparse)[1])
    missing = dense.load_state_dict(
        sparse.state_dict(), strict=False
    ).missing_keys  # the method's own left out
    if missing:
        raise ValueError(f"{args.run}: its backbone lacks {missing[:4]}")
    dense.pretrained_cfg = sparse.pretrained_cfg  # the run's image size
    from ..engine import get_policy

    return dense, f"{cfg.model} ({args.run})", cfg, get_policy(sparse)


_BENCH_SETTINGS = {"keep_ratio": [0.5, 0.7, 0.9], "tome_r": [8, 13], "gate_center": [3.0]}
"""What `tokensparse bench` sweeps without --run and without the setting's flag."""


def _is_spatial_name(model: str | None) -> bool:
    """Whether timm's `model` is a ConvNeXt or Swin Transformer (by its module, without building it)."""
    import timm.models

    if model is None or not timm.models.is_model(model):
        return False
    return timm.models.model_entrypoint(model).__module__.rsplit(".", 1)[-1] in (
        "convnext",
        "swin_transformer",
    )


def _bench(args: argparse.Namespace) -> int:
    from ..bench import bench_method
    from ..policies.registry import get_method, load_method

    device = resolve_device(args.device)
    model, name, cfg, sparse_policy = args.model, None, None, None
    if args.run is not None:
        model, name, cfg, sparse_policy = _bench_run(args)
        img_size = None
    else:
        img_size = args.img_size
    method = args.method or (cfg.method if cfg is not None and cfg.method != "dense" else None)
    if method is None:  # a ConvNeXt / Swin takes the spatial variant, a ViT DynamicViT
        method = (
            "dynamicspatial" if _is_spatial_name(model if isinstance(model, str) else None) else "dynamicvit"
        )
    common = dict(
        batch_size=args.batch_size,
        rounds=args.rounds,
        warmup=args.warmup,
        device=device,
        dtype=_dtype(args.dtype),
        img_size=img_size,
        progress=not args.json,
    )
    run_has = cfg is not None and cfg.method == method
    spec = get_method(method)
    setting = spec.bench_setting
    swept = {
        "keep_ratio": args.keep_ratios,
        "tome_r": args.tome_r,
        "gate_center": args.gate_centers,
        "target_gflops": args.target_gflops,
    }
    settings = swept.get(setting) or (
        [cfg.get(setting)] if run_has and setting else _BENCH_SETTINGS.get(setting, [None])
    )
    others = {k: cfg.get(k) for k in spec.setting_names()} if run_has else {}
    if run_has and hasattr(sparse_policy, "counts"):  # a run's searched counts (DiffRate)
        others["counts"] = sparse_policy.counts()
    if args.gate_scale is not None:
        if spec.setting("gate_scale") is None:
            raise ValueError(f"--gate-scale does not apply to --method {method}")
        others["gate_scale"] = args.gate_scale
    own_bench = load_method(method).bench
    if own_bench is not None:  # a method the shared bench cannot time (A-ViT: halting depends on the image)
        result = own_bench(model, settings, others, **common)
    else:
        fixed = {k: v for k, v in others.items() if v is not None and k != setting}  # the run's others
        result = bench_method(
            model or "deit_small_patch16_224", keep_ratios=settings, method=method, settings=fixed, **common
        )
    if name is not None:
        result.model = name
    for warning in result.warnings:
        print(f"tokensparse bench: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        bound = spec.bench_bound
        print(
            f"{result.model}, batch {result.batch_size}, {result.device} {result.dtype}, median of {result.rounds} "
            f"interleaved rounds; bound = {bound}; {result.machine}; {result.date}"
        )
        print(result.table())
    return 0
