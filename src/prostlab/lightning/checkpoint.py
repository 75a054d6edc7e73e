"""Check a checkpoint against the model a config builds, before Lightning loads it.

Checkpoints are read with ``torch.load(..., weights_only=True)``: tensors and plain containers
only, never arbitrary pickled objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from prostlab.errors import ProstlabError


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The contents of a prostlab checkpoint, safely; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ProstlabError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise ProstlabError(f"{path}: empty file; expected a checkpoint written by `prostlab fit`")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable content gets the same one line
        # torch.load raises KeyError, UnpicklingError, RuntimeError, ... depending on the bytes.
        lines = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {lines[0][:120]}" if lines else type(exc).__name__
        raise ProstlabError(
            f"{path}: not a readable checkpoint ({reason}); expected a file written by "
            "`prostlab fit`"
        ) from exc
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ProstlabError(f"{path}: no state_dict; expected a checkpoint of `prostlab fit`")
    return checkpoint


def check_compatible(path: str | Path, model: torch.nn.Module) -> dict[str, Any]:
    """Raise if the checkpoint at ``path`` was trained for another camera or architecture;
    return its contents (:func:`read_checkpoint`)."""
    checkpoint = read_checkpoint(path)
    saved = checkpoint.get("hyper_parameters", {})
    ours = dict(model.hparams)
    if "camera" in saved and saved["camera"] != ours.get("camera"):
        raise ProstlabError(
            f"{path}: trained for camera {saved['camera']}, but the config's model.camera is "
            f"{ours.get('camera')}; expected the same detector geometry"
        )
    expected = model.state_dict()
    for key, value in checkpoint["state_dict"].items():
        if key not in expected:
            raise ProstlabError(f"{path}: parameter {key} is not in the config's network "
                                "(model.net); expected the architecture it was trained with")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ProstlabError(
                f"{path}: {key} has shape {tuple(value.shape)}, the config's network (model.net) "
                f"{tuple(expected[key].shape)}; expected the architecture it was trained with"
            )
    missing = sorted(set(expected) - set(checkpoint["state_dict"]))
    if missing:
        raise ProstlabError(f"{path}: lacks {missing[:3]}; expected the config's architecture "
                            "(model.net)")
    return checkpoint


def load_net_weights(net: torch.nn.Module, path: str | Path) -> None:
    """Load the network weights (the ``net.`` entries of the state dict) of the checkpoint at
    ``path`` into ``net``, refusing another architecture with a message naming the file."""
    state = read_checkpoint(path)["state_dict"]
    weights = {key[len("net."):]: value for key, value in state.items() if key.startswith("net.")}
    expected = net.state_dict()
    wrong = sorted(k for k in expected if k not in weights
                   or tuple(weights[k].shape) != tuple(expected[k].shape))
    if wrong or set(weights) - set(expected):
        raise ProstlabError(
            f"{path}: its network differs from model.net's at {(wrong or sorted(weights))[:3]}; "
            "expected a checkpoint of the same architecture (model.init_weights)"
        )
    net.load_state_dict(weights)
