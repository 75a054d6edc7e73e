"""CT data pipeline: read CT and labels, map HU to attenuation, reorient, crop and resample.

The public entry points are :func:`prepare_ct` (a CT file -> a prepared directory) and
:func:`load_prepared` (a prepared directory -> :class:`PreparedCT` of :class:`Volume` s).

:class:`PoseDataModule` and :class:`PoseCaseDataset` are imported on first use: they need
PyTorch Lightning, whose import took 4 of the 5 seconds that ``prostlab register``, ``render``
and ``prepare`` spent starting up.
"""

from prostlab.data.example import example_path
from prostlab.data.intensity import MU_WATER, fill_outside_fov, hu_to_mu
from prostlab.data.io import load_image, save_nifti
from prostlab.data.labels import PRESETS, bone_ids, bone_mask, read_structures, segment
from prostlab.data.orientation import (
    PREPARED_ORIENTATION,
    orientation_of,
    reorient,
    reoriented_grid,
)
from prostlab.data.poses import PoseDistribution, PoseSampler, case_generator, prost_normalised
from prostlab.data.prepare import PreparedCT, check_same_grid, load_prepared, prepare_ct
from prostlab.data.resample import CubeGrid, cube_grid, resample_linear, resample_nearest
from prostlab.data.volume import Volume, spacing_of

__all__ = [
    "MU_WATER",
    "PREPARED_ORIENTATION",
    "PRESETS",
    "CubeGrid",
    "PoseCaseDataset",
    "PoseDataModule",
    "PoseDistribution",
    "PoseSampler",
    "PreparedCT",
    "Volume",
    "bone_ids",
    "case_generator",
    "bone_mask",
    "check_same_grid",
    "cube_grid",
    "example_path",
    "fill_outside_fov",
    "hu_to_mu",
    "load_image",
    "load_prepared",
    "orientation_of",
    "prost_normalised",
    "prepare_ct",
    "read_structures",
    "reorient",
    "reoriented_grid",
    "resample_linear",
    "resample_nearest",
    "save_nifti",
    "segment",
    "spacing_of",
]


_LIGHTNING = ("PoseCaseDataset", "PoseDataModule")


def __getattr__(name: str):
    if name in _LIGHTNING:
        from prostlab.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module 'prostlab.data' has no attribute {name!r}")
