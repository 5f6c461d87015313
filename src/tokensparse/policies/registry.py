"""The method registry: every token-sparsification method by name, as timm's `register_model` is.

A method lives in one module and registers itself there, at its end:

    register_method(Method("dynamicvit", sparsify=from_config, recipe=dict(keep_ratio=0.7, ...),
                           settings=(KEEP_RATIO, LOCATIONS, Setting("ratio_weight", float, ...)), ...))

Training, evaluation, the benchmarks, the FLOP count, export and the CLI (its `--method` choices and
one flag per `Setting`, with the setting's help, type and range) read the registry; none of them
names a method (the study names the methods it compares).

Nothing here imports torch, so `tokensparse --help` lists the methods, their settings and recipes at
once: the built-in method modules (every `tokensparse/policies/*.py`) are read, not imported, for
their `register_method(Method(...))` calls; the literal parts (name, recipe, settings) make a
torch-free entry, and the first use of the method's code (`load_method`) imports its module, whose own
registration then replaces that entry. A method's metadata must therefore be written with literals,
`Setting(...)` and the shared settings below. Methods outside the package register when their module
is imported; `TOKENSPARSE_METHODS` (module names or .py paths, separated by commas or the path
separator) names modules the CLI imports, so a method in its own file is a method of every command.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Ref = Callable[..., Any] | str
"""A callable, or "package.module:attribute[.attribute]" naming one (imported on first use)."""

COMMON_RECIPE: Mapping[str, Any] = {
    "epochs": 30,
    "lr": 1e-3,
    "min_lr": 1e-6,
    "weight_decay": 0.05,
    "warmup_epochs": 5,
    "smoothing": 0.0,
    "mixup": 0.0,
    "cutmix": 0.0,
    "backbone_lr_scale": 1.0,
    "backbone_fixed_epochs": 0,
    "freeze_embeddings": False,
}
"""Training defaults of every method unless its recipe says otherwise: 30 epochs of AdamW at lr 1e-3
(cosine to 1e-6, 5 warm-up epochs, weight decay 0.05), the whole model at the full lr."""

ENV = "TOKENSPARSE_METHODS"


def resolve(ref: Ref | None) -> Callable[..., Any] | None:
    """The callable `ref` names (itself if it is one)."""
    if ref is None or callable(ref):
        return ref
    module, _, attributes = ref.partition(":")
    return functools.reduce(getattr, attributes.split("."), importlib.import_module(module))


@dataclass(frozen=True)
class Setting:
    """One setting a method reads: its `TrainConfig` field (or `TrainConfig.method_settings` key), CLI
    flag, type, range and help.

    name:  the `TrainConfig` field or `method_settings` key; the flag is `--` + name with dashes.
    kind:  float (the default), int, bool, str, or list (a list of whole numbers, as `--locations 3 6 9`).
    help:  the `--help` text.
    low, high, low_in, high_in: the allowed range (None: unbounded) and whether each bound is allowed.
    choices: the allowed values of a str setting.
    source: where the recipe's default comes from (the authors' code or paper), for `--help`.
    """

    name: str
    kind: type = float
    help: str = ""
    low: float | None = None
    high: float | None = None
    low_in: bool = True
    high_in: bool = True
    choices: tuple[str, ...] = ()
    source: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> None:
        """ValueError naming the setting and its flag when `value` is out of its type or range."""
        if value is None:
            return
        where = f"{self.name} ({self.flag})"
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{where} must be true or false, got {value!r}")
            return
        if self.kind is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise ValueError(f"{where} must be one of {list(self.choices)}, got {value!r}")
            return
        values = value if self.kind is list else [value]
        if self.kind is list and (not isinstance(value, (list, tuple)) or not value):
            raise ValueError(f"{where} must name at least one block, got {value!r}")
        whole = self.kind in (int, list)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{where} must be a finite number, got {v!r}")
            if whole and v != int(v):
                raise ValueError(f"{where} must be a whole number, got {v!r}")
            low, high = self.low, self.high
            too_low = low is not None and (v < low if self.low_in else v <= low)
            too_high = high is not None and (v > high if self.high_in else v >= high)
            if too_low or too_high:
                raise ValueError(f"{where} must be {self.range_text()}, got {v}")

    def range_text(self) -> str:
        """The allowed range as `in (0, 1]`, `>= 0` or ``."""
        low = f"{'[' if self.low_in else '('}{self.low}"
        high = f"{self.high}{']' if self.high_in else ')'}"
        if self.low is not None and self.high is not None:
            return f"in {low}, {high}"
        if self.low is not None:
            return f"{'>=' if self.low_in else '>'} {self.low}"
        if self.high is not None:
            return f"{'<=' if self.high_in else '<'} {self.high}"
        return ""


# --- settings several methods read (one home each) ---------------------------------------------------

KEEP_RATIO = Setting(
    "keep_ratio", float, "keep ratio: DynamicViT's rho (stage s keeps rho^s), EViT's, random/static's share "
    "kept at each location", low=0, high=1, low_in=False,
)  # fmt: skip
LOCATIONS = Setting(
    "locations", list, "blocks before which tokens are pruned (default: a quarter of the depth apart, 3 6 9 of 12)",
    low=0,
)  # fmt: skip
TARGET_GFLOPS = Setting(
    "target_gflops", float, "a FLOP budget in GMACs per image instead of the method's knob (--keep-ratio, "
    "--tome-r, ...): the knob is solved on the model (at most the budget, within 2%) and config.json records it",
    low=0, low_in=False,
)  # fmt: skip
DISTILL_WEIGHT = Setting(
    "distill_weight", float, "weight of the teacher's logits (and DynamicViT's token) distillation", low=0
)
RATIO_WEIGHT = Setting(
    "ratio_weight", float, "weight of the keep-ratio loss (DynamicViT and its spatial variant)", low=0
)
SHARED_SETTINGS = {s.name: s for s in (KEEP_RATIO, LOCATIONS, TARGET_GFLOPS, DISTILL_WEIGHT, RATIO_WEIGHT)}
"""The settings of more than one method, by name: a `Method` may name them by their name."""


@dataclass(frozen=True)
class Method:
    """One method as training, evaluation, the benchmarks and the CLI see it.

    name:      the `--method` name and `TrainConfig.method`.
    sparsify:  (dense timm model, resolved TrainConfig) -> the sparsified model; None for the dense model.
    recipe:    the method's `TrainConfig` defaults (over `COMMON_RECIPE`): its authors' recipe.
    settings:  the `Setting`s it reads (a shared one may be given by name); setting one of them for
               another method is an error. One not among `TrainConfig`'s fields lives in
               `TrainConfig.method_settings`.
    objective: (resolved TrainConfig, model depth) -> the training objective, a module whose
               `step(model, images, targets, teacher)` returns (loss, parts); None: cross-entropy plus,
               with a teacher, its logits (`losses.ClassificationLoss`).
    bench_setting: the setting `tokensparse bench` sweeps (keep_ratio, tome_r, A-ViT's gate_center);
               None: the bench times the method at its recipe.
    setting_name: how result tables name `bench_setting` (default: its field name).
    budget_knob: the setting a FLOP budget (`target_gflops`) solves; None: the method takes no budget in
               training (`tokensparse.budget` may still calibrate it, as A-ViT's gate).
    untrained: (dense model, resolved TrainConfig) -> the sparsified model as a fresh, untrained one
               at those settings (bench, export and eval without a run); None: `sparsify`. For a
               method whose run builds something to train (DiffRate's searchable counts).
    bench:     (model or None, settings, **options of `tokensparse.bench.bench_method`) -> BenchResult, for
               a method `bench_method` cannot time (A-ViT: its halting depends on the image); None: it.
    bench_bound: what the bench's bound row is, as its table says.
    new_parameters: model -> the parameters the method adds, trained at the full lr from the start
               (the backbone's follow `backbone_lr_scale`); None: the parameters of the model's policy.
    architecture: "vit" (a timm VisionTransformer), "spatial" (timm ConvNeXt / Swin) or "any".
    module:    the module that registers it (filled in by `register_method`).
    lazy:      True for an entry read from its module's source (`read_methods`) whose code is not
               imported yet; `load_method` imports it. Default False.
    """

    name: str
    sparsify: Ref | None = None
    recipe: Mapping[str, Any] = field(default_factory=dict)
    settings: tuple[Setting | str, ...] = ()
    objective: Ref | None = None
    bench_setting: str | None = None
    setting_name: str | None = None
    budget_knob: str | None = None
    new_parameters: Ref | None = None
    untrained: Ref | None = None
    bench: Ref | None = None
    bench_bound: str = "truncation bound (dense blocks on pre-sliced tokens)"
    architecture: str = "vit"
    module: str | None = None
    lazy: bool = False  # read from the module's source, its code not imported yet (`load_method`)

    def __post_init__(self) -> None:
        specs = []
        for s in self.settings:
            if isinstance(s, str):
                if s not in SHARED_SETTINGS:
                    raise ValueError(
                        f"method {self.name!r}: setting {s!r} is not a shared one ({sorted(SHARED_SETTINGS)}); "
                        "give a Setting(...)"
                    )
                s = SHARED_SETTINGS[s]
            specs.append(s)
        object.__setattr__(self, "settings", tuple(specs))
        unknown = set(self.recipe) - set(self.setting_names()) - set(COMMON_RECIPE) - _TRAIN_FIELDS
        if unknown:
            raise ValueError(
                f"method {self.name!r}: its recipe sets {sorted(unknown)}, which it does not read"
            )
        if self.architecture not in ("vit", "spatial", "any"):
            raise ValueError(f"method {self.name!r}: architecture must be vit, spatial or any")

    def setting_names(self) -> tuple[str, ...]:
        """The names of the settings the method reads, in order."""
        return tuple(s.name for s in self.settings)  # type: ignore[union-attr]

    def setting(self, name: str) -> Setting | None:
        """The method's `Setting` called `name` (None if it reads no such setting)."""
        return next((s for s in self.settings if s.name == name), None)  # type: ignore[union-attr]

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


# TrainConfig's training fields a recipe may set besides the method's own settings
_TRAIN_FIELDS = {"distill_weight", *COMMON_RECIPE}

_METHODS: dict[str, Method] = {}
_DISCOVERED = False


def register_method(method: Method, replace: bool = False) -> Method:
    """Add `method` to the registry (ValueError if its name is taken, unless `replace`); returns it.

    Called at the end of the module that defines the method; that module's own registration replaces
    the torch-free entry read from its source."""
    if not isinstance(method, Method):
        raise ValueError(f"register_method needs a tokensparse Method, got {type(method).__name__}")
    if method.module is None and not method.lazy:
        caller = sys._getframe(1).f_globals.get("__name__")
        method = dataclasses.replace(method, module=caller)
    old = _METHODS.get(method.name)
    if old is not None and not replace and not (old.lazy and old.module == method.module):
        raise ValueError(f"a method named {method.name!r} is registered already; pass replace=True")
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove the method `name` from the registry (no error if it is not there)."""
    _METHODS.pop(name, None)


def get_method(name: str) -> Method:
    """The registered method `name` (its torch-free entry for a built-in one not used yet); ValueError
    listing the registered ones otherwise."""
    _discover()
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"method must be one of {method_names()}, got {name!r}") from None


def load_method(name: str) -> Method:
    """The method `name` with its code: imports the module that defines it (which registers it)."""
    method = get_method(name)
    if method.lazy:
        importlib.import_module(method.module)  # type: ignore[arg-type]
        method = _METHODS[name]
        if method.lazy:
            raise ValueError(f"{method.module} did not register the method {name!r} its source names")
    code = {f: resolve(getattr(method, f)) for f in _CODE_FIELDS}
    return dataclasses.replace(method, **code)


def budget_knobs() -> tuple[str, ...]:
    """The settings a FLOP budget solves, over every registered method (keep_ratio, tome_r, ...)."""
    knobs = (get_method(m).budget_knob for m in method_names())
    return tuple(dict.fromkeys(k for k in knobs if k is not None))


def method_names() -> tuple[str, ...]:
    """Every registered method's name, in registration order (the built-in ones first)."""
    _discover()
    return tuple(_METHODS)


def setting_methods() -> dict[str, tuple[str, ...]]:
    """For each method setting, the methods that read it (in registration order)."""
    owners: dict[str, tuple[str, ...]] = {}
    for name in method_names():
        for setting in _METHODS[name].setting_names():
            owners[setting] = (*owners.get(setting, ()), name)
    return owners


def all_settings() -> dict[str, Setting]:
    """Every registered method's settings by name (the first method's spec where several read one)."""
    found: dict[str, Setting] = {}
    for name in method_names():
        for s in _METHODS[name].settings:
            found.setdefault(s.name, s)  # type: ignore[union-attr]
    return found


# --- discovery: the built-in modules, read torch-free, then the modules TOKENSPARSE_METHODS names -----


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    registered = dict(_METHODS)  # a module imported before the first query registered already
    _METHODS.clear()
    _METHODS["dense"] = Method("dense", architecture="any", module=__name__)
    here = Path(__file__).parent
    for path in sorted(here.glob("*.py"), key=_builtin_order):
        if path.stem not in ("__init__", "registry"):
            for method in read_methods(path, f"{__package__}.{path.stem}"):
                _METHODS[method.name] = registered.pop(method.name, method)
    _METHODS.update(registered)
    for entry in _env_modules():
        import_methods(entry)


# the order of `--method`'s choices: the papers' systems, then the baselines
_ORDER = ("dynamicvit", "avit", "evit", "tome", "baselines", "dynspatial")


def _builtin_order(path: Path) -> tuple[int, str]:
    return (_ORDER.index(path.stem) if path.stem in _ORDER else len(_ORDER), path.stem)


def _env_modules() -> list[str]:
    text = os.environ.get(ENV, "")
    return [part.strip() for part in text.replace(os.pathsep, ",").split(",") if part.strip()]


def import_methods(entry: str) -> None:
    """Import a module that registers methods: `entry` is a module name, or the path of a .py file."""
    if entry.endswith(".py"):
        path = Path(entry)
        if not path.is_file():
            raise ValueError(f"{ENV}: no file {entry}")
        name = f"tokensparse_methods_{path.stem}"
        if name in sys.modules:
            return
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        try:
            importlib.import_module(entry)
        except ImportError as err:
            raise ValueError(f"{ENV}: cannot import {entry!r} ({err})") from None


_SAFE_BUILTINS = {
    "dict": dict,
    "tuple": tuple,
    "list": list,
    "float": float,
    "int": int,
    "bool": bool,
    "str": str,
}
_CODE_FIELDS = ("sparsify", "objective", "new_parameters", "untrained", "bench")


def read_methods(path: Path, module: str) -> list[Method]:
    """The methods the file `path` (the source of the module named `module`) registers, from its source,
    without importing it (torch-free entries).

    Module-level constants written with literals are available to the `Method(...)` call; the code
    fields (`sparsify`, `objective`, `new_parameters`) are left for `load_method` to import."""
    tree = ast.parse(path.read_text(), str(path))
    names: dict[str, Any] = {"__builtins__": _SAFE_BUILTINS, "Method": Method, "Setting": Setting}
    names.update({k: v for k, v in globals().items() if k.isupper() and not k.startswith("_")})
    found = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
            try:
                value = eval(compile(ast.Expression(node.value), str(path), "eval"), names)  # noqa: S307
            except Exception:  # noqa: BLE001  (not a literal: code, read when the module is imported)
                continue
            for target in node.targets:
                names[target.id] = value  # type: ignore[union-attr]
        call = node.value if isinstance(node, ast.Expr) else None
        if not (isinstance(call, ast.Call) and _called(call) == "register_method" and call.args):
            continue
        inner = call.args[0]
        if not (isinstance(inner, ast.Call) and _called(inner) == "Method"):
            raise ValueError(f"{path}:{node.lineno}: register_method(Method(...)) must be written out there")
        inner = ast.Call(
            func=inner.func,
            args=inner.args,
            keywords=[k for k in inner.keywords if k.arg not in _CODE_FIELDS and k.arg != "module"],
        )
        ast.fix_missing_locations(inner)
        method = eval(compile(ast.Expression(inner), str(path), "eval"), names)  # noqa: S307
        found.append(dataclasses.replace(method, module=module, lazy=True))
    return found


def _called(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
