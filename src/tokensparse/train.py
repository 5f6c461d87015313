"""Training: `build_run` sets a run up, `train` is the loop, with DDP, AMP, checkpointing and resume visible.

    tokensparse train --method dynamicvit --model deit_small_patch16_224 --checkpoint dense.pth ...
    torchrun --nproc_per_node=2 -m tokensparse train ...        # DDP: gloo on CPU, nccl on CUDA

The student starts from the dense model (timm name, optionally with a checkpoint); for DynamicViT and
A-ViT a frozen copy of that starting model is the teacher (or `teacher=` a checkpoint). Optimiser and
schedule come from timm's factories. Every epoch rank 0 writes the weights (safetensors) and the
training state atomically; `resume=True` continues from the last complete pair.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from tqdm.auto import tqdm

from . import config
from .checkpoints import atomic_write_bytes, read_state_dict, save_checkpoint
from .config import TrainConfig
from .data import CLUTTER_NAME, build_dataset, build_loader, class_names, num_classes
from .evaluate import evaluate
from .losses import ClassificationLoss
from .policies.registry import get_method, resolve, setting_methods


def __getattr__(name: str) -> Any:  # METHODS, METHOD_DEFAULTS, SETTING_METHODS: the registry's views
    return getattr(config, name)


# ----------------------------------------------------------------------------- set-up helpers


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """Join the torchrun process group if launched by torchrun; return (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available here (use --device cpu or auto)")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu" if device == "auto" else device)


def build_model(cfg: TrainConfig, classes: int, img_size: int | None) -> nn.Module:
    """The dense timm model at the data's image size and class count, with the starting weights.

    Starting weights: `cfg.checkpoint` (a file), or timm's own pretrained weights of `cfg.model` with
    `cfg.pretrained`. A dense run replaces a head of another class count with a new one (fine-tuning);
    a sparsifying method refuses it (`HeadMismatchError`): fine-tune the dense model first.
    """
    kwargs = dict(cfg.model_kwargs)
    if img_size is not None:
        kwargs.setdefault("img_size", img_size)
    if cfg.drop_path:
        kwargs["drop_path_rate"] = cfg.drop_path
    if cfg.pretrained and cfg.checkpoint:
        raise ValueError("give either --pretrained (timm's weights) or --checkpoint FILE, not both")
    try:
        try:
            model = timm.create_model(cfg.model, pretrained=False, num_classes=classes, **kwargs)
        except TypeError as err:  # a CNN (ConvNeXt) takes no img_size: it runs at any size
            if "img_size" not in str(err) or "img_size" in cfg.model_kwargs:
                raise
            kwargs.pop("img_size")
            model = timm.create_model(cfg.model, pretrained=False, num_classes=classes, **kwargs)
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise ValueError(str(err)) from err
    except TypeError as err:  # an argument the model does not take (--model-kwargs)
        raise ValueError(
            f"--model {cfg.model} cannot be built with these arguments (--model-kwargs {cfg.model_kwargs}, "
            f"image size {img_size}): {err}; if it is not a vision transformer: tokensparse needs a timm "
            "VisionTransformer (deit_*, vit_*, ...), or a ConvNeXt / Swin for --method dynamicspatial"
        ) from err
    _check_architecture(cfg, model)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if img_size is not None and patch is not None and (img_size % patch[0] or img_size % patch[1]):
        raise ValueError(f"image size {img_size} is not a multiple of {cfg.model}'s patch size {patch[0]}")
    if cfg.checkpoint or cfg.pretrained:
        source = cfg.checkpoint or f"timm's pretrained {cfg.model}"
        state = (
            read_state_dict(cfg.checkpoint) if cfg.checkpoint else pretrained_state_dict(cfg.model, kwargs)
        )
        state = {k: v for k, v in state.items() if not k.startswith("score_predictor.")}
        for head in ("head", "head_dist"):
            weight = state.get(f"{head}.weight")
            if weight is not None and weight.shape[0] != classes:
                if cfg.method != "dense":
                    raise HeadMismatchError(cfg, weight.shape[0], classes)
                warnings.warn(
                    f"{source}: {head} has {weight.shape[0]} classes but the data has {classes}; "
                    f"{head} is replaced by a new, randomly initialised one",
                    stacklevel=2,
                )
                state.pop(f"{head}.weight"), state.pop(f"{head}.bias", None)
        _check_shapes(model, state, f"--checkpoint {cfg.checkpoint}", cfg.model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(("head.", "head_dist."))]
        if missing or unexpected:
            raise ValueError(
                f"{source} does not fit {cfg.model}: missing {missing[:6]}, unexpected {unexpected[:6]}"
            )
    return model


