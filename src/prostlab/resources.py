"""Files that ship inside the package: experiment configs, registration presets, example data.

They live at the top of the source repository, one copy each, and ``pyproject.toml``'s
package-dir installs them as packages: ``configs/`` as ``prostlab.configs`` (``*.yaml`` and
``registration/*.yaml``), ``data/`` as ``prostlab.example_data``, ``checkpoints/*.ckpt`` as
``prostlab.checkpoints``. This module finds them with
:mod:`importlib.resources`, so a source checkout, an editable install and an installed wheel read
the same files, wherever the current directory is.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from prostlab.errors import ProstlabError

__all__ = [
    "checkpoint_dir",
    "config_dir",
    "config_names",
    "config_path",
    "example_data_dir",
    "packaged_dir",
    "preset_dir",
    "resolve_checkpoint",
    "resolve_config",
]

_REINSTALL = "reinstall prostlab (pip install --force-reinstall <wheel>, or pip install -e . in a checkout)"


def packaged_dir(package: str) -> Path:
    """The folder of a data package shipped with prostlab, as a path on the file system.

    Raises a :class:`ProstlabError` with the fix when the package is missing (a broken install)
    or is not a folder on disk (e.g. imported from a zip file): the loaders need real files.
    """
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as error:
        raise ProstlabError(
            f"{package}: the package data is missing from this install; {_REINSTALL}"
        ) from error
    if not isinstance(root, Path) or not root.is_dir():
        raise ProstlabError(
            f"{package}: expected the package data as a folder on disk, got {root}; install "
            "prostlab unzipped (pip install does)"
        )
    return root


def config_dir() -> Path:
    """The folder of the shipped experiment configs (``configs/`` of the repository)."""
    return packaged_dir("prostlab.configs")


def preset_dir() -> Path:
    """The folder of the shipped registration presets (``configs/registration/``)."""
    return config_dir() / "registration"


def example_data_dir() -> Path:
    """The folder of the bundled example data (``data/`` of the repository)."""
    return packaged_dir("prostlab.example_data")


def config_names() -> list[str]:
    """Names of the shipped experiment configs, e.g. ``["cpu", "cpu_on_gpu", "pelvis", "tiny"]``."""
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def config_path(name: str) -> Path:
    """The file of a shipped experiment config, by name (``"tiny"`` or ``"tiny.yaml"``)."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    path = config_dir() / f"{stem}.yaml"
    if not path.is_file():
        raise ProstlabError(
            f"config: expected a YAML file or the name of a shipped config among "
            f"{config_names()}, got {name!r}"
        )
    return path


def resolve_config(value: str) -> str:
    """A ``--config`` value as a file: an existing path stays; a bare name is a shipped config.

    A bare name is one without a folder or a suffix (``tiny``, ``cpu``, ``pelvis``) that is not
    a file in the current directory; it becomes the shipped file's path, or a
    :class:`ProstlabError` that lists the shipped names. Any other value is returned unchanged,
    so the command that reads it reports a missing file.
    """
    text = str(value)
    if Path(text).exists() or "/" in text or "\\" in text or Path(text).suffix or not text:
        return text
    return str(config_path(text))


def checkpoint_dir() -> Path:
    """The folder of the shipped network weights (``checkpoints/*.ckpt`` of the repository)."""
    return packaged_dir("prostlab.checkpoints")


def resolve_checkpoint(value: str) -> str:
    """A ``--ckpt_path`` value as a file: an existing path (or ``last``, ``best``) stays; a
    shipped checkpoint's name (``prost_cpu_chest``, ``prost_cpu_chest.ckpt``), or
    ``checkpoints/NAME.ckpt`` as the configs and docs write it, becomes the shipped file when no
    such file is here. Any other value is returned unchanged, so the reader reports it missing.
    """
    text = str(value)
    path = Path(text)
    if path.exists() or text in ("last", "best") or path.parent not in (Path("."),
                                                                       Path("checkpoints")):
        return text
    name = text if path.suffix == ".ckpt" else f"{path.name}.ckpt"
    shipped = checkpoint_dir() / Path(name).name
    return str(shipped) if shipped.is_file() else text
