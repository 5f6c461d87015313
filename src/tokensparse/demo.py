"""The main job (`tokensparse demo`): the study package's short schedule. See `tokensparse.study`."""

from __future__ import annotations

from .study import DemoConfig, calibrate_gate_center, demo, gate_center_for_cut, run_study, study_config
from .study.runs import model_settings

__all__ = [
    "DemoConfig",
    "calibrate_gate_center",
    "demo",
    "gate_center_for_cut",
    "model_settings",
    "run_study",
    "study_config",
]
