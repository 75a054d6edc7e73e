"""Registration schedules: the stages an optimisation runs through, built from config.

A :class:`Schedule` is a list of :class:`Stage` s and a global iteration cap. Each stage names a
similarity (``"ncc"``, ``"gradncc"``, ``"mncc"``, ``"net"``), what it renders (``moving``: the
bones or the whole CT), the resolution it works at (``detector_scale``, ``volume_downsample``),
an optimiser and its step sizes, and a plateau rule: a case leaves the stage when the standard
deviation of its last ``plateau_window`` objective values (in that stage) falls below
``plateau_std``, or after ``max_iterations`` in it.

**Step sizes.** The optimiser works in the tangent coordinates ``u = (r delta_rot, delta_trans)``
of the retraction ``pose <- perturb(pose, delta)`` (``docs/geometry.md``): the rotation part,
in radians, is multiplied by ``rotation_radius`` ``r`` (mm), so that both halves are in mm, a
rotation being weighed by how far it moves a point at distance ``r`` from the volume's centre.
``lr`` is then a single number for all six coordinates:

- ``sgd``: ``u <- u - lr * m``, ``m = momentum * m + grad_u``, so ``delta_trans = -lr m_t`` and
  ``delta_rot = -(lr / r^2) m_rot`` in terms of the gradients in rad and mm. ``lr`` is in mm^2
  per unit of objective: the Riemannian gradient step for the metric ``diag(r^2, 1)``.
- ``adam``: Adam on ``u`` with ``betas = (momentum, 0.999)``; a step moves about ``lr`` mm per
  coordinate (``lr / r`` rad for rotations), whatever the objective's scale.

Presets live in ``configs/registration/*.yaml``, shipped inside the package as
``prostlab.configs`` (:func:`prostlab.resources.preset_dir`); :func:`load_schedule` reads them by
name or path.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from prostlab.errors import ProstlabError
from prostlab.resources import preset_dir
from prostlab.similarity.objective import MOVING, OBJECTIVES

__all__ = [
    "OPTIMIZERS",
    "SIMILARITIES",
    "Schedule",
    "Stage",
    "load_schedule",
    "preset_dir",
    "preset_names",
]

SIMILARITIES = OBJECTIVES
"""Similarity names a stage may use (those of :func:`prostlab.similarity.objective.make_objective`)."""

OPTIMIZERS = ("sgd", "adam")
"""Optimisers a stage may use."""


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ProstlabError(f"{name}: expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ProstlabError(f"{name}: expected a finite number, got {value}")
    return value


def _positive(value: object, name: str) -> float:
    value = _number(value, name)
    if not value > 0:
        raise ProstlabError(f"{name}: expected a positive number, got {value}")
    return value


def _integer(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ProstlabError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One stage of a registration schedule.

    Attributes:
        similarity: the objective, one of :data:`SIMILARITIES`.
        optimizer: ``"sgd"`` (with momentum) or ``"adam"``.
        lr: step size in the tangent coordinates ``(r delta_rot, delta_trans)``, all in mm
            (module docstring): mm^2 per unit of objective for SGD, mm per step for Adam.
        momentum: SGD momentum, or Adam's ``beta1``; in ``[0, 1)``.
        plateau_window: number of recent objective values the plateau rule looks at, ``>= 2``.
        plateau_std: the case leaves the stage when the (population) standard deviation of its
            last ``plateau_window`` values in this stage falls below this; ``0`` disables it.
        max_iterations: the case leaves the stage after this many iterations in it.
        rotation_radius: ``r`` in mm, the rotation-versus-translation scale: a rotation step
            is ``1 / r^2`` (SGD) or ``1 / r`` (Adam) times the translation step, in rad per mm.
        moving: the volume the stage renders, ``"bone"`` (segmented) or ``"ct"`` (whole);
            ``None``: the similarity's default, the bones for ``net`` (as ProST) and the whole
            CT for the image similarities.
        detector_scale: render and compare on a detector of ``scale * (h, w)`` pixels, each
            ``1 / scale`` times larger, over the same field of view (:meth:`Camera.scaled
            <prostlab.geometry.Camera.scaled>`); the target is average-pooled to that size. In
            ``(0, 1]``; ``scale * h`` and ``scale * w`` must be integers.
        volume_downsample: average-pool the volume by this integer factor (voxels ``f`` times
            larger) and lengthen the sampling step by the same factor, so that a ray takes
            ``1 / f`` as many samples at the same samples per voxel. It must divide the
            volume's shape.

    A coarse stage (``detector_scale < 1`` or ``volume_downsample > 1``) costs about
    ``scale^2 / f`` of a full-resolution one per iteration. ``net`` stages render at the
    network's own camera and volume: both must stay 1.
    """

    similarity: str
    optimizer: str = "sgd"
    lr: float
    momentum: float = 0.9
    plateau_window: int = 10
    plateau_std: float
    max_iterations: int = 500
    rotation_radius: float = 100.0
    moving: str | None = None
    detector_scale: float = 1.0
    volume_downsample: int = 1

    def __post_init__(self) -> None:
        self.validate("stage")

    def validate(self, where: str) -> None:
        """Check every field; errors name the field as ``<where>.<field>``."""
        if self.similarity not in SIMILARITIES:
            raise ProstlabError(
                f"{where}.similarity: expected one of {list(SIMILARITIES)}, got {self.similarity!r}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ProstlabError(
                f"{where}.optimizer: expected one of {list(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        values = {
            "lr": _positive(self.lr, f"{where}.lr"),
            "momentum": _number(self.momentum, f"{where}.momentum"),
            "plateau_window": _integer(self.plateau_window, f"{where}.plateau_window", 2),
            "plateau_std": _number(self.plateau_std, f"{where}.plateau_std"),
            "max_iterations": _integer(self.max_iterations, f"{where}.max_iterations", 1),
            "rotation_radius": _positive(self.rotation_radius, f"{where}.rotation_radius"),
            "detector_scale": _positive(self.detector_scale, f"{where}.detector_scale"),
            "volume_downsample": _integer(self.volume_downsample, f"{where}.volume_downsample", 1),
        }
        if self.moving is not None and self.moving not in MOVING:
            raise ProstlabError(
                f"{where}.moving: expected one of {list(MOVING)} or null (the similarity's "
                f"default), got {self.moving!r}"
            )
        if values["detector_scale"] > 1:
            raise ProstlabError(
                f"{where}.detector_scale: expected a number in (0, 1] (1: the camera's own "
                f"detector), got {values['detector_scale']}"
            )
        if self.similarity == "net":
            for name, full in (("detector_scale", 1.0), ("volume_downsample", 1)):
                if values[name] != full:
                    raise ProstlabError(
                        f"{where}.{name}: a net stage renders at the network's own camera and "
                        f"volume; expected {full}, got {values[name]}"
                    )
        if not 0 <= values["momentum"] < 1:
            raise ProstlabError(
                f"{where}.momentum: expected a number in [0, 1), got {values['momentum']}"
            )
        if values["plateau_std"] < 0:
            raise ProstlabError(
                f"{where}.plateau_std: expected a number >= 0, got {values['plateau_std']}"
            )
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_config(cls, config: object, where: str = "stage") -> Stage:
        """Build a stage from a mapping of its field names; unknown or missing keys are errors."""
        if not isinstance(config, Mapping):
            raise ProstlabError(
                f"{where}: expected a mapping of stage fields, got {type(config).__name__}"
            )
        names = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in set(config) - set(names))
        if unknown:
            raise ProstlabError(f"{where}: unknown key(s) {unknown}; expected keys among {names}")
        missing = [n for n in ("similarity", "lr", "plateau_std") if n not in config]
        if missing:
            raise ProstlabError(f"{where}: missing required key(s) {missing}")
        stage = object.__new__(cls)
        defaults = {f.name: f.default for f in fields(cls)}
        for name in names:
            object.__setattr__(stage, name, config.get(name, defaults[name]))
        stage.validate(where)
        return stage


