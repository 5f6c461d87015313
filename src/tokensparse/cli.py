"""Command line: parses arguments and calls the library; every command is a function too.

Nothing here imports torch (or the modules that do) before a command runs, so `--help`, `--version`
and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from .checks import DTYPE_NAMES


def _methods(timed: bool = False) -> tuple[str, ...]:
    """The registered methods (torch-free); `timed`: those `tokensparse bench` sweeps."""
    from .policies.registry import get_method, method_names

    return tuple(m for m in method_names() if not timed or get_method(m).bench_setting is not None)


def _dtype(name: str):
    import torch

    return getattr(torch, DTYPE_NAMES[name])


def resolve_device(name: str) -> str:
    """`auto` -> cuda when torch sees a GPU, else cpu; a device torch cannot use -> ValueError naming the flag."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(
            f"--device {name}: not a device torch knows ({err}); use cpu, cuda, cuda:N or auto"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {name}: torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                "use --device cpu, or auto to take a GPU when there is one"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu or auto")
    return name


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:N, or auto: a GPU when torch sees one (default: auto)",
    )


def _add_weights(p: argparse.ArgumentParser, positional: bool) -> None:
    """A run folder, or a weights file with --model and --method."""
    what = "a training run folder (config.json + weights), or a weights file with --model and --method"
    if positional:  # `eval RUN` or `eval --run RUN`, as the other commands take it
        p.add_argument("run", nargs="?", default=None, help=what)
        p.add_argument("--run", dest="run_option", default=None, metavar="RUN", help="the same, as a flag")
    else:
        p.add_argument("--run", required=True, metavar="RUN", help=what)
    p.add_argument("--model", default=None, help="timm model name, for a weights file")
    p.add_argument("--method", default=None, choices=_methods(), help="token policy, for a weights file")
    p.add_argument(
        "--img-size", type=int, default=None, help="image size of a weights file (default: from it)"
    )
    _add_model_kwargs(p)


def _add_model_kwargs(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-kwargs",
        type=json.loads,
        default=None,
        help="extra timm.create_model kwargs of a weights file, as JSON (a run folder has them)",
    )


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


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
    """(dense model with the run's backbone weights, its name, the run's TrainConfig) for `bench --run`."""
    import dataclasses

    from .flops import input_size
    from .runs import load_with_config
    from .training import build_model

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
    return dense, f"{cfg.model} ({args.run})", cfg


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
    from .bench import bench_avit, bench_dynamicvit
    from .policies.registry import get_method

    device = resolve_device(args.device)
    model, name, cfg = args.model, None, None
    if args.run is not None:
        model, name, cfg = _bench_run(args)
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
    setting = get_method(method).bench_setting
    swept = {"keep_ratio": args.keep_ratios, "tome_r": args.tome_r, "gate_center": args.gate_centers}
    settings = swept.get(setting) or (
        [getattr(cfg, setting)] if run_has and setting else _BENCH_SETTINGS.get(setting, [None])
    )
    if method == "avit":  # halting depends on the image: A-ViT's own bench, on a mixed batch
        result = bench_avit(
            model or "deit_tiny_patch16_224",
            gate_centers=settings,
            gate_scale=args.gate_scale or (cfg.gate_scale if run_has else 10.0),
            **common,
        )
    else:
        result = bench_dynamicvit(
            model or "deit_small_patch16_224", keep_ratios=settings, method=method, **common
        )
    if name is not None:
        result.model = name
    for warning in result.warnings:
        print(f"tokensparse bench: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        bound = {
            "avit": "FLOP ratio dense/A-ViT",
            "dynamicspatial": "FLOP ratio dense/dynamic (no tokens are removed)",
        }.get(method, "truncation bound (dense blocks on pre-sliced tokens)")
        print(
            f"{result.model}, batch {result.batch_size}, {result.device} {result.dtype}, median of {result.rounds} "
            f"interleaved rounds; bound = {bound}; {result.machine}; {result.date}"
        )
        print(result.table())
    return 0


