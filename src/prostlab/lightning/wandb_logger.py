"""W&B logging that never hangs or prompts: offline by itself without an API key or network.

An offline run is written under ``save_dir/wandb/offline-run-*``; ``wandb sync <that folder>``
uploads it later.
"""

from __future__ import annotations

import netrc
import os
import socket
import threading
from urllib.parse import urlparse

from pytorch_lightning.loggers import WandbLogger

from prostlab.errors import ProstlabError

DEFAULT_BASE_URL = "https://api.wandb.ai"
REACH_TIMEOUT_S = 2.0


OFFLINE_MODES = ("offline", "disabled", "dryrun")


def wandb_unreachable() -> str | None:
    """Why W&B cannot be used online (no API key, server silent for 2 s), or ``None``.

    The whole check, name lookup included, takes at most ``REACH_TIMEOUT_S`` seconds.
    """
    url = urlparse(os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL))
    host = url.hostname or ""
    port = url.port or (80 if url.scheme == "http" else 443)
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            has_key = netrc.netrc().authenticators(host) is not None
        except (OSError, netrc.NetrcParseError):
            has_key = False
    if not has_key:
        return f"no API key for {host} (WANDB_API_KEY or `wandb login`)"
    answered: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=REACH_TIMEOUT_S):
                answered.append(True)
        except OSError:
            pass

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(REACH_TIMEOUT_S)
    if not answered:
        return f"{host}:{port} could not be reached within {REACH_TIMEOUT_S:g} s"
    return None


def wandb_online() -> bool:
    """Whether an API key is configured and the W&B server answers within a couple of seconds."""
    if os.environ.get("WANDB_MODE", "").lower() in OFFLINE_MODES:
        return False
    return wandb_unreachable() is None


def _forced_online(offline: bool | None) -> str | None:
    """What forces W&B online (``offline: false``, ``WANDB_MODE=online``), or ``None``."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if offline is False and mode not in OFFLINE_MODES:
        return "the logger's offline: false"
    if offline is None and mode in ("online", "run"):
        return f"WANDB_MODE={os.environ['WANDB_MODE']}"
    return None


class AutoWandbLogger(WandbLogger):
    """A :class:`~pytorch_lightning.loggers.WandbLogger` that picks offline mode by itself.

    Args:
        project: the W&B project.
        save_dir: where runs are written (offline runs stay there for ``wandb sync``).
        offline: force a mode; ``None`` decides with :func:`wandb_online` (``WANDB_MODE=online``
            forces online). Forced online without an API key or a server that answers within
            ``REACH_TIMEOUT_S`` raises at once rather than wait for W&B's own timeout.
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
        forced = _forced_online(offline)
        if forced:
            why = wandb_unreachable()
            if why is not None:  # wandb.init would wait ~95 s, then raise CommError
                raise ProstlabError(
                    f"W&B is forced online by {forced}, but {why}; expected network access "
                    "to W&B, or run offline: WANDB_MODE=offline (or --trainer.logger.init_args."
                    "offline true), then upload with `wandb sync`"
                )
            offline = False
        offline = not wandb_online() if offline is None else offline
        os.environ.setdefault("WANDB_SILENT", "true")
        os.makedirs(save_dir, exist_ok=True)
        log_model = (not offline) if log_model is None else log_model
        super().__init__(
            project=project, save_dir=save_dir, offline=offline, log_model=log_model, **kwargs
        )
        # Lightning passes anonymous=None to wandb.init, which wandb (0.19 and later) answers on
        # every run with "The anonymous setting has no effect"; without it, the run is the same.
        self._wandb_init.pop("anonymous", None)
