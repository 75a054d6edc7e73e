"""Tensors that say they are on a GPU, to test the device checks on a machine without one."""

from __future__ import annotations

import torch


class _OnCuda(torch.Tensor):
    """A CPU tensor whose ``.device`` says ``cuda:0`` (the results of operations on it too)."""

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0)


def on_cuda(x: torch.Tensor) -> torch.Tensor:
    """``x``, claiming to be on ``cuda:0``: the device checks read ``.device`` only."""
    return x.as_subclass(_OnCuda)
