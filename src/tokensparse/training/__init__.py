"""Training as a small package: `build` (model, teacher, parameter groups, objective; a trained model for
inference), `run_dir` (the run folder: claim, config, state, metrics, atomic writes) and `loop` (the
training loop, readable top to bottom).

The student starts from the dense model (timm name, optionally with a checkpoint); for DynamicViT and
A-ViT a frozen copy of that starting model is the teacher (or `teacher=` a checkpoint). Optimiser and
schedule come from timm's factories. Every epoch rank 0 writes the weights (safetensors) and the
training state atomically; `resume=True` continues from the last complete pair.
"""

from __future__ import annotations

from typing import Any

from .. import config
from ..config import TrainConfig
from .build import (
    HeadMismatchError,
    apply_fixed_epochs,
    build_criterion,
    build_model,
    group_lrs,
    load_trained,
    new_parameters,
    parameter_groups,
    pretrained_state_dict,
    setup_distributed,
    sparsify_for,
)
from .loop import Run, build_run, compute_loss, train
from .run_dir import config_differences, json_safe, load_training_state, save_training_state

__all__ = [
    "HeadMismatchError",
    "Run",
    "TrainConfig",
    "apply_fixed_epochs",
    "build_criterion",
    "build_model",
    "build_run",
    "compute_loss",
    "config_differences",
    "group_lrs",
    "json_safe",
    "load_trained",
    "load_training_state",
    "new_parameters",
    "parameter_groups",
    "pretrained_state_dict",
    "save_training_state",
    "setup_distributed",
    "sparsify_for",
    "train",
]


def __getattr__(name: str) -> Any:  # METHODS, METHOD_DEFAULTS, SETTING_METHODS: the registry's views
    return getattr(config, name)
