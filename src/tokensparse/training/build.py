"""Building a run's pieces: the process group, the dense timm model with its starting weights, the
teacher, the sparsified student, its parameter groups and objective; and a trained model for inference."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import timm
import torch
import torch.distributed as dist
import torch.nn as nn

from ..checkpoints import read_state_dict
from ..config import BUDGET_KNOBS, TrainConfig
from ..losses import ClassificationLoss
from ..policies.registry import get_method, load_method, method_names, setting_methods
from .run_dir import read_json


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """Join the torchrun process group if launched by torchrun; return (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available here (use --device cpu or auto)")
    if world > 1 and not dist.is_initialized():
        _die_with_launcher()
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu" if device == "auto" else device)


def _die_with_launcher() -> None:
    """Linux: a torchrun worker gets SIGTERM when its launcher dies (even by SIGKILL), instead of going
    on training, or hanging, without it (and holding the run folder's lock)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


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
    """The architecture the method works on: a ViT, or a ConvNeXt / Swin for a spatial method."""
    from ..policies.dynspatial import is_spatial_model

    spatial = is_spatial_model(model)
    wants = get_method(cfg.method).architecture
    if wants == "spatial" and not spatial:
        raise ValueError(
            f"--method {cfg.method} needs a timm ConvNeXt or Swin Transformer (convnext_*, swin_*), "
            f"--model {cfg.model} is a {type(model).__name__}"
            + ("; for a vision transformer use --method dynamicvit" if hasattr(model, "patch_embed") else "")
        )
    if spatial and wants == "vit":
        spatial_methods = [m for m in method_names() if get_method(m).architecture == "spatial"]
        raise ValueError(
            f"--model {cfg.model} is a {type(model).__name__}: it cannot drop tokens (convolutions and "
            f"windows need the full grid), so --method {cfg.method} does not apply; use --method "
            f"{' / '.join(spatial_methods)} (a cheap path for unimportant positions) or dense"
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
        import json
        import shlex

        start = f"--checkpoint {shlex.quote(cfg.checkpoint)}" if cfg.checkpoint else "--pretrained"
        data = f"--dataset {cfg.dataset}" + (
            f" --data-root {shlex.quote(cfg.data_root)}" if cfg.data_root else ""
        )
        # the architecture and input size too: without them the commands would build another model
        shape = f"--model {cfg.model}"
        if cfg.model_kwargs:
            shape += f" --model-kwargs {shlex.quote(json.dumps(cfg.model_kwargs))}"
        if cfg.img_size:
            shape += f" --img-size {cfg.img_size}"
        dense = f"{cfg.output.rstrip('/')}/dense"
        super().__init__(
            f"the starting weights ({start}) have a {head_classes}-class head but the data has "
            f"{data_classes} classes; {cfg.method} needs a model already trained on these classes "
            "(its teacher is the starting model). Fine-tune the dense model first, then sparsify it:\n"
            f"  tokensparse train --method dense {shape} {start} {data} --output {shlex.quote(dense)}\n"
            f"  tokensparse train --method {cfg.method} {shape} --checkpoint "
            f"{shlex.quote(dense + '/model.safetensors')} {data} --output {shlex.quote(cfg.output)}\n"
            "or run both in one command with --finetune-dense-epochs N."
        )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face Hub ($HF_ENDPOINT) opens within `timeout` seconds
    (False at once where $HF_HUB_OFFLINE is set)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _hub_offline():
    """The Hugging Face Hub client in offline mode (cache only) for the duration."""
    try:
        from huggingface_hub import constants
    except ImportError:  # timm without the hub client: nothing to switch
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def pretrained_state_dict(name: str, kwargs: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """timm's pretrained weights of model `name` (from timm's cache, or downloaded if online).

    Raises ValueError when they cannot be had (offline with an empty cache, or no weights for the name).
    With the Hugging Face Hub unreachable (a 3 s connection probe) only the cache is read, so an
    offline machine gets the message at once instead of after the hub client's retries.
    """
    kwargs = {k: v for k, v in (kwargs or {}).items() if k in ("img_size",)}
    try:
        if hub_reachable():
            return timm.create_model(name, pretrained=True, **kwargs).state_dict()
        with _hub_offline():
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


def load_teacher(teacher: nn.Module, path: str, model_name: str) -> None:
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
    build = load_method(cfg.method).sparsify
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
    from ..engine import get_policy

    find = load_method(method).new_parameters
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
    build = load_method(cfg.method).objective or ClassificationLoss.from_config
    return build(cfg, depth)


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
    from ..checkpoints import load_checkpoint

    path = Path(run_or_checkpoint)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} is not a training run: no config.json inside")
        saved = read_json(config_file)
        missing = [k for k in ("num_classes", "img_size") if not isinstance(saved, dict) or k not in saved]
        if missing:
            raise ValueError(
                f"{config_file} is not a tokensparse run's config: "
                + ("expected a JSON object" if not isinstance(saved, dict) else f"it lacks {missing}")
            )
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        method = saved.get("method", "dynamicvit")
        foreign = {k for k, methods in setting_methods().items() if method not in methods}
        cfg = TrainConfig(**{k: v for k, v in saved.items() if k in names and k not in foreign})
        weights = path / "model.safetensors"
        if not weights.is_file():
            pointer = path / "checkpoints" / "last.json"
            if not pointer.is_file():
                raise FileNotFoundError(f"{path} has no model.safetensors and no checkpoint yet")
            weights = path / "checkpoints" / f"epoch{read_json(pointer)['epoch']:04d}.safetensors"
        classes, img_size = saved["num_classes"], saved["img_size"]
    else:
        if cfg is None:
            raise ValueError("loading a bare checkpoint needs a TrainConfig naming the model and method")
        weights, classes, img_size = path, None, cfg.img_size
    if overrides:
        method = get_method(overrides.get("method") or cfg.method)
        if overrides.get("target_gflops") is not None:  # a budget replaces the run's own knob
            if method.budget_knob is None and method.setting("target_gflops") is not None:
                raise ValueError(
                    f"a {method.name} run trained for its own budget ({cfg.target_gflops} GMACs): no setting of it "
                    "solves another; train again with --target-gflops, or build one without training (for DiffRate: "
                    "tokensparse.diffrate(model, target_gflops=...))"
                )
            for knob in BUDGET_KNOBS:
                cfg = cfg.with_setting(knob, None)
        cfg = cfg.with_settings(**overrides)
    cfg = cfg.resolved()
    dense_cfg = dataclasses.replace(cfg, checkpoint=None, pretrained=False, drop_path=0.0)
    if classes is None:
        state = read_state_dict(weights)
        classes = state["head.weight"].shape[0] if "head.weight" in state else 1000
    model = sparsify_for(cfg, build_model(dense_cfg, classes, img_size))
    load_checkpoint(model, weights)
    if img_size is not None:
        record_data_config(model, cfg, img_size)
    return model, cfg


def record_data_config(model: nn.Module, cfg: TrainConfig, img_size: int) -> None:
    """The preprocessing the run trained with, as timm's `pretrained_cfg` (what
    `timm.data.resolve_model_data_config(model)` reads): its image size and ImageNet's mean / std
    (every data set here is normalised so); the clutter set has no crop."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from ..data import CLUTTER_NAME

    channels = int(getattr(getattr(getattr(model, "patch_embed", None), "proj", None), "in_channels", 3))
    data_config = dict(
        input_size=(channels, img_size, img_size), mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD
    )
    if cfg.dataset == CLUTTER_NAME:
        data_config["crop_pct"] = 1.0
    model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), **data_config}
