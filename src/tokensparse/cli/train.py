"""`tokensparse train`: one flag per TrainConfig field, in groups."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .args import _rank, resolve_device

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
    "backbone_lr_scale": "lr multiplier of the backbone (the policy's own parameters train at the full lr)",
    "backbone_fixed_epochs": "epochs at the start during which the backbone's lr is 0 (DynamicViT's fix_step)",
    "freeze_embeddings": "leave cls_token and pos_embed out of the optimiser (DynamicViT's optim_factory)",
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

    from ..config import METHODS, TrainConfig

    fields = [
        (f.name, str(f.type), f.default if f.default is not dataclasses.MISSING else f.default_factory())
        for f in dataclasses.fields(TrainConfig)
    ]
    return fields, tuple(METHODS)


def _add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, typed from its default; a method's setting as the method says."""
    from ..config import METHOD_DEFAULTS, SETTING_METHODS
    from ..policies.registry import COMMON_RECIPE, all_settings

    fields, methods = train_config_fields()
    groups = {
        title: p.add_argument_group(title) for title in ("data", "model", "method", "optimisation", "run")
    }
    where = {name: title for title, names in _GROUPS.items() for name in names}
    specs = all_settings()
    names = [f[0] for f in fields if f[0] != "method_settings"]
    defaults = {name: default for name, _, default in fields}
    annotations = {name: annotation for name, annotation, _ in fields}
    for name in names + [s for s in specs if s not in defaults]:  # then the settings that are not fields
        p = groups[where.get(name, "method")]
        flag = "--" + name.replace("_", "-")
        default = defaults.get(name)
        spec = specs.get(name)
        text = spec.help if spec is not None else _HELP.get(name, "")
        shown = COMMON_RECIPE[name] if default is None and name in COMMON_RECIPE else default
        help_text = text + (f" (default: {shown})" if shown not in (None, {}, []) else "")
        per_method = {m: d[name] for m, d in METHOD_DEFAULTS.items() if name in d}
        if name in COMMON_RECIPE:  # only the methods whose recipe differs
            per_method = {m: v for m, v in per_method.items() if v != COMMON_RECIPE[name]}
            if per_method:
                help_text += " (" + ", ".join(f"{m} {v}" for m, v in per_method.items()) + ")"
        elif per_method:
            shown = ", ".join(f"{m} {v}" for m, v in per_method.items())
            help_text += f" (default per method: {shown})"
        elif name in SETTING_METHODS:
            help_text += f" (--method {' / '.join(SETTING_METHODS[name])} only)"
        if spec is not None:
            _add_setting(p, spec, help_text)
        elif name == "model_kwargs":
            p.add_argument(flag, type=json.loads, default={}, help="extra timm.create_model kwargs as JSON")
        elif name == "method":
            p.add_argument(flag, default=default, choices=methods, help=f"token policy (default: {default})")
        elif isinstance(default, bool) or "bool" in annotations[name]:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif "float" in annotations[name]:
            p.add_argument(flag, type=float, default=default, help=help_text)
        elif "int" in annotations[name]:
            p.add_argument(flag, type=int, default=default, help=help_text)
        else:
            p.add_argument(flag, default=default, help=help_text)


def _add_setting(p: argparse._ActionsContainer, spec, help_text: str) -> None:
    """The flag of a method's `Setting` (unset by default: the method's recipe fills it in)."""
    help_text = help_text.replace("%", "%%")
    if spec.kind is bool:
        p.add_argument(spec.flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    elif spec.kind is list:
        p.add_argument(spec.flag, type=int, nargs="+", default=None, help=help_text)
    elif spec.kind is str:
        p.add_argument(spec.flag, choices=list(spec.choices) or None, default=None, help=help_text)
    else:
        p.add_argument(spec.flag, type=spec.kind, default=None, help=help_text)


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
    from ..config import BUDGET_KNOBS

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
    if "target_gflops" in written:  # the budget solves the knob again; the saved knob is what it solved
        kept |= set(BUDGET_KNOBS)
    return {k: v if k in kept or k not in saved else saved[k] for k, v in given.items()}


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from ..training import TrainConfig, train

    resolve_device(args.device)
    from ..policies.registry import all_settings

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    extra = {k: v for k, v in vars(args).items() if k in all_settings() and k not in names and v is not None}
    if extra:  # a method's own settings that are not TrainConfig fields
        given["method_settings"] = extra
    if args.resume:  # the run's settings, but the flags written now (only --epochs may change)
        given = _resumed_settings(given, getattr(args, "given", set(given)))
    cfg = TrainConfig(**given)
    if args.finetune_dense_epochs is not None:
        from ..runs import train_dense_then_sparse

        metrics = train_dense_then_sparse(cfg, args.finetune_dense_epochs)
    else:
        metrics = train(cfg)
    if metrics and _rank() == 0:  # every rank returns the metrics; one prints them
        from ..training import json_safe

        print(json.dumps(json_safe(metrics)))
    return 0
