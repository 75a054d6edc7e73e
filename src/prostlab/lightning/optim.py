"""Optimisers and learning-rate schedules from plain config mappings (no classes in YAML)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from prostlab.errors import ProstlabError

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
SCHEDULERS = ("cyclic", "cosine", "constant")

PROST_OPTIMIZER = {"name": "sgd", "lr": 1e-4, "momentum": 0.9}
PROST_SCHEDULER = {"name": "cyclic", "base_lr": 1e-6, "max_lr": 1e-4, "step_size_up": 100}
"""ProST's training: SGD, lr 1e-4, momentum 0.9, cyclic lr between 1e-6 and 1e-4 (DESIGN.md);
the half-cycle of 100 steps is prostlab's choice."""


def build_optimizer(params: Iterable, config: Mapping[str, Any] | None) -> torch.optim.Optimizer:
    """``{"name": "sgd" | "adam" | "adamw", **kwargs}`` -> the optimiser over ``params``."""
    config = dict(config or PROST_OPTIMIZER)
    name = config.pop("name", None)
    if name not in OPTIMIZERS:
        raise ProstlabError(
            f"model.optimizer.name: expected one of {sorted(OPTIMIZERS)}, got {name!r}"
        )
    try:
        return OPTIMIZERS[name](params, **config)
    except TypeError as exc:
        raise ProstlabError(f"model.optimizer: {exc}") from exc


def build_scheduler(optimizer: torch.optim.Optimizer, config: Mapping[str, Any] | None):
    """A per-step Lightning scheduler dict, or None for ``{"name": "constant"}``.

    - ``{"name": "cyclic", base_lr, max_lr, step_size_up}``: ProST's triangular cycle;
    - ``{"name": "cosine", T_max, eta_min}``: ``lr_t = eta_min + (lr - eta_min)(1 + cos(pi t /
      T_max)) / 2``, from the optimiser's lr down to ``eta_min`` over ``T_max`` steps.
    """
    config = dict(config or PROST_SCHEDULER)
    name = config.pop("name", None)
    if name not in SCHEDULERS:
        raise ProstlabError(
            f"model.scheduler.name: expected one of {list(SCHEDULERS)}, got {name!r}"
        )
    if name == "constant":
        return None
    try:
        if name == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, **config)
        else:
            # Keep the momentum fixed (0.9 in ProST); only the learning rate cycles.
            config.setdefault("cycle_momentum", False)
            scheduler = torch.optim.lr_scheduler.CyclicLR(optimizer, **config)
    except TypeError as exc:
        raise ProstlabError(f"model.scheduler: {exc}") from exc
    return {"scheduler": scheduler, "interval": "step"}
