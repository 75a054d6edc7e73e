"""W&B logging that never hangs or prompts: offline by itself without an API key or network.

An offline run is written under ``save_dir/wandb/offline-run-*``; ``wandb sync <that folder>``
uploads it later.
"""

from __future__ import annotations

import netrc
import os
import socket
from urllib.parse import urlparse

from pytorch_lightning.loggers import WandbLogger

DEFAULT_BASE_URL = "https://api.wandb.ai"
REACH_TIMEOUT_S = 2.0


def wandb_online() -> bool:
    """Whether an API key is configured and the W&B server answers within a couple of seconds."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return False
    host = urlparse(os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL)).hostname or ""
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            has_key = netrc.netrc().authenticators(host) is not None
        except (OSError, netrc.NetrcParseError):
            has_key = False
    if not has_key:
        return False
    try:
        with socket.create_connection((host, 443), timeout=REACH_TIMEOUT_S):
            return True
    except OSError:
        return False


class AutoWandbLogger(WandbLogger):
    """A :class:`~pytorch_lightning.loggers.WandbLogger` that picks offline mode by itself.

    Args:
        project: the W&B project.
        save_dir: where runs are written (offline runs stay there for ``wandb sync``).
        offline: force a mode; ``None`` decides with :func:`wandb_online`.
        log_model: upload checkpoints as artifacts; ``None``: when online.
        **kwargs: passed to ``WandbLogger`` (``name``, ``tags``, ...).
    """

    def __init__(
        self,
        project: str = "prostlab",
        save_dir: str = "runs",
        offline: bool | None = None,
        log_model: bool | str | None = None,
        **kwargs,
    ):
        offline = not wandb_online() if offline is None else offline
        os.environ.setdefault("WANDB_SILENT", "true")
        os.makedirs(save_dir, exist_ok=True)
        log_model = (not offline) if log_model is None else log_model
        super().__init__(
            project=project, save_dir=save_dir, offline=offline, log_model=log_model, **kwargs
        )