@dataclass(frozen=True)
class Schedule:
    """Stages run in order, and a cap on the total iterations of any case.

    Attributes:
        stages: at least one :class:`Stage`.
        max_total_iterations: a case stops (status ``"max_iterations"``) after this many
            objective evaluations over all stages.
    """

    stages: tuple[Stage, ...]
    max_total_iterations: int = 500

    def __post_init__(self) -> None:
        stages = self.stages
        if isinstance(stages, (str, bytes, Mapping)) or not isinstance(stages, Sequence):
            raise ProstlabError(f"stages: expected a list of stages, got {type(stages).__name__}")
        if len(stages) == 0:
            raise ProstlabError("stages: expected at least one stage, got none")
        for i, stage in enumerate(stages):
            if not isinstance(stage, Stage):
                raise ProstlabError(f"stages[{i}]: expected a Stage, got {type(stage).__name__}")
        object.__setattr__(self, "stages", tuple(stages))
        object.__setattr__(
            self,
            "max_total_iterations",
            _integer(self.max_total_iterations, "max_total_iterations", 1),
        )

    @classmethod
    def from_config(cls, config: object) -> Schedule:
        """Build a schedule from plain data (YAML, OmegaConf or Python).

        ``config`` is either a list of stage mappings, or a mapping with keys ``stages`` (that
        list) and optionally ``max_total_iterations``. Stage mappings use :class:`Stage`'s
        field names. Errors name the offending field, e.g. ``stages[1].lr``.
        """
        config = _plain(config)
        if isinstance(config, Mapping):
            allowed = ["stages", "max_total_iterations"]
            unknown = sorted(str(k) for k in set(config) - set(allowed))
            if unknown:
                raise ProstlabError(
                    f"schedule: unknown key(s) {unknown}; expected keys among {allowed}"
                )
            if "stages" not in config:
                raise ProstlabError("stages: missing; expected a list of stage mappings")
            stages, cap = config["stages"], config.get("max_total_iterations", 500)
        else:
            stages, cap = config, 500
        if isinstance(stages, (str, bytes, Mapping)) or not isinstance(stages, Sequence):
            raise ProstlabError(
                f"stages: expected a list of stage mappings, got {type(stages).__name__}"
            )
        if len(stages) == 0:
            raise ProstlabError("stages: expected at least one stage, got none")
        built = [Stage.from_config(s, f"stages[{i}]") for i, s in enumerate(stages)]
        return cls(tuple(built), _integer(cap, "max_total_iterations", 1))

    def to_config(self) -> dict[str, Any]:
        """Plain data that :meth:`from_config` reads back."""
        return {
            "stages": [asdict(s) for s in self.stages],
            "max_total_iterations": self.max_total_iterations,
        }


