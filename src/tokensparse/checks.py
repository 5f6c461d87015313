"""Argument checks shared by the policies, losses and export: one rule for "a number" and "an int".

A bool is an int to Python but never a valid number of tokens, a ratio or a weight here, so every
check refuses it; messages read "<name> must be <what>, got <value>".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_number(name: str, value: Any, ok: Callable[[float], bool], what: str) -> float:
    """`value` as a float if it is a number for which `ok` holds, else ValueError naming `what` it must be."""
    if not is_number(value) or not ok(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def check_int(name: str, value: Any, ok: Callable[[int], bool], what: str) -> int:
    """`value` if it is an int (not a bool) for which `ok` holds, else ValueError naming `what` it must be."""
    if not is_int(value) or not ok(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def check_flag(name: str, value: Any) -> bool:
    """`value` if it is True or False (not 0, 1 or None)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
"""The `--dtype` names the CLI and benchmarks take -> torch's dtype attribute (no torch import here)."""