_HELP = {
    "method": "the method, by its registered name (tokensparse.policies.registry)",
    "model": "timm model name of the backbone",
    "checkpoint": "starting weights (timm, the authors' .pth or safetensors); the teacher is a frozen copy",
    "teacher": "teacher weights, if not the starting model",
    "dataset": "fashion-mnist-clutter (built in), 'folder' (ImageFolder with train/ and val/) or torch/<name>",
    "data_root": "data folder (ImageFolder root or torchvision root)",
    "train_limit": "use N training images (a seeded sample over all classes; the clutter set: the first N)",
    "fresh_subset": "with --train-limit N: every epoch draws N items afresh from the whole training split "
    "(seeded by --seed and the epoch) instead of always the same N",
    "val_limit": "use N validation images (a seeded sample over all classes; the clutter set: the first N)",
    "pretrained": "start from timm's own pretrained weights of --model (needs them downloaded or cached)",
    "warmup_epochs": "linear warm-up epochs; when not shorter than --epochs, the CLI scales it to epochs // 6",
    "device": "cpu, cuda, cuda:N, or auto: a GPU when torch sees one",
    "amp": "bf16 autocast on CPU, fp16 on CUDA",
    "resume": "continue from the last checkpoint in --output",
    "output": "run folder: config.json, metrics.jsonl, checkpoints/, model.safetensors",
    "keep_ratio": "DynamicViT keep ratio rho (stage s keeps rho^s)",
    "gate_center": "A-ViT gate centre beta (30 for DeiT-T, 75 for DeiT-S in the paper)",
    "backbone_lr_scale": "lr multiplier of the backbone (the policy's own parameters train at the full lr)",
    "backbone_fixed_epochs": "epochs at the start during which the backbone's lr is 0 (DynamicViT's fix_step)",
    "freeze_embeddings": "leave cls_token and pos_embed out of the optimiser (DynamicViT's optim_factory)",
    "distill_weight": "weight of the teacher's logits (and DynamicViT's token) distillation",
    "token_distill": "DynamicViT token distillation: mse (DeiT/ViT, the authors' default) or kl (their LV-ViT)",
    "straight_through_zeroing": "A-ViT: zero halted tokens' block input as the authors' out.data (no gradient "
    "through the product); --no-straight-through-zeroing for a plain product",
    "prior_depth": "A-ViT prior's centre depth (default: 2/3 of the depth, 8 of 12 as the paper)",
    "img_size": "input size in pixels (default: the data set's, 64 for the built-in one; a folder: 224)",
    "epochs": "training epochs",
    "batch_size": "images per step and process (DDP: per rank)",
    "lr": "peak learning rate (the policy's own parameters; see --backbone-lr-scale)",
    "min_lr": "the cosine schedule's final lr",
    "weight_decay": "AdamW weight decay",
    "warmup_lr": "lr at the start of the warm-up",
    "opt": "timm optimiser name (timm.optim.create_optimizer_v2)",
    "sched": "timm scheduler name (timm.scheduler.create_scheduler_v2)",
    "clip_grad": "clip the gradient norm to this value (default: no clipping)",
    "drop_path": "stochastic depth rate of the backbone",
    "smoothing": "label smoothing of the cross-entropy",
    "mixup": "Mixup alpha (0: off)",
    "cutmix": "CutMix alpha (0: off)",
    "locations": "blocks before which tokens are pruned (default: a quarter of the depth apart, 3 6 9 of 12)",
    "ratio_weight": "weight of DynamicViT's keep-ratio loss",
    "gate_scale": "A-ViT gate scale gamma (halting score sigmoid(gamma * y0 - beta))",
    "halt_eps": "A-ViT halting threshold epsilon (a token halts once its scores sum past 1 - eps)",
    "ponder_weight": "weight of A-ViT's ponder loss",
    "prior_weight": "weight of A-ViT's distributional prior (KL to a Gaussian over depths)",
    "tome_r": "ToMe: tokens merged in every block",
    "target_gflops": "a FLOP budget in GMACs per image instead of --keep-ratio / --tome-r (eval, export; "
    "train refuses it)",
    "workers": "data-loading processes per training process",
    "seed": "seed of the model's initialisation, the data's order and draws, and random pruning",
    "overwrite": "replace the run already in --output",
    "max_nan_streak": "stop after this many consecutive non-finite losses (each such step is skipped)",
    "keep_checkpoints": "epoch checkpoints kept in OUTPUT/checkpoints",
}

