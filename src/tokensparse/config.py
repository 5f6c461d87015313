"""Training settings: `TrainConfig`, resolved against each method's registered recipe (no torch
import, so the CLI parses arguments fast)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .policies.registry import all_settings, budget_knobs, get_method, method_names, setting_methods


def __getattr__(name: str) -> Any:
    """METHODS, METHOD_DEFAULTS, SETTING_METHODS and BUDGET_KNOBS: views of the method registry as it is now."""
    if name == "BUDGET_KNOBS":  # the settings a FLOP budget (--target-gflops) solves, one per method
        return budget_knobs()
    if name == "METHODS":
        return method_names()
    if name == "METHOD_DEFAULTS":
        return {m: get_method(m).defaults() for m in method_names()}
    if name == "SETTING_METHODS":
        return setting_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class TrainConfig:
    """Everything a run needs; saved as config.json beside its checkpoints."""

    method: str = "dynamicvit"
    model: str = "deit_tiny_patch16_224"
    checkpoint: str | None = None
    pretrained: bool = False
    teacher: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str = "fashion-mnist-clutter"
    data_root: str | None = None
    img_size: int | None = None
    train_limit: int | None = None
    # with train_limit: each epoch draws its items afresh (seeded by `seed` and the epoch) from the whole split
    fresh_subset: bool = False
    val_limit: int | None = None
    epochs: int | None = None
    batch_size: int = 64
    lr: float | None = None
    min_lr: float | None = None
    weight_decay: float | None = None
    warmup_epochs: int | None = None
    warmup_lr: float = 1e-6
    opt: str = "adamw"
    sched: str = "cosine"
    clip_grad: float | None = None
    drop_path: float = 0.0
    smoothing: float | None = None
    mixup: float | None = None
    cutmix: float | None = None
    # Method settings: None takes the method's default (its registered recipe), which config.json
    # records; a setting of another method is an error.
    keep_ratio: float | None = None
    locations: list[int] | None = None
    ratio_weight: float | None = None
    token_distill: str | None = None
    gate_scale: float | None = None
    gate_center: float | None = None
    halt_eps: float | None = None
    ponder_weight: float | None = None
    prior_weight: float | None = None
    prior_depth: int | None = None
    straight_through_zeroing: bool | None = None
    tome_r: int | None = None
    # a FLOP budget instead of keep_ratio / tome_r: the knob is solved on the model (tokensparse.budget)
    target_gflops: float | None = None
    # the settings of a method that are not fields here (a method added outside the package), by name
    method_settings: dict[str, Any] = field(default_factory=dict)
    # Fine-tuning recipe, per method (None: the method's default).
    distill_weight: float | None = None
    backbone_lr_scale: float | None = None
    backbone_fixed_epochs: int | None = None
    freeze_embeddings: bool | None = None
    amp: bool = False
    device: str = "auto"
    workers: int = 0
    seed: int = 0
    output: str = "runs/train"
    resume: bool = False
    overwrite: bool = False
    max_nan_streak: int = 20
    keep_checkpoints: int = 2

    def get(self, name: str) -> Any:
        """The setting `name`: a field, else `method_settings[name]` (None when unset)."""
        return getattr(self, name) if name in _FIELDS else self.method_settings.get(name)

    def with_setting(self, name: str, value: Any, **fields: Any) -> TrainConfig:
        """A copy with the setting `name` (a field or a `method_settings` entry) at `value`."""
        return self.with_settings(**{name: value}, **fields)

    def with_settings(self, **values: Any) -> TrainConfig:
        """A copy with `values` set: `TrainConfig` fields, and a method's own settings that are not fields
        (into `method_settings`; `validate` refuses a name no method reads)."""
        fields = {k: v for k, v in values.items() if k in _FIELDS}
        extra = {k: v for k, v in values.items() if k not in _FIELDS}
        if extra:
            fields["method_settings"] = {**self.method_settings, **extra}
        return dataclasses.replace(self, **fields)

    def validate(self) -> None:
        method = get_method(self.method)  # ValueError naming the registered methods
        if not isinstance(self.method_settings, dict):
            raise ValueError(f"method_settings must be a JSON object, got {self.method_settings!r}")
        for name in self.method_settings:
            if name in _FIELDS or name not in setting_methods():
                raise ValueError(f"method_settings: {name!r} is not a method's own setting")
        for name, methods in setting_methods().items():
            if self.get(name) is not None and self.method not in methods:
                flag = "--" + name.replace("_", "-")
                raise ValueError(
                    f"{flag} applies to --method {' / '.join(methods)}, not {self.method}: "
                    f"remove it or choose one of those methods"
                )
        if self.target_gflops is not None and method.budget_knob is not None:
            if self.get(method.budget_knob) is not None:
                flag = "--" + method.budget_knob.replace("_", "-")
                raise ValueError(f"give {flag} or --target-gflops, not both: the budget solves the setting")
        for name, spec in all_settings().items():
            spec.check(self.get(name))
        if self.backbone_fixed_epochs is not None and self.backbone_fixed_epochs < 0:
            raise ValueError(f"--backbone-fixed-epochs must be >= 0, got {self.backbone_fixed_epochs}")
        if self.backbone_lr_scale is not None and not self.backbone_lr_scale >= 0:
            raise ValueError(f"--backbone-lr-scale must be >= 0, got {self.backbone_lr_scale}")
        if self.distill_weight is not None and not self.distill_weight >= 0:
            raise ValueError(f"--distill-weight must be >= 0, got {self.distill_weight}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_epochs is not None and self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        _check_ranges(self)

    def resolved(self) -> TrainConfig:
        """A validated copy with every unset setting of this method at the method's default.

        A schedule longer than the run is scaled to its share of a short run rather than silently
        kept: a warm-up of `epochs` or more becomes epochs // 6 (the authors' 5 of 30), and so does a
        method's default frozen-backbone span (DynamicViT's 5 epochs: with --epochs 1 the backbone
        would never train); `schedule_notes` says what changed. A frozen span set explicitly must be
        shorter than the run."""
        self.validate()
        method = get_method(self.method)
        knobs = (method.budget_knob,) if self.target_gflops is not None else ()  # the budget solves it
        defaults = {k: v for k, v in method.defaults().items() if self.get(k) is None and k not in knobs}
        extra = {k: defaults.pop(k) for k in list(defaults) if k not in _FIELDS}
        cfg = dataclasses.replace(
            self, **defaults, **self._shipped(), method_settings={**extra, **self.method_settings}
        )
        scaled = {}
        if cfg.warmup_epochs >= cfg.epochs:
            scaled["warmup_epochs"] = cfg.epochs // 6
        if cfg.backbone_fixed_epochs and cfg.backbone_fixed_epochs >= cfg.epochs:
            if self.backbone_fixed_epochs is not None:
                raise ValueError(
                    f"--backbone-fixed-epochs {self.backbone_fixed_epochs} is not shorter than --epochs "
                    f"{cfg.epochs}: the backbone would never train"
                )
            scaled["backbone_fixed_epochs"] = cfg.epochs // 6
        return dataclasses.replace(cfg, **scaled)

    def _shipped(self) -> dict[str, Any]:
        """A shipped model named by --model or --checkpoint (e.g. clutter-vit): its timm architecture,
        arguments, weights file and input size, so the name is all a command needs."""
        from pathlib import Path

        name = self.model if _is_shipped(self.model) else None
        if (
            name is None
            and self.checkpoint
            and not Path(self.checkpoint).exists()
            and _is_shipped(self.checkpoint)
        ):
            name = self.checkpoint
            if self.model not in (TrainConfig.model, name) and not _is_shipped(self.model):
                from .models import pretrained_entry

                entry = pretrained_entry(name)
                if self.model != entry.model:
                    raise ValueError(f"--checkpoint {name} is a {entry.model}, not --model {self.model}")
        if name is None:
            return {}
        from .models import pretrained_entry

        entry = pretrained_entry(name)
        checkpoint = self.checkpoint if self.checkpoint not in (None, name) else str(entry.path)
        return dict(
            model=entry.model,
            model_kwargs={**entry.model_kwargs, **self.model_kwargs},
            checkpoint=checkpoint,
            img_size=self.img_size or entry.img_size,
        )

    def schedule_notes(self, resolved: TrainConfig) -> list[str]:
        """What `resolved()` scaled for a short run, as lines to print."""
        notes = []
        for name in ("warmup_epochs", "backbone_fixed_epochs"):
            given, used = getattr(self, name), getattr(resolved, name)
            default = get_method(self.method).defaults().get(name) if given is None else given
            if default is not None and used != default:
                flag = "--" + name.replace("_", "-")
                notes.append(
                    f"note: {flag} {default} is not shorter than --epochs {resolved.epochs}; using {used} "
                    "(epochs // 6)"
                )
        return notes


def _is_shipped(name: str | None) -> bool:
    """Whether `name` names a model shipped with the package (`tokensparse.models.PRETRAINED`)."""
    from .models import PRETRAINED

    return bool(name) and name in PRETRAINED


# name -> (lowest, highest, whether the bounds are included); None values mean "not set" and pass
_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "lr": (0, None, False, True),
    "img_size": (1, None, True, True),
    "train_limit": (1, None, True, True),
    "val_limit": (1, None, True, True),
    "min_lr": (0, None, True, True),
    "warmup_lr": (0, None, True, True),
    "weight_decay": (0, None, True, True),
    "clip_grad": (0, None, False, True),
    "drop_path": (0, 1, True, False),
    "smoothing": (0, 1, True, False),
    "mixup": (0, None, True, True),
    "cutmix": (0, None, True, True),
    "backbone_lr_scale": (0, None, True, True),
    "workers": (0, None, True, True),
    "max_nan_streak": (1, None, True, True),
    "keep_checkpoints": (1, None, True, True),
}


def _check_ranges(cfg: TrainConfig) -> None:
    """Reject out-of-range settings by name (a silent replacement would train something else)."""
    for name, (low, high, low_in, high_in) in _RANGES.items():
        value = getattr(cfg, name, None)
        if value is None or isinstance(value, bool):
            continue
        flag = "--" + name.replace("_", "-")
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} ({flag}) must be a finite number, got {value!r}")
        too_low = low is not None and (value < low if low_in else value <= low)
        too_high = high is not None and (value > high if high_in else value >= high)
        if too_low or too_high:
            bounds = (
                f"{'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
                if high is not None
                else f"{'>=' if low_in else '>'} {low}"
            )
            bounds = "in " + bounds if high is not None else bounds
            hint = " (leave it unset to turn clipping off)" if name == "clip_grad" else ""
            raise ValueError(f"{name} ({flag}) must be {bounds}, got {value}{hint}")
    if not isinstance(cfg.model_kwargs, dict):
        raise ValueError(f"model_kwargs (--model-kwargs) must be a JSON object, got {cfg.model_kwargs!r}")


_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