def _check_architecture(cfg: TrainConfig, model: nn.Module) -> None:
    """ViTs for the token methods, ConvNeXt / Swin for dynamicspatial (and either for dense)."""
    from .policies.dynspatial import is_spatial_model

    spatial = is_spatial_model(model)
    if cfg.method == "dynamicspatial" and not spatial:
        raise ValueError(
            f"--method dynamicspatial needs a timm ConvNeXt or Swin Transformer (convnext_*, swin_*), "
            f"--model {cfg.model} is a {type(model).__name__}"
            + ("; for a vision transformer use --method dynamicvit" if hasattr(model, "patch_embed") else "")
        )
    if spatial and cfg.method not in ("dense", "dynamicspatial"):
        raise ValueError(
            f"--model {cfg.model} is a {type(model).__name__}: it cannot drop tokens (convolutions and "
            f"windows need the full grid), so --method {cfg.method} does not apply; use --method "
            "dynamicspatial (a cheap path for unimportant positions) or dense"
        )
    if not spatial and (not hasattr(model, "patch_embed") or not hasattr(model, "blocks")):
        raise ValueError(
            f"--model {cfg.model} is a {type(model).__name__}, not a vision transformer: tokensparse "
            "needs a timm VisionTransformer (deit_*, vit_*, ...), or a ConvNeXt / Swin for "
            "--method dynamicspatial"
        )


class HeadMismatchError(ValueError):
    """The starting weights classify other classes than the data: sparsifying them needs a dense fine-tune first."""

    def __init__(self, cfg: TrainConfig, head_classes: int, data_classes: int) -> None:
        start = f"--checkpoint {cfg.checkpoint}" if cfg.checkpoint else "--pretrained"
        data = f"--dataset {cfg.dataset}" + (f" --data-root {cfg.data_root}" if cfg.data_root else "")
        dense = f"{cfg.output.rstrip('/')}/dense"
        super().__init__(
            f"the starting weights ({start}) have a {head_classes}-class head but the data has "
            f"{data_classes} classes; {cfg.method} needs a model already trained on these classes "
            "(its teacher is the starting model). Fine-tune the dense model first, then sparsify it:\n"
            f"  tokensparse train --method dense --model {cfg.model} {start} {data} --output {dense}\n"
            f"  tokensparse train --method {cfg.method} --model {cfg.model} --checkpoint "
            f"{dense}/model.safetensors {data} --output {cfg.output}\n"
            "or run both in one command with --finetune-dense-epochs N."
        )


def pretrained_state_dict(name: str, kwargs: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """timm's pretrained weights of model `name` (from timm's cache, or downloaded if online).

    Raises ValueError when they cannot be had (offline with an empty cache, or no weights for the name).
    """
    kwargs = {k: v for k, v in (kwargs or {}).items() if k in ("img_size",)}
    try:
        return timm.create_model(name, pretrained=True, **kwargs).state_dict()
    except Exception as err:  # hub, urllib and timm raise many types (OSError, RuntimeError, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"timm's pretrained weights for {name} are not available offline or could not be fetched "
            f"({type(err).__name__}: {first}); download them once with network access (they are "
            "cached), or pass the weights file with --checkpoint FILE"
        ) from err


def _check_shapes(model: nn.Module, state: dict[str, torch.Tensor], what: str, name: str) -> None:
    own = model.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(f"{what} does not fit {name}: shape mismatch in {'; '.join(wrong[:4])}")


