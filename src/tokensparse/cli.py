"""Command line: parses arguments and calls the library; every command is a function too."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"keep ratio must be a number, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"keep ratio must be in (0, 1], got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="executed GFLOPs, images/s and speedup vs dense for a timm ViT (random weights, no download)",
        description="Time the dense model and its sparsified versions in one interleaved run; report medians, "
        "speedups vs dense and vs the truncation bound (the same blocks fed pre-sliced token counts).",
    )
    p.add_argument(
        "--model",
        default=None,
        help="timm model name (default: deit_small_patch16_224; deit_tiny_patch16_224 for avit)",
    )
    p.add_argument(
        "--method",
        default="dynamicvit",
        choices=["dynamicvit", "avit", "evit", "random", "static", "tome"],
        help="token policy (default: %(default)s)",
    )
    p.add_argument("--tome-r", type=int, nargs="+", default=[8, 13], help="ToMe: tokens merged per block")
    p.add_argument(
        "--keep-ratios",
        type=_ratio,
        nargs="+",
        default=[0.5, 0.7, 0.9],
        metavar="RHO",
        help="DynamicViT keep ratios (default: %(default)s)",
    )
    p.add_argument("--gate-scale", type=float, default=10.0, help="A-ViT gate scale (default: %(default)s)")
    p.add_argument(
        "--gate-centers",
        type=float,
        nargs="+",
        default=[3.0],
        help="A-ViT gate centres; with random weights 2-5 make tokens halt at all depths (default: %(default)s)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--rounds", type=_positive_int, default=10, help="timed rounds per contender")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--img-size", type=int, default=None, help="override the model's image size")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from .bench import bench_avit, bench_dynamicvit

    common = dict(
        batch_size=args.batch_size,
        rounds=args.rounds,
        warmup=args.warmup,
        device=args.device,
        dtype=DTYPES[args.dtype],
        img_size=args.img_size,
        progress=not args.json,
    )
    if args.method == "avit":
        result = bench_avit(
            args.model or "deit_tiny_patch16_224",
            gate_centers=args.gate_centers,
            gate_scale=args.gate_scale,
            **common,
        )
    else:
        settings = args.tome_r if args.method == "tome" else args.keep_ratios
        result = bench_dynamicvit(
            args.model or "deit_small_patch16_224", keep_ratios=settings, method=args.method, **common
        )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        bound = (
            "FLOP ratio dense/A-ViT"
            if args.method == "avit"
            else "truncation bound (dense blocks on pre-sliced tokens)"
        )
        print(
            f"{result.model}, batch {result.batch_size}, {result.device} {result.dtype}, median of {result.rounds} "
            f"interleaved rounds; bound = {bound}; {result.machine}; {result.date}"
        )
        print(result.table())
    return 0


_HELP = {
    "method": "dense | dynamicvit | avit | evit | tome | random | static",
    "model": "timm model name of the backbone",
    "checkpoint": "starting weights (timm, the authors' .pth or safetensors); the teacher is a frozen copy",
    "teacher": "teacher weights, if not the starting model",
    "dataset": "fashion-mnist-clutter (built in), 'folder' (ImageFolder with train/ and val/) or torch/<name>",
    "data_root": "data folder (ImageFolder root or torchvision root)",
    "train_limit": "use only the first N training images",
    "val_limit": "use only the first N validation images",
    "amp": "bf16 autocast on CPU, fp16 on CUDA",
    "resume": "continue from the last checkpoint in --output",
    "output": "run folder: config.json, metrics.jsonl, checkpoints/, model.safetensors",
    "keep_ratio": "DynamicViT keep ratio rho (stage s keeps rho^s)",
    "gate_center": "A-ViT gate centre beta (30 for DeiT-T, 75 for DeiT-S in the paper)",
    "backbone_lr_scale": "lr multiplier of the backbone (default: 0.01 for DynamicViT, as its authors; 1 otherwise)",
    "prior_depth": "A-ViT prior's centre depth (default: 2/3 of the depth, 8 of 12 as the paper)",
}


def _add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, typed from its default."""
    import dataclasses

    from .train import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = _HELP.get(f.name, "") + (
            f" (default: {default})" if default not in (None, {}, []) else ""
        )
        if f.name == "model_kwargs":
            p.add_argument(flag, type=json.loads, default={}, help="extra timm.create_model kwargs as JSON")
        elif f.name == "locations":
            p.add_argument(flag, type=int, nargs="+", default=None, help="DynamicViT pruning blocks")
        elif isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif "float" in str(f.type):
            p.add_argument(flag, type=float, default=default, help=help_text)
        elif "int" in str(f.type):
            p.add_argument(flag, type=int, default=default, help=help_text)
        else:
            p.add_argument(flag, default=default, help=help_text)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a dense, DynamicViT, A-ViT or baseline model (torchrun for DDP)",
        description="Train with the authors' objectives; torchrun --nproc_per_node=N -m tokensparse "
        "train ... runs DDP. Checkpoints every epoch; --resume continues a killed run.",
    )
    _add_config_arguments(p)
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from .train import TrainConfig, train

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    metrics = train(TrainConfig(**{k: v for k, v in vars(args).items() if k in names}))
    if metrics:
        print(json.dumps(metrics))
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="top-1/top-5, executed GFLOPs, img/s and keep ratio or depth of a trained model"
    )
    p.add_argument("run", help="a training run folder (config.json + weights)")
    p.add_argument("--dataset", default=None, help="override the run's data set")
    p.add_argument("--data-root", default=None)
    p.add_argument("--val-limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument(
        "--keep-ratio", type=_ratio, default=None, help="evaluate DynamicViT at another keep ratio"
    )
    p.add_argument("--gate-center", type=float, default=None, help="evaluate A-ViT with another gate centre")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from .data import build_dataset, build_loader
    from .evaluate import evaluate
    from .train import load_trained

    model, cfg = load_trained(args.run)
    if args.keep_ratio is not None and cfg.method == "dynamicvit":
        model.score_predictor.keep_ratio = args.keep_ratio
    if args.gate_center is not None and cfg.method == "avit":
        model.halting.gate_center = args.gate_center
    dataset = build_dataset(
        args.dataset or cfg.dataset,
        args.data_root or cfg.data_root,
        "val",
        model.patch_embed.img_size[0],
        limit=args.val_limit or cfg.val_limit,
    )
    loader = build_loader(dataset, args.batch_size or cfg.batch_size, is_training=False)
    result = evaluate(model.to(args.device), loader, device=args.device, progress=not args.json)
    result = {"run": args.run, "method": cfg.method, "model": cfg.model, **result}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>22}: {value:.4g}" if isinstance(value, float) else f"{key:>22}: {value}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: train a small ViT on the built-in data, fine-tune DynamicViT and A-ViT, compare "
        "with the baselines, write report/ (~5 min on 2 CPU cores; a re-run reuses finished steps)",
    )
    p.add_argument(
        "--work", default="runs/demo", help="where runs and evaluations are kept (default: %(default)s)"
    )
    p.add_argument("--report", default="report", help="report folder (default: %(default)s)")
    p.add_argument(
        "--replication",
        action="store_true",
        help="the longer schedule (20000 training images, 6 + 4 epochs, all 10000 validation images)",
    )
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, replication_config, run_study

    overrides = {"device": args.device}
    if args.replication:
        for key in ("work", "report"):
            if getattr(args, key) != p_defaults[key]:
                overrides[key] = getattr(args, key)
        cfg = replication_config(**overrides)
    else:
        cfg = DemoConfig(work=args.work, report=args.report, **overrides)
    run_study(cfg)
    return 0


