"""The method registry: every token-sparsification method by name, as timm's `register_model` is.

Training, evaluation, the benchmarks, the FLOP count, the study and the CLI's `--method` choices read
this registry; none of them names a method. A method is its policy file: the policy (a `TokenPolicy`,
which counts its own executed FLOPs in `extra_flops`), the function that applies it to a timm model,
and one `register_method(Method(...))` saying its name, how to build it from a `TrainConfig`, its
recipe (the `TrainConfig` defaults its authors train with), the settings it reads and its training
objective. See the README's "Adding a method".

Nothing here imports torch: `tokensparse --help` lists the methods and their recipes at once. So the
built-in methods are registered below with their constructors and objectives named as
"module:function" strings, imported on first use; a method added from outside registers callables
directly.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Ref = Callable[..., Any] | str
"""A callable, or "package.module:attribute[.attribute]" naming one (imported on first use)."""

COMMON_RECIPE: Mapping[str, Any] = {
    "backbone_lr_scale": 1.0,
    "backbone_fixed_epochs": 0,
    "freeze_embeddings": False,
}
"""Fine-tuning defaults of every method unless its recipe says otherwise: the whole model at the full lr."""


def resolve(ref: Ref | None) -> Callable[..., Any] | None:
    """The callable `ref` names (itself if it is one)."""
    if ref is None or callable(ref):
        return ref
    module, _, attributes = ref.partition(":")
    return functools.reduce(getattr, attributes.split("."), importlib.import_module(module))


@dataclass(frozen=True)
class Method:
    """One method as training, evaluation, the benchmarks and the CLI see it.

    name:      the `--method` name and `TrainConfig.method`.
    sparsify:  (dense timm model, resolved TrainConfig) -> the sparsified model; None for the dense model.
    recipe:    the method's `TrainConfig` defaults (over `COMMON_RECIPE`): its authors' recipe.
    settings:  the method-specific `TrainConfig` fields it reads; setting one of them for another
               method is an error.
    objective: (resolved TrainConfig, model depth) -> the training objective, a module whose
               `step(model, images, targets, teacher)` returns (loss, parts); None: cross-entropy plus,
               with a teacher, its logits (`losses.ClassificationLoss`).
    bench_setting: the `TrainConfig` field `tokensparse bench` sweeps for it (keep_ratio, tome_r,
               A-ViT's gate_center); None: the bench times the method at its recipe.
    setting_name: how result tables name `bench_setting` (default: its field name).
    new_parameters: model -> the parameters the method adds, trained at the full lr from the start
               (the backbone's follow `backbone_lr_scale`); None: the parameters of the model's policy.
    """

    name: str
    sparsify: Ref | None = None
    recipe: Mapping[str, Any] = field(default_factory=dict)
    settings: tuple[str, ...] = ()
    objective: Ref | None = None
    bench_setting: str | None = None
    setting_name: str | None = None
    new_parameters: Ref | None = None

    def defaults(self) -> dict[str, Any]:
        """The `TrainConfig` values this method takes for the settings left unset."""
        return {**COMMON_RECIPE, **self.recipe}

    def setting_label(self, value: Any) -> str:
        """`value` of the bench setting as result tables show it: keep_ratio=0.7, r=8; "-" without one."""
        if self.bench_setting is None:
            return "-"
        if isinstance(self.recipe.get(self.bench_setting), int):
            value = int(value)
        return f"{self.setting_name or self.bench_setting}={value}"


_METHODS: dict[str, Method] = {}


def register_method(method: Method, replace: bool = False) -> Method:
    """Add `method` to the registry (ValueError if its name is taken, unless `replace`); returns it."""
    if not isinstance(method, Method):
        raise ValueError(f"register_method needs a tokensparse Method, got {type(method).__name__}")
    if method.name in _METHODS and not replace:
        raise ValueError(f"a method named {method.name!r} is registered already; pass replace=True")
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove the method `name` from the registry (no error if it is not there)."""
    _METHODS.pop(name, None)


def get_method(name: str) -> Method:
    """The registered method `name`; ValueError listing the registered ones otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"method must be one of {method_names()}, got {name!r}") from None


def method_names() -> tuple[str, ...]:
    """Every registered method's name, in registration order (the built-in ones first)."""
    return tuple(_METHODS)


def setting_methods() -> dict[str, tuple[str, ...]]:
    """For each method-specific setting, the methods that read it (in registration order)."""
    owners: dict[str, tuple[str, ...]] = {}
    for method in _METHODS.values():
        for setting in method.settings:
            owners[setting] = (*owners.get(setting, ()), method.name)
    return owners


# --- the built-in methods ---------------------------------------------------------------------------
# Their recipes are the authors'. DynamicViT as raoyongming/DynamicViT main.py and optim_factory.py (MSE
# token distillation for DeiT/ViT, cls_token and pos_embed frozen, the backbone at lr x 0.01 and at lr 0
# for its first 5 epochs, the predictors at the full lr from the start); A-ViT as NVlabs/A-ViT (no
# distillation, every parameter trained, the block input zeroed through `.data`); the baselines
# fine-tune with cross-entropy plus the teacher's logits; dynamic spatial sparsification (timm ConvNeXt
# / Swin, the DynamicViT authors' T-PAMI extension) as their main.py and README runs
# (ConvNextDistillDiffPruningLoss with ratio weight 10, --lr_scale 0.2, fix_step 5).

_FINETUNE = {"distill_weight": 0.5}
_PRUNING = ("keep_ratio", "locations", "target_gflops")
_PACKAGE = "tokensparse.policies"

register_method(Method("dense"))
register_method(
    Method(
        "dynamicvit",
        sparsify=f"{_PACKAGE}.dynamicvit:from_config",
        recipe=dict(
            keep_ratio=0.7,
            ratio_weight=2.0,
            token_distill="mse",
            distill_weight=0.5,
            backbone_lr_scale=0.01,
            backbone_fixed_epochs=5,
            freeze_embeddings=True,
        ),
        settings=(*_PRUNING, "ratio_weight", "token_distill", "distill_weight"),
        objective="tokensparse.losses:DynamicViTLoss.from_config",
        bench_setting="keep_ratio",
    )
)
register_method(
    Method(
        "avit",
        sparsify=f"{_PACKAGE}.avit:from_config",
        recipe=dict(
            gate_scale=10.0,
            gate_center=30.0,
            halt_eps=0.01,
            ponder_weight=5e-4,
            prior_weight=1e-3,
            straight_through_zeroing=True,
            distill_weight=0.0,
        ),
        settings=(
            "gate_scale",
            "gate_center",
            "halt_eps",
            "ponder_weight",
            "prior_weight",
            "prior_depth",
            "straight_through_zeroing",
            "distill_weight",
        ),
        objective="tokensparse.losses:AViTLoss.from_config",
        bench_setting="gate_center",
    )
)


def _baseline(name: str, sparsify: str) -> Method:
    """A training-free pruning baseline at a keep ratio, fine-tuned with CE plus the teacher's logits."""
    return Method(
        name,
        sparsify=f"{_PACKAGE}.{sparsify}",
        recipe=dict(keep_ratio=0.7, **_FINETUNE),
        settings=(*_PRUNING, "distill_weight"),
        bench_setting="keep_ratio",
    )


register_method(_baseline("evit", "evit:from_config"))
register_method(
    Method(
        "tome",
        sparsify=f"{_PACKAGE}.tome:from_config",
        recipe=dict(tome_r=8, **_FINETUNE),
        settings=("tome_r", "target_gflops", "distill_weight"),
        bench_setting="tome_r",
        setting_name="r",
    )
)
register_method(_baseline("random", "baselines:random_from_config"))
register_method(_baseline("static", "baselines:static_from_config"))
register_method(
    Method(
        "dynamicspatial",
        sparsify=f"{_PACKAGE}.dynspatial:from_config",
        recipe=dict(
            keep_ratio=0.7,
            ratio_weight=10.0,
            distill_weight=0.5,
            backbone_lr_scale=0.2,
            backbone_fixed_epochs=5,
            freeze_embeddings=False,
        ),
        settings=("keep_ratio", "locations", "ratio_weight", "distill_weight"),
        objective="tokensparse.losses:DynamicSpatialLoss.from_config",
        bench_setting="keep_ratio",
        new_parameters=f"{_PACKAGE}.dynspatial:new_parameters",
    )
)