def _load_teacher(teacher: nn.Module, path: str, model_name: str) -> None:
    """The teacher's weights: the dense model's keys and shapes exactly (a DynamicViT's predictors dropped)."""
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("score_predictor.")}
    _check_shapes(teacher, state, f"--teacher {path}", model_name)
    missing, unexpected = teacher.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"--teacher {path} does not fit {model_name}: missing {missing[:6]}, unexpected {unexpected[:6]}"
        )


def sparsify_for(cfg: TrainConfig, model: nn.Module) -> nn.Module:
    """The dense `model` sparsified by `cfg.method` with `cfg`'s settings (the registry's constructor)."""
    build = resolve(get_method(cfg.method).sparsify)
    return model if build is None else build(model, cfg)


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups as DynamicViT's optim_factory builds them (`cfg` resolved).

    The policy's own parameters (DynamicViT's predictors) train at the full lr from the start; the
    backbone at lr x `backbone_lr_scale` (timm's schedulers apply a group's `lr_scale`) and at lr 0 for
    its first `backbone_fixed_epochs` epochs (the group's `fixed_epochs`, applied by
    `apply_fixed_epochs`); no weight decay on biases, 1-d parameters and the model's no_weight_decay();
    with `freeze_embeddings`, cls_token and pos_embed are frozen (left out of the optimiser).
    """
    new_params = {id(p) for p in new_parameters(model, cfg.method)}
    if cfg.freeze_embeddings:
        for name in ("cls_token", "pos_embed"):
            param = getattr(model, name, None)
            if isinstance(param, nn.Parameter):
                param.requires_grad_(False)
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        new = id(param) in new_params
        no_decay = param.ndim <= 1 or name.endswith(".bias") or name in skip
        groups.setdefault((new, no_decay), []).append(param)
    return [
        {
            "params": params,
            "weight_decay": 0.0 if no_decay else cfg.weight_decay,
            "lr_scale": 1.0 if new else cfg.backbone_lr_scale,
            "fixed_epochs": 0 if new else cfg.backbone_fixed_epochs,
            "group": ("policy" if new else "backbone") + ("_no_decay" if no_decay else ""),
        }
        for (new, no_decay), params in groups.items()
    ]


def new_parameters(model: nn.Module, method: str) -> list[nn.Parameter]:
    """The parameters `method` added to the backbone: its registered `new_parameters`, else its policy's."""
    from .engine import get_policy

    find = resolve(get_method(method).new_parameters)
    if find is not None:
        return list(find(model))
    policy = get_policy(model)
    return list(policy.parameters()) if isinstance(policy, nn.Module) else []


def apply_fixed_epochs(optimizer: torch.optim.Optimizer, epoch: int) -> None:
    """lr 0 for the groups still in their `fixed_epochs` (DynamicViT's fix_step), after a scheduler step."""
    for group in optimizer.param_groups:
        if epoch < group.get("fixed_epochs", 0):
            group["lr"] = 0.0


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current lr of each named parameter group (for the logs)."""
    return {group.get("group", str(i)): group["lr"] for i, group in enumerate(optimizer.param_groups)}


def build_criterion(cfg: TrainConfig, depth: int = 12) -> nn.Module:
    """The method's training objective (its registered `objective`, else `ClassificationLoss`)."""
    build = resolve(get_method(cfg.method).objective) or ClassificationLoss.from_config
    return build(cfg, depth)


def compute_loss(cfg, model, criterion, teacher, images, targets) -> tuple[torch.Tensor, dict[str, float]]:
    """The method's objective on one batch (a function so tests can inject faults)."""
    return criterion.step(model, images, targets, teacher)


def _rng_state(loader: torch.utils.data.DataLoader | None = None) -> dict[str, Any]:
    """This process's random state: torch (CPU, CUDA), Python, NumPy (Mixup) and the loader's generator."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(py_state),
        "python_version": py_version,
        "python_gauss": py_gauss,
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
    }
    if loader is not None and loader.generator is not None:
        state["loader"] = loader.generator.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], loader: torch.utils.data.DataLoader | None = None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "numpy" in state:
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "loader" in state and loader is not None and loader.generator is not None:
        loader.generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _all_rng_states(world: int, loader: torch.utils.data.DataLoader) -> list[dict[str, Any]]:
    """Every rank's random state, on every rank (a collective: all ranks call it)."""
    mine = _rng_state(loader)
    if world == 1:
        return [mine]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    return gathered