p_defaults = {"work": "runs/demo", "report": "report"}


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a dense or sparsified ViT to ONNX (fixed batch and image size), checked with onnxruntime",
        description="Export the inference form to ONNX (outputs: logits, and patch_index, the original patch "
        "of each final patch token, for a sparsified model) and check onnxruntime against PyTorch. A-ViT "
        "cannot be exported (data-dependent token counts).",
    )
    p.add_argument("output", help="the .onnx file to write")
    p.add_argument("--run", default=None, help="a training run folder (config.json + weights); else --model")
    p.add_argument("--model", default="deit_small_patch16_224", help="timm model name (default: %(default)s)")
    p.add_argument(
        "--method",
        default="dynamicvit",
        choices=["dense", "dynamicvit", "evit", "random", "static", "tome"],
        help="token policy (default: %(default)s)",
    )
    p.add_argument("--checkpoint", default=None, help="weights of the sparsified model (else random weights)")
    p.add_argument("--num-classes", type=_positive_int, default=None, help="classes of the head")
    p.add_argument("--keep-ratio", type=_ratio, default=0.7, help="keep ratio (default: %(default)s)")
    p.add_argument(
        "--tome-r", type=int, default=13, help="ToMe: tokens merged per block (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="random pruning's seed (default: %(default)s)")
    p.add_argument(
        "--batch-size", type=_positive_int, default=1, help="fixed batch size (default: %(default)s)"
    )
    p.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from . import random_prune, tome
    from .bench import make_policy
    from .checkpoints import load_checkpoint
    from .export import export_onnx

    if args.run is not None:
        from .train import load_trained

        model = load_trained(args.run)[0]
    else:
        import timm

        kwargs = {} if args.img_size is None else {"img_size": args.img_size}
        if args.num_classes is not None:
            kwargs["num_classes"] = args.num_classes
        model = timm.create_model(args.model, pretrained=False, **kwargs)
        if args.method == "random":
            model = random_prune(model, keep_ratio=args.keep_ratio, seed=args.seed)
        elif args.method == "tome":
            model = tome(model, r=args.tome_r)
        elif args.method != "dense":
            model = make_policy(args.method, args.keep_ratio)(model)
        if args.checkpoint is not None:
            load_checkpoint(model, args.checkpoint)
    result = export_onnx(
        model.eval(),
        args.output,
        batch_size=args.batch_size,
        image_size=args.img_size,
        verify=not args.no_verify,
    )
    check = (
        "not verified"
        if result.max_abs_diff is None
        else f"onnxruntime vs PyTorch: max |logit diff| {result.max_abs_diff:.2g}"
        + ("" if result.same_patches is None else f", same kept patches: {result.same_patches}")
    )
    print(
        f"wrote {result.path} ({result.method}, batch {result.batch_size}, "
        f"{result.image_size[0]}x{result.image_size[1]}, outputs {', '.join(result.output_names)}); {check}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokensparse", description="Token sparsification for timm ViTs.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_demo(sub)
    _add_export(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"tokensparse {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
