"""Multiply-add counts of single layers: a leaf module (torch only), so that the policies count their own
work without importing `tokensparse.flops`, which dispatches to them (no import cycle)."""

from __future__ import annotations

import torch.nn as nn


def linear_macs(module: nn.Module | None) -> int:
    """Multiply-adds of every nn.Linear inside `module`, for one token."""
    if module is None:
        return 0
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))
