"""Every public function and class of the API documents each of its parameters by name (issue 29, item 3).

The API: the names `tokensparse.__all__` exports, the public functions and classes defined in the
modules below, and the hooks of `engine.TokenPolicy`. A class's parameters are those of its
constructor when tokensparse defines it (its own `__init__` or a dataclass's fields); a class built by
converting a timm module in place (dynamic ConvNeXt / Swin) keeps timm's constructor, timm's to
document, so only its docstring is required. self/cls, *args/**kwargs and parameters starting with
"_" are skipped. Mentioned means the name appears as a word in the docstring (class: or in its
`__init__`'s).
"""

from __future__ import annotations

import importlib
import inspect
import re

import tokensparse

MODULES = (
    "tokensparse.budget",
    "tokensparse.flops",
    "tokensparse.engine",
    "tokensparse.export",
    "tokensparse.runs",
    "tokensparse.evaluate",
    "tokensparse.checkpoints",
    "tokensparse.models",
    "tokensparse.adapters",
    "tokensparse.adapters.timm_families",
    "tokensparse.adapters.hf",
    *(
        f"tokensparse.policies.{name}"
        for name in (
            "dynamicvit",
            "avit",
            "evit",
            "tome",
            "baselines",
            "dynconvnext",
            "dynswin",
            "dynspatial",
            "diffrate",
            "diffrate_search",
            "diffrate_published",
            "registry",
        )
    ),
    "tokensparse.losses",
    "tokensparse.losses.avit",
    "tokensparse.losses.common",
    "tokensparse.losses.dynamicvit",
    "tokensparse.losses.spatial",
)


def _public_objects() -> dict[str, object]:
    """Qualified name -> function or class, each object once (under the first name found)."""
    found: dict[str, object] = {}
    for name in tokensparse.__all__:
        found[f"tokensparse.{name}"] = getattr(tokensparse, name)
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if name.startswith("_") or not (inspect.isfunction(value) or inspect.isclass(value)):
                continue
            if getattr(value, "__module__", None) == module_name:
                found[f"{module_name}.{name}"] = value
    unique: dict[int, tuple[str, object]] = {}
    for qualified, value in found.items():
        unique.setdefault(id(value), (qualified, value))
    policy = importlib.import_module("tokensparse.engine").TokenPolicy
    for name, value in vars(policy).items():  # the hooks a policy implements
        if not name.startswith("_") and inspect.isfunction(value):
            unique.setdefault(id(value), (f"tokensparse.engine.TokenPolicy.{name}", value))
    return dict(unique.values())


def _parameters(function) -> list[str]:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return []
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [
        p.name
        for p in signature.parameters.values()
        if p.name not in ("self", "cls") and not p.name.startswith("_") and p.kind not in variadic
    ]


def _own_constructor(cls: type):
    """The constructor to document: the first `__init__` up the MRO, if tokensparse defines it."""
    for base in cls.__mro__:
        if "__init__" in vars(base):
            init = vars(base)["__init__"]
            defined_in = getattr(init, "__module__", None) or base.__module__
            return init if defined_in.startswith("tokensparse") else None
    return None


def _mentions(text: str, name: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", text) is not None


def _offences() -> list[str]:
    offences = []
    for qualified, value in sorted(_public_objects().items()):
        doc = value.__doc__ or ""  # its own: a class's docstring is not inherited here
        if not doc.strip():
            offences.append(f"{qualified}: no docstring")
            continue
        if inspect.isclass(value):
            init = _own_constructor(value)
            if init is None:
                continue
            own_init = vars(value).get("__init__")
            text = doc + "\n" + (getattr(own_init, "__doc__", None) or "")
            names = _parameters(init)
        else:
            text, names = doc, _parameters(value)
        missing = [name for name in names if not _mentions(text, name)]
        if missing:
            offences.append(f"{qualified}: docstring does not mention {', '.join(missing)}")
    return offences


def test_the_scan_sees_the_api():
    objects = _public_objects()
    assert len(objects) > 150  # the whole API, not an import that silently found nothing
    for name in ("tokensparse.dynamicvit", "tokensparse.policies.diffrate.DiffRatePolicy"):
        assert name in objects
    assert "tokensparse.engine.TokenPolicy.before_block" in objects


def test_every_public_function_and_class_documents_its_parameters():
    offences = _offences()
    assert not offences, f"{len(offences)} undocumented parameters or docstrings:\n" + "\n".join(offences)
