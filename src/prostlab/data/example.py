"""Where the bundled example lives: a 128^3 chest CT prepared from ``../shared/data/chest_ct``."""

from __future__ import annotations

from pathlib import Path

from prostlab.errors import ProstlabError

EXAMPLE_NAME = "chest_ct_128"


def example_path(name: str = EXAMPLE_NAME) -> Path:
    """The directory of a bundled prepared example, ``<repository>/data/<name>``.

    It holds ``ct_mu.nii.gz``, ``bone_mu.nii.gz``, ``labels.nii.gz`` and ``meta.json``; load it
    with :func:`prostlab.data.load_prepared`. The examples ship with the source repository (they
    sit beside ``src/``), not with an installed wheel.
    """
    path = Path(__file__).resolve().parents[3] / "data" / name
    if not (path / "meta.json").is_file():
        raise ProstlabError(
            f"{path}: bundled example {name!r} not found; it ships with the source repository "
            "(data/ beside src/). Use a source checkout, or run `prostlab prepare` on your own CT"
        )
    return path