def _atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(buffer.getvalue(), path)


def _atomic_write_text(text: str, path: Path) -> None:
    atomic_write_bytes(text.encode(), path)


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by None: JSON has no NaN (json.dumps would write it)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl, rewritten whole from the history (which the checkpoint state also holds)."""
    lines = (json.dumps(json_safe(m), allow_nan=False) + "\n" for m in history)
    _atomic_write_text("".join(lines), path)


def _checkpoint_epoch(path: Path) -> int | None:
    digits = path.name.removeprefix("epoch")[:4]
    return int(digits) if path.name.startswith("epoch") and digits.isdigit() else None


def _clean_checkpoints(ckpt: Path, last: int | None, keep: int) -> None:
    """Delete temporary files of interrupted writes, files of epochs after `last` (a killed epoch's)
    and all but the `keep` newest complete epochs."""
    for tmp in ckpt.parent.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    if not ckpt.is_dir():
        return
    for tmp in ckpt.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    epochs = sorted({e for f in ckpt.glob("epoch*") if (e := _checkpoint_epoch(f)) is not None})
    kept = [e for e in epochs if last is not None and e <= last][-keep:]
    for f in ckpt.glob("epoch*"):
        if _checkpoint_epoch(f) is not None and _checkpoint_epoch(f) not in kept:
            f.unlink(missing_ok=True)


def save_training_state(
    out: Path, epoch: int, model, optimizer, scheduler, scaler, extra: dict, keep: int
) -> None:
    """Weights (safetensors) and state (tensors and plain values only), then the `last.json` pointer.

    `extra` holds what resuming needs beyond the modules: the update count, the metrics history and
    every rank's random state. A kill at any moment leaves `last.json` naming a complete pair.
    """
    ckpt = out / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, ckpt / f"epoch{epoch:04d}.safetensors", {"epoch": epoch})
    state = {
        "epoch": epoch,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": _rng_state(),
        **extra,
    }
    _atomic_torch_save(state, ckpt / f"epoch{epoch:04d}.state.pt")
    _atomic_write_text(json.dumps({"epoch": epoch}), ckpt / "last.json")
    _clean_checkpoints(ckpt, epoch, keep)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupt (not JSON: {err}); delete it or the run folder") from err


def load_training_state(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    pointer = out / "checkpoints" / "last.json"
    if not pointer.is_file():
        return None
    saved = _read_json(pointer)
    if not isinstance(saved, dict) or not isinstance(saved.get("epoch"), int):
        raise ValueError(f'{pointer} is corrupt: expected {{"epoch": <int>}}, got {saved!r}')
    epoch = saved["epoch"]
    weights_file = out / "checkpoints" / f"epoch{epoch:04d}.safetensors"
    state_file = out / "checkpoints" / f"epoch{epoch:04d}.state.pt"
    for f in (weights_file, state_file):
        if not f.is_file():
            raise ValueError(f"cannot resume: {pointer} names epoch {epoch} but {f} is missing")
    weights = read_state_dict(weights_file)
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged file
        raise ValueError(f"cannot resume: {state_file} is not a readable training state ({err})") from err
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng"} <= set(state):
        raise ValueError(f"cannot resume: {state_file} is not a training state of tokensparse")
    return weights, state


# fields a resumed run may change: they do not change what is computed (epochs extends the schedule)
_RESUME_MAY_CHANGE = (
    "epochs",
    "resume",
    "overwrite",
    "output",
    "device",
    "keep_checkpoints",
    "max_nan_streak",
)
_RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "model.safetensors")


def config_differences(
    cfg: TrainConfig, saved: dict[str, Any], extra: dict[str, Any], ignored: tuple[str, ...]
) -> list[str]:
    """'key: saved -> now' for each setting of `cfg` (with the run facts `extra` train() derives) in
    which a run's saved config.json differs, `ignored` aside; a key the file lacks is at its default."""
    now = json.loads(json.dumps(dataclasses.asdict(cfg) | extra))
    defaults = {f.name: getattr(TrainConfig(), f.name) for f in dataclasses.fields(TrainConfig)}
    return [
        f"{key}: {saved.get(key, defaults.get(key))!r} -> {value!r}"
        for key, value in now.items()
        if key not in ignored and saved.get(key, defaults.get(key)) != value
    ]


def _claim_output(cfg: TrainConfig, out: Path, extra: dict[str, Any], is_main: bool) -> dict | None:
    """Make sure the run folder belongs to this run; return the saved config when resuming one.

    A new run refuses a folder holding another run (unless `overwrite`, which deletes that run's
    files); `resume` refuses a run whose configuration differs in anything but `_RESUME_MAY_CHANGE`.
    """
    used = [name for name in _RUN_FILES if (out / name).exists()]
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run or replace it")
    if not used:
        return None
    if not cfg.resume:
        if not cfg.overwrite:
            raise ValueError(
                f"{out} already holds a run ({', '.join(used)}): continue it with --resume, replace it "
                "with --overwrite, or choose another --output"
            )
        if is_main:
            import shutil

            for name in (*_RUN_FILES, "teacher.safetensors", "tensorboard"):
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        return None
    config_file = out / "config.json"
    if not config_file.is_file():
        raise ValueError(f"cannot resume: {out} holds {', '.join(used)} but no config.json")
    saved = _read_json(config_file)
    if not isinstance(saved, dict):
        raise ValueError(f"{config_file} is corrupt: expected a JSON object")
    differences = config_differences(cfg, saved, extra, _RESUME_MAY_CHANGE)
    if differences:
        raise ValueError(
            f"cannot resume {out}: its run has another configuration ({'; '.join(differences)}); only "
            "--epochs may change on resume. Use another --output, or --overwrite to start afresh"
        )
    return saved


def _autocast(device: torch.device, enabled: bool):
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


# ----------------------------------------------------------------------------- building the run


@dataclass
class Run:
    """Everything the training loop uses, built by `build_run`: the process, data, models, optimiser
    and, when resuming, where the last run stopped."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    out: Path
    train_set: Any
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    model: nn.Module
    ddp_model: nn.Module  # the model, wrapped in DDP when there are several processes
    teacher: nn.Module | None
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    mixup: Mixup | None
    writer: Any = None  # TensorBoard's SummaryWriter on rank 0, when installed
    start_epoch: int = 0
    updates: int = 0  # optimiser steps taken (non-finite steps skipped do not count)
    nan_skipped: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def build_run(cfg: TrainConfig) -> Run:
    """Set up a run as `cfg` (resolved) says: process group, data, student and teacher, optimiser,
    schedule, AMP and Mixup; claim the output folder and resume from its last checkpoint if asked."""
    rank, world, device = setup_distributed(cfg.device)
    _seed_everything(cfg.seed)  # every rank builds the same model (and the same teacher from it)

    subset = dict(fresh_subset=True, limit_seed=cfg.seed) if cfg.fresh_subset else {}
    train_set = build_dataset(
        cfg.dataset, cfg.data_root, "train", cfg.img_size, limit=cfg.train_limit, **subset
    )
    # the clutter set's object boxes: validation then reports halting depth / kept share on the object
    boxes = {"return_box": True} if cfg.dataset == CLUTTER_NAME else {}
    val_set = build_dataset(cfg.dataset, cfg.data_root, "val", cfg.img_size, limit=cfg.val_limit, **boxes)
    classes = num_classes(train_set)
    image = train_set[0][0]
    img_size = int(image.shape[-1])
    train_loader = build_loader(
        train_set,
        cfg.batch_size,
        True,
        cfg.workers,
        cfg.seed,
        drop_last=len(train_set) >= cfg.batch_size * world,
    )
    val_loader = build_loader(val_set, cfg.batch_size, False, cfg.workers, cfg.seed)

    model = build_model(cfg, classes, img_size)
    teacher = None
    if cfg.distill_weight:  # resolved: a number for every method but the dense one, which has no teacher
        teacher = copy.deepcopy(model)
        if cfg.teacher:
            _load_teacher(teacher, cfg.teacher, cfg.model)
        teacher.requires_grad_(False).eval().to(device)
    model = sparsify_for(cfg, model).to(device)
    criterion = build_criterion(cfg, len(getattr(model, "blocks", ())))

    optimizer = create_optimizer_v2(
        parameter_groups(model, cfg), opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        step_on_epochs=False,
        updates_per_epoch=len(train_loader),
    )
    scaler = torch.amp.GradScaler("cuda") if cfg.amp and device.type == "cuda" else None
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing, num_classes=classes
        )
    run = Run(
        cfg=cfg,
        rank=rank,
        world=world,
        device=device,
        out=Path(cfg.output),
        train_set=train_set,
        train_loader=train_loader,
        val_loader=val_loader,
        model=model,
        ddp_model=model,
        teacher=teacher,
        criterion=criterion,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        mixup=mixup,
    )

    run_facts = {"num_classes": classes, "img_size": img_size, "world_size": world}
    saved_cfg = _claim_output(cfg, run.out, run_facts, run.is_main)
    if world > 1:  # no rank may look at the folder after rank 0 starts writing to it
        dist.barrier()
    loaded = load_training_state(run.out) if saved_cfg is not None else None
    if loaded is not None:
        _resume(run, saved_cfg, *loaded)
    else:
        _seed_everything(cfg.seed + rank)  # each rank its own noise (drop path, Gumbel, augmentation)
    if run.is_main:
        _write_run_files(run, run_facts, resumed=loaded is not None)
        run.writer = _tensorboard(run.out)
    if world > 1:
        run.ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return run


def _resume(
    run: Run, saved_cfg: dict[str, Any], weights: dict[str, torch.Tensor], state: dict[str, Any]
) -> None:
    """Continue `run` from its last checkpoint: weights, optimiser, schedule, scaler, teacher, random state."""
    cfg, out = run.cfg, run.out
    try:
        run.model.load_state_dict(weights)
        run.optimizer.load_state_dict(state["optimizer"])
        if saved_cfg.get("epochs") == cfg.epochs:
            run.scheduler.load_state_dict(state["scheduler"])
        if run.scaler is not None and state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])
        if run.teacher is not None:
            run.teacher.load_state_dict(read_state_dict(out / "teacher.safetensors"))
    except (RuntimeError, KeyError, ValueError) as err:
        raise ValueError(f"cannot resume from {out}/checkpoints: {str(err).splitlines()[0]}") from err
    per_rank = state.get("rng_per_rank", [state["rng"]])
    _set_rng_state(per_rank[run.rank] if run.rank < len(per_rank) else state["rng"], run.train_loader)
    run.start_epoch, run.nan_skipped = state["epoch"] + 1, state.get("nan_skipped", 0)
    # the update count, not epochs x batches: skipped non-finite steps do not advance the schedule
    run.updates = state.get("updates", run.start_epoch * len(run.train_loader))
    if saved_cfg.get("epochs") != cfg.epochs:  # the schedule of the new length, from this update on
        run.scheduler.step_update(num_updates=run.updates)
    run.history = state.get("history") or _read_metrics(out / "metrics.jsonl", run.start_epoch)
    if run.is_main:
        _write_metrics(out / "metrics.jsonl", run.history)  # lines a kill lost come back
        print(f"resumed from {out}/checkpoints after epoch {run.start_epoch}")


def _write_run_files(run: Run, run_facts: dict[str, Any], resumed: bool) -> None:
    """Rank 0: config.json, classes.json and the teacher's weights; stale checkpoint files removed."""
    out = run.out
    out.mkdir(parents=True, exist_ok=True)
    _clean_checkpoints(
        out / "checkpoints", run.start_epoch - 1 if resumed else None, run.cfg.keep_checkpoints
    )
    _atomic_write_text(json.dumps(dataclasses.asdict(run.cfg) | run_facts, indent=2), out / "config.json")
    names = class_names(run.train_set)
    if names is not None:  # for `tokensparse predict`
        _atomic_write_text(json.dumps(names), out / "classes.json")
    if run.teacher is not None and not (out / "teacher.safetensors").exists():
        save_checkpoint(run.teacher, out / "teacher.safetensors")


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train as `cfg` says; return the last epoch's metrics (rank 0 also writes them to metrics.jsonl).

    Settings left None take the method's registered recipe; config.json records them.
    """
    cfg = cfg.resolved()
    run = build_run(cfg)
    model, optimizer, device = run.model, run.optimizer, run.device
    metrics: dict[str, Any] = {}
    streak = 0  # consecutive non-finite losses
    for epoch in range(run.start_epoch, cfg.epochs):
        _start_epoch(run, epoch)
        apply_fixed_epochs(optimizer, epoch)
        skipped_before = run.nan_skipped
        running, seen, tic = 0.0, 0, time.perf_counter()
        bar = tqdm(
            run.train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not run.is_main, leave=False
        )
        for images, targets, *_ in bar:
            images, targets = images.to(device), targets.to(device)
            if run.mixup is not None:
                images, targets = run.mixup(images, targets)
            with _autocast(device, cfg.amp):
                loss, _ = compute_loss(cfg, run.ddp_model, run.criterion, run.teacher, images, targets)
            if not _finite_on_every_rank(loss, run):  # skip the step on every rank, or DDP would hang
                run.nan_skipped, streak = run.nan_skipped + 1, streak + 1
                optimizer.zero_grad(set_to_none=True)
                if streak >= cfg.max_nan_streak:
                    raise FloatingPointError(
                        f"{streak} consecutive non-finite losses at epoch {epoch}, step {run.updates}: aborting; "
                        "lower the learning rate or enable gradient clipping (--clip-grad)"
                    )
                continue
            streak = 0
            _optimizer_step(run, loss)
            run.updates += 1
            run.scheduler.step_update(num_updates=run.updates)
            apply_fixed_epochs(optimizer, epoch)
            running += loss.item() * images.shape[0]
            seen += images.shape[0]
            img_s = seen * run.world / (time.perf_counter() - tic)
            bar.set_postfix(loss=f"{loss.item():.3f}", **_sparsity_postfix(model), img_s=f"{img_s:.0f}")
        bar.close()
        lrs = group_lrs(optimizer)
        run.scheduler.step(epoch + 1)
        val = evaluate(model, run.val_loader, device=device, progress=False, amp=cfg.amp)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": _mean_across_ranks(running, seen, device),
            "lr": max(lrs.values()),
            "lr_groups": lrs,
            "nan_skipped": run.nan_skipped,
            "nan_skipped_epoch": run.nan_skipped - skipped_before,
            "epoch_seconds": round(time.perf_counter() - tic, 2),
            **{f"val_{k}": v for k, v in val.items()},
        }
        _end_epoch(run, epoch, metrics)
    if run.is_main:
        save_checkpoint(model, run.out / "model.safetensors", {"method": cfg.method, "model": cfg.model})
    if run.writer is not None:
        run.writer.close()
    return metrics


def _start_epoch(run: Run, epoch: int) -> None:
    """The epoch's shuffle (and, for the clutter set, fresh canvases); the model in train mode."""
    run.train_loader.sampler.set_epoch(epoch)
    if hasattr(run.train_set, "set_epoch"):
        run.train_set.set_epoch(epoch)
    run.ddp_model.train()


def _finite_on_every_rank(loss: torch.Tensor, run: Run) -> bool:
    finite = torch.isfinite(loss.detach())
    if run.world > 1:
        flag = finite.float().to(run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = flag.bool()
    return bool(finite)


def _optimizer_step(run: Run, loss: torch.Tensor) -> None:
    """Backward (scaled under fp16 AMP), gradient clipping, optimiser step."""
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
    else:
        loss.backward()
    if run.cfg.clip_grad:
        nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.clip_grad)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()


def _end_epoch(run: Run, epoch: int, metrics: dict[str, Any]) -> None:
    """Record the epoch: metrics history, checkpoint and training state (rank 0), logs; ranks meet after."""
    run.history.append(metrics)
    rng_states = _all_rng_states(run.world, run.train_loader)  # a collective: every rank takes part
    if run.is_main:
        save_training_state(
            run.out,
            epoch,
            run.model,
            run.optimizer,
            run.scheduler,
            run.scaler,
            {
                "nan_skipped": run.nan_skipped,
                "updates": run.updates,
                "history": run.history,
                "rng_per_rank": rng_states,
            },
            run.cfg.keep_checkpoints,
        )
        _write_metrics(run.out / "metrics.jsonl", run.history)
        if run.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    run.writer.add_scalar(key, value, epoch + 1)
        print(_epoch_line(metrics), flush=True)
    if run.world > 1:
        dist.barrier()


def _read_metrics(path: Path, last_epoch: int) -> list[dict[str, Any]]:
    """The metric lines up to `last_epoch` (checkpoints of older versions hold no history)."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return [m for m in map(json.loads, lines) if m["epoch"] <= last_epoch]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is corrupt ({err})") from err


def _sparsity_postfix(model: nn.Module) -> dict[str, str]:
    from .engine import get_policy, sparsity_info

    policy = get_policy(model)
    return {} if policy is None else policy.progress(sparsity_info(model))


def _mean_across_ranks(total: float, count: int, device: torch.device) -> float:
    if dist.is_initialized():
        t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = t.tolist()
    return total / count if count else math.nan


def _epoch_line(m: dict[str, Any]) -> str:
    parts = [
        f"epoch {m['epoch']}",
        f"loss {m['train_loss']:.4f}",
        f"val top1 {m.get('val_top1', math.nan):.2f}",
    ]
    if "val_gflops" in m:
        parts.append(f"GFLOPs {m['val_gflops']:.3f}")
    if m.get("nan_skipped_epoch"):
        parts.append(f"skipped {m['nan_skipped_epoch']} non-finite steps")
    return "  ".join(parts)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def load_trained(
    run_or_checkpoint: str | os.PathLike,
    cfg: TrainConfig | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[nn.Module, TrainConfig]:
    """Rebuild a trained model from a run folder (config.json + model.safetensors, or the last epoch).

    `overrides` replace fields of the run's config before the model is built (keep_ratio=0.5 to run a
    pruning method at another ratio, gate_center= for A-ViT, tome_r= for ToMe): the method is built
    from the changed settings, so every setting it reads takes effect, and one it does not read is
    refused (ValueError) as `train` refuses it."""
    from .checkpoints import load_checkpoint

    path = Path(run_or_checkpoint)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} is not a training run: no config.json inside")
        saved = _read_json(config_file)
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        method = saved.get("method", "dynamicvit")
        foreign = {k for k, methods in setting_methods().items() if method not in methods}
        cfg = TrainConfig(**{k: v for k, v in saved.items() if k in names and k not in foreign})
        weights = path / "model.safetensors"
        if not weights.is_file():
            pointer = path / "checkpoints" / "last.json"
            if not pointer.is_file():
                raise FileNotFoundError(f"{path} has no model.safetensors and no checkpoint yet")
            weights = path / "checkpoints" / f"epoch{_read_json(pointer)['epoch']:04d}.safetensors"
        classes, img_size = saved["num_classes"], saved["img_size"]
    else:
        if cfg is None:
            raise ValueError("loading a bare checkpoint needs a TrainConfig naming the model and method")
        weights, classes, img_size = path, None, cfg.img_size
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    cfg = cfg.resolved()
    dense_cfg = dataclasses.replace(cfg, checkpoint=None, pretrained=False, drop_path=0.0)
    if classes is None:
        state = read_state_dict(weights)
        classes = state["head.weight"].shape[0] if "head.weight" in state else 1000
    model = sparsify_for(cfg, build_model(dense_cfg, classes, img_size))
    load_checkpoint(model, weights)
    return model, cfg