# `train --help` in groups, as a reader looks for them; a field not named here goes to "method"
_GROUPS = {
    "data": ("dataset", "data_root", "img_size", "train_limit", "fresh_subset", "val_limit", "workers"),
    "model": ("model", "checkpoint", "pretrained", "teacher", "model_kwargs"),
    "optimisation": (
        "epochs",
        "batch_size",
        "lr",
        "min_lr",
        "weight_decay",
        "warmup_epochs",
        "warmup_lr",
        "opt",
        "sched",
        "clip_grad",
        "drop_path",
        "smoothing",
        "mixup",
        "cutmix",
        "amp",
        "max_nan_streak",
    ),  # fmt: skip
    "run": ("device", "seed", "output", "resume", "overwrite", "keep_checkpoints"),
}


def train_config_fields() -> tuple[list[tuple[str, str, object]], tuple[str, ...]]:
    """TrainConfig's fields as (name, annotation, default), and the methods (from the torch-free config)."""
    import dataclasses

    from .config import METHODS, TrainConfig

    fields = [
        (f.name, str(f.type), f.default if f.default is not dataclasses.MISSING else f.default_factory())
        for f in dataclasses.fields(TrainConfig)
    ]
    return fields, tuple(METHODS)


def _add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, typed from its default."""
    from .config import METHOD_DEFAULTS, SETTING_METHODS

    fields, methods = train_config_fields()
    groups = {
        title: p.add_argument_group(title) for title in ("data", "model", "method", "optimisation", "run")
    }
    where = {name: title for title, names in _GROUPS.items() for name in names}
    for name, annotation, default in fields:
        p = groups[where.get(name, "method")]
        flag = "--" + name.replace("_", "-")
        help_text = _HELP.get(name, "") + (f" (default: {default})" if default not in (None, {}, []) else "")
        per_method = {m: d[name] for m, d in METHOD_DEFAULTS.items() if name in d}
        if per_method:
            shown = ", ".join(f"{m} {v}" for m, v in per_method.items())
            help_text += f" (default per method: {shown})"
        elif name in SETTING_METHODS:
            help_text += f" (--method {' / '.join(SETTING_METHODS[name])} only)"
        if name == "model_kwargs":
            p.add_argument(flag, type=json.loads, default={}, help="extra timm.create_model kwargs as JSON")
        elif name == "locations":
            p.add_argument(flag, type=int, nargs="+", default=None, help=help_text)
        elif name == "method":
            p.add_argument(flag, default=default, choices=methods, help=f"token policy (default: {default})")
        elif isinstance(default, bool) or "bool" in annotation:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif name == "token_distill":
            p.add_argument(flag, choices=["mse", "kl"], default=None, help=help_text)
        elif "float" in annotation:
            p.add_argument(flag, type=float, default=default, help=help_text)
        elif "int" in annotation:
            p.add_argument(flag, type=int, default=default, help=help_text)
        else:
            p.add_argument(flag, default=default, help=help_text)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a dense, DynamicViT, A-ViT or baseline model (torchrun for DDP)",
        description="Train with the authors' objectives; torchrun --nproc_per_node=N -m tokensparse "
        "train ... runs DDP. Checkpoints every epoch; --resume continues a killed run. Your own data and a "
        "model trained on other classes (--pretrained, or --checkpoint of an ImageNet model): add "
        "--finetune-dense-epochs N to fine-tune the dense model first (into OUTPUT/dense), then sparsify it.",
    )
    _add_config_arguments(p)
    p.add_argument(
        "--finetune-dense-epochs",
        type=int,
        default=None,
        metavar="N",
        help="first fine-tune the dense model N epochs on the data (into OUTPUT/dense), then train --method "
        "from it: for starting weights whose head has other classes than the data",
    )
    p.set_defaults(func=_train)


def _resumed_settings(given: dict, written: set[str]) -> dict:
    """`--resume` with only `--output RUN`: the settings not written on the command line come from
    RUN/config.json; a written one still counts, so a changed one is refused by name."""
    saved_file = Path(given["output"]) / "config.json"
    if not saved_file.is_file():
        return given
    try:
        saved = json.loads(saved_file.read_text())
    except ValueError:  # corrupt: the resume itself reports it, naming the file
        return given
    if not isinstance(saved, dict):
        return given
    kept = {"resume", "overwrite", "output", "device"} | written
    return {k: v if k in kept or k not in saved else saved[k] for k, v in given.items()}


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from .training import TrainConfig, train

    resolve_device(args.device)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if args.resume:  # the run's settings, but the flags written now (only --epochs may change)
        given = _resumed_settings(given, getattr(args, "given", set(given)))
    cfg = TrainConfig(**given)
    if args.finetune_dense_epochs is not None:
        from .runs import train_dense_then_sparse

        metrics = train_dense_then_sparse(cfg, args.finetune_dense_epochs)
    else:
        metrics = train(cfg)
    if metrics and _rank() == 0:  # every rank returns the metrics; one prints them
        from .training import json_safe

        print(json.dumps(json_safe(metrics)))
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="top-1/top-5, executed GFLOPs (MACs), img/s and keep ratio or depth of a trained model",
        description="Evaluate a trained run (or a weights file with --model and --method) on its data set's "
        "validation split. gflops counts executed multiply-adds (MACs) per image.",
    )
    _add_weights(p, positional=True)
    p.add_argument("--dataset", default=None, help="override the run's data set")
    p.add_argument("--data-root", default=None, help="override the run's data folder")
    p.add_argument(
        "--val-limit",
        type=_positive_int,
        default=None,
        help="evaluate N validation images (default: the run's)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=None, help="default: the run's")
    p.add_argument(
        "--keep-ratio", type=_ratio, default=None, help="evaluate DynamicViT at another keep ratio"
    )
    p.add_argument("--gate-center", type=float, default=None, help="evaluate A-ViT with another gate centre")
    _add_target_gflops(p)
    _add_device(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(func=_eval)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _add_target_gflops(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target-gflops",
        type=_positive_float,
        default=None,
        help="a FLOP budget instead of --keep-ratio / --tome-r: the setting at which the model executes at most "
        "this many GMACs per image at its input size, within 2%% (dynamicvit, evit, random, static, tome)",
    )


def _positional_run(args: argparse.Namespace) -> str:
    """The run of a command that takes it positionally or as --run (ValueError: neither, or two)."""
    if args.run is not None and args.run_option is not None and args.run != args.run_option:
        raise ValueError(f"two runs given ({args.run} and --run {args.run_option}): give one")
    run = args.run or args.run_option
    if run is None:
        raise ValueError("give the run folder (or weights file): tokensparse eval RUN, or --run RUN")
    return run


def _eval(args: argparse.Namespace) -> int:
    args.run = _positional_run(args)
    from .data import build_dataset, build_loader
    from .evaluate import evaluate
    from .flops import input_size
    from .runs import load_with_config

    device = resolve_device(args.device)
    model, cfg = load_with_config(
        args.run,
        model=args.model,
        method=args.method,
        img_size=args.img_size,
        model_kwargs=args.model_kwargs,
        keep_ratio=args.keep_ratio,
        gate_center=args.gate_center,
        target_gflops=args.target_gflops,
    )
    dataset = build_dataset(
        args.dataset or cfg.dataset,
        args.data_root or cfg.data_root,
        "val",
        # a ViT / Swin runs at its built size; a ConvNeXt at the run's (None: the data's own)
        input_size(model)[1],
        limit=args.val_limit or cfg.val_limit,
    )
    from .data import num_classes

    data_classes, head = num_classes(dataset), getattr(model, "num_classes", None)
    if head is not None and data_classes != head:
        raise ValueError(
            f"{args.run} classifies {head} classes but {args.dataset or cfg.dataset} "
            f"{args.data_root or cfg.data_root or ''} has {data_classes}: its top-1 would mean nothing; "
            "fine-tune the run on this data first (tokensparse train --checkpoint ...)"
        )
    loader = build_loader(dataset, args.batch_size or cfg.batch_size, is_training=False)
    result = evaluate(model.to(device), loader, device=device, progress=not args.json)
    result = {"run": args.run, "method": cfg.method, "model": cfg.model, **result}
    if args.json:
        from .training import json_safe

        print(json.dumps(json_safe(result)))
    else:
        for key, value in result.items():
            print(f"{key:>22}: {value:.4g}" if isinstance(value, float) else f"{key:>22}: {value}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: fine-tune DynamicViT and A-ViT from the shipped dense model, compare with the "
        "baselines at matched FLOPs, write report/ (a re-run reuses finished steps)",
        description="Start from the shipped dense model (tokensparse.pretrained('clutter-vit')), fine-tune "
        "DynamicViT and A-ViT with their authors' recipes on the built-in cluttered Fashion-MNIST, evaluate "
        "them and ToMe/EViT/random/static at matched executed FLOPs on the test split, time the headline "
        "rows, and write a report with the table, the papers' claims checked and figures. --study runs "
        "the full study (benchmarks/results/study).",
    )
    p.add_argument(
        "--work", default=None, help="where runs and evaluations are kept (default: runs/demo, runs/study)"
    )
    p.add_argument("--report", default=None, help="report folder (default: report, benchmarks/results/study)")
    p.add_argument(
        "--study",
        "--replication",
        dest="study",
        action="store_true",
        help="the full study: DynamicViT at rho 0.5/0.7/0.9, fine-tunes at the authors' relative budget, "
        "three seeds of the headline rows, A-ViT's loss weights chosen on validation, fine-tuned baselines, "
        "the whole test split",
    )
    p.add_argument(
        "--runs",
        nargs="+",
        default=None,
        metavar="NAME",
        help="train only these runs (their work-folder names, e.g. dynamicvit@0.7 avit-seed1, or the part before "
        "'@': tome-ft is the ToMe fine-tune at the r matched at run time); the others are "
        "used when finished: two processes can share the study's training this way",
    )
    p.add_argument(
        "--finished-only",
        action="store_true",
        help="train nothing: evaluate and report the fine-tunes already finished (an interim report that "
        "names the missing runs)",
    )
    p.add_argument(
        "--train-only",
        action="store_true",
        help="run (or resume) the fine-tunes only; a later run without it reuses them, evaluates and reports",
    )
    p.add_argument(
        "--workers",
        type=_non_negative_int,
        default=0,
        help="data-loading processes per fine-tune (default 0; the data do not depend on it)",
    )
    _add_device(p)
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_study, study_config

    overrides = {"device": resolve_device(args.device), "workers": args.workers}
    overrides |= {k: getattr(args, k) for k in ("work", "report") if getattr(args, k) is not None}
    if args.runs is not None:
        overrides["only"] = tuple(args.runs)
    if args.finished_only:
        if args.train_only:
            raise ValueError("--finished-only trains nothing and --train-only only trains: give one of them")
        overrides["train"] = False
    cfg = study_config(**overrides) if args.study else DemoConfig(**overrides)
    run_study(cfg, train_only=args.train_only)
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="classify image files with a trained run; --viz draws which tokens it kept",
        description="Read images with PIL, size and normalise them as the run's data set does, print the top "
        "classes of each; with --viz, a picture of the kept patches per stage (DynamicViT, EViT, random, "
        "static), the halting depth (A-ViT) or the merged groups (ToMe).",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    _add_weights(p, positional=False)
    p.add_argument(
        "--top", type=_positive_int, default=3, help="classes shown per image (default: %(default)s)"
    )
    p.add_argument("--viz", default=None, metavar="PNG", help="draw what the model kept into this PNG")
    _add_device(p)
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")
    p.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> int:
    import torch

    from .runs import load_with_config, read_images, run_class_names

    device = resolve_device(args.device)
    model, cfg = load_with_config(
        args.run, model=args.model, method=args.method, img_size=args.img_size, model_kwargs=args.model_kwargs
    )
    model = model.to(device).eval()
    names = run_class_names(args.run, cfg)
    images = read_images(args.images, model, cfg.dataset)
    with torch.no_grad():
        probs = model(images.to(device)).float().softmax(-1).cpu()
    top = probs.topk(min(args.top, probs.shape[1]), dim=1)
    results = []
    for path, p, idx in zip(args.images, top.values.tolist(), top.indices.tolist()):
        classes = [names[i] if names is not None and i < len(names) else str(i) for i in idx]
        results.append(
            {
                "image": path,
                "top": [{"class": c, "index": i, "p": round(q, 4)} for c, i, q in zip(classes, idx, p)],
            }
        )
    if args.viz:
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        from .viz import token_maps

        titles = [f"{Path(r['image']).name}: {r['top'][0]['class']}" for r in results]
        args.viz = str(
            token_maps(
                model, images.to(device), args.viz, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, titles=titles
            )
        )
    if args.json:
        print(json.dumps(results if not args.viz else {"predictions": results, "viz": args.viz}))
    else:
        for r in results:
            shown = ", ".join(f"{t['class']} {100 * t['p']:.1f}%" for t in r["top"])
            print(f"{r['image']}: {shown}")
        if args.viz:
            print(f"wrote {args.viz}")
    return 0


def _version() -> str:
    from . import __version__

    return __version__


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
        default=None,
        choices=["dense", "dynamicvit", "evit", "random", "static", "tome"],
        help="token policy (default: the run's, else dynamicvit); with --run it must be the run's",
    )
    p.add_argument("--checkpoint", default=None, help="weights of the sparsified model (else random weights)")
    p.add_argument("--num-classes", type=_positive_int, default=None, help="classes of the head")
    p.add_argument(
        "--keep-ratio", type=_ratio, default=None, help="keep ratio (default: the run's, else 0.7)"
    )
    p.add_argument(
        "--tome-r",
        type=_non_negative_int,
        default=None,
        help="ToMe: tokens merged per block (default: the run's, else 13)",
    )
    p.add_argument(
        "--seed", type=int, default=None, help="random pruning's seed (default: the run's, else 0)"
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=1, help="fixed batch size (default: %(default)s)"
    )
    p.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")
    _add_target_gflops(p)
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from . import random_prune, tome
    from .bench import make_policy
    from .checkpoints import load_checkpoint
    from .export import export_onnx

    if args.run is not None:  # every setting given reaches the run's method, or is refused
        from .runs import load_with_config

        model = load_with_config(
            args.run,
            method=args.method,
            keep_ratio=args.keep_ratio,
            tome_r=args.tome_r,
            seed=args.seed,
            target_gflops=args.target_gflops,
        )[0]
    else:
        import timm

        from .config import TrainConfig
        from .policies.registry import get_method, resolve

        method = args.method or "dynamicvit"
        kwargs = {} if args.img_size is None else {"img_size": args.img_size}
        if args.num_classes is not None:
            kwargs["num_classes"] = args.num_classes
        model = timm.create_model(args.model, pretrained=False, **kwargs)
        if args.target_gflops is not None and method == "dense":
            raise ValueError("--target-gflops solves a token method's setting; the dense model has none")
        if args.target_gflops is not None:  # the method's recipe, its knob solved
            cfg = TrainConfig(method=method, keep_ratio=args.keep_ratio, tome_r=args.tome_r,
                              target_gflops=args.target_gflops, seed=args.seed or 0).resolved()  # fmt: skip
            model = resolve(get_method(method).sparsify)(model, cfg)
        elif method == "random":
            keep_ratio = 0.7 if args.keep_ratio is None else args.keep_ratio
            model = random_prune(model, keep_ratio=keep_ratio, seed=0 if args.seed is None else args.seed)
        elif method == "tome":
            model = tome(model, r=13 if args.tome_r is None else args.tome_r)
        elif method != "dense":
            model = make_policy(method, 0.7 if args.keep_ratio is None else args.keep_ratio)(model)
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
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_predict(sub)
    _add_demo(sub)
    _add_export(sub)
    return parser


def _given_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options written on the command line (not left at their defaults)."""
    options = {}
    for action in parser._actions:
        for sub in getattr(action, "choices", None) or {}:
            if isinstance(action.choices, dict):
                for inner in action.choices[sub]._actions:
                    options.update({flag: inner.dest for flag in inner.option_strings})
    return {options[token.split("=", 1)[0]] for token in argv if token.split("=", 1)[0] in options}


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 speaks."""
    import os

    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if _rank() > 0:  # under torchrun every rank parses the same flags: one message is enough
        for action in parser._subparsers._group_actions if parser._subparsers else ():
            for sub in getattr(action, "choices", {}).values():
                sub.error = lambda message: sys.exit(2)
        parser.error = lambda message: sys.exit(2)
    args = parser.parse_args(argv)
    args.given = _given_dests(parser, sys.argv[1:] if argv is None else list(argv))
    say = _rank() == 0
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        if say:
            print(f"tokensparse {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a read-only folder, no permission: say which file
        where = f"{err.filename}: " if err.filename else ""
        if say:
            print(f"tokensparse {args.command}: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
