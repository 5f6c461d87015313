"""`tokensparse.train`: the training package's public names under their first home (see
`tokensparse.training`: build, run_dir, loop)."""

from __future__ import annotations

from typing import Any

from . import config
from .training import *  # noqa: F403
from .training import __all__  # noqa: F401


def __getattr__(name: str) -> Any:  # METHODS, METHOD_DEFAULTS, SETTING_METHODS: the registry's views
    return getattr(config, name)