def _plain(config: object) -> object:
    """OmegaConf containers to plain Python (interpolations resolved); others unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return config
    if isinstance(config, (DictConfig, ListConfig)):
        return OmegaConf.to_container(config, resolve=True)
    return config


def preset_names() -> list[str]:
    """Names of the bundled presets (``configs/registration/<name>.yaml``, in the package)."""
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def load_schedule(name_or_path: str | Path) -> Schedule:
    """Load a schedule from a YAML file, or a bundled preset by name (e.g. ``"gradncc"``).

    A value that names an existing file, or ends in ``.yaml``/``.yml``, is read as a path; any
    other is looked up among the presets shipped in the package (:func:`preset_dir`). The YAML
    holds what :meth:`Schedule.from_config` reads; OmegaConf interpolations are resolved.
    """
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    text = str(name_or_path)
    path = Path(text)
    if not (path.suffix in (".yaml", ".yml") or path.is_file()):
        path = preset_dir() / f"{text}.yaml"
        if not path.is_file():
            raise ProstlabError(
                f"schedule: expected a YAML file or a preset name among {preset_names()}, "
                f"got {text!r}"
            )
    if not path.is_file():
        raise ProstlabError(f"{path}: schedule file not found")
    try:
        config = OmegaConf.load(path)
    except (OSError, OmegaConfBaseException, yaml.YAMLError, ValueError) as error:
        raise ProstlabError(
            f"{path}: expected a YAML schedule, could not read it: {error}"
        ) from error
    try:
        return Schedule.from_config(config)
    except ProstlabError as error:
        raise ProstlabError(f"{path}: {error}") from error
