"""Seeded random poses: the ground truths and the starting points of training and test cases.

A :class:`PoseDistribution` draws each of the six pose parameters independently, from a normal
(``spread`` = standard deviation) or a uniform (``spread`` = half-width) law around ``mean``; or,
for a benchmark over a range of initial errors, it gives each case one of a list of offset
**levels** ``(|r|, |t|)``: a rotation of exactly ``|r|`` degrees about a uniformly random axis and
a translation of exactly ``|t|`` mm in a uniformly random direction. Rotations are given in
**degrees** and translations in **mm** (the units a researcher reasons in); samples come out as
``(N, 6)`` poses in radians and mm (docs/geometry.md).

ProST draws pose parameters from N(0, 0.15) in normalised units, where a rotation unit is
0.35 pi rad and a translation unit is the volume's half-size (Gao et al., 2020):
:func:`prost_normalised` builds that distribution for a volume.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from prostlab.errors import ProstlabError
from prostlab.geometry import perturb

KINDS = ("normal", "uniform", "levels")
ORDERS = ("cycle", "draw")
PROST_SIGMA = 0.15
PROST_ROTATION_UNIT_DEG = 0.35 * 180.0
"""ProST's normalised rotation unit: 0.35 pi rad = 63 degrees."""
PROST_HALF_SIZE_MM = 64 * 2.33
"""Half the side of ProST's pelvis volume, 128 voxels of 2.33 mm: its translation unit."""


def _triple(value: float | Sequence[float], name: str) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, int | float) else list(value)
    if len(values) != 3 or not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
        raise ProstlabError(
            f"{name}: expected a number or 3 finite numbers (x, y, z), got {value!r}"
        )
    return (float(values[0]), float(values[1]), float(values[2]))


def _levels(value: float | Sequence[float], name: str) -> tuple[float, ...]:
    values = [value] if isinstance(value, int | float) else list(value)
    if not values or not all(
        isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in values
    ):
        raise ProstlabError(
            f"{name}: expected a non-negative number or a list of them (one per level), "
            f"got {value!r}"
        )
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class PoseDistribution:
    """Independent per-axis laws for the rotation vector (degrees) and translation (mm), or a
    list of offset levels.

    Attributes:
        kind: "normal" (``spread`` is the standard deviation), "uniform" (the half-width) or
            "levels".
        rotation_deg: spread of the rotation vector's components, degrees (one or three values);
            for "levels", the rotation angle of each level, degrees (a list).
        translation_mm: spread of the translation's components, mm; for "levels", the
            translation length of each level, mm (a list as long as ``rotation_deg``, or one
            number for every level).
        rotation_mean_deg: centre of the rotation vector's components, degrees (zero for
            "levels").
        translation_mean_mm: centre of the translation's components, mm (zero for "levels").
        order: for "levels" only, which level case ``i`` gets: "cycle" (level ``i mod L``, so
            the levels are equally represented; the default) or "draw" (uniformly at random).
    """

    kind: str = "normal"
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rotation_mean_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mean_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    order: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ProstlabError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        if self.kind == "levels":
            self._check_levels()
            return
        if self.order is not None:
            raise ProstlabError(
                f"order: only for kind 'levels'; a {self.kind} law has no levels, got "
                f"{self.order!r}"
            )
        for name in ("rotation_deg", "translation_mm", "rotation_mean_deg", "translation_mean_mm"):
            values = _triple(getattr(self, name), name)
            if name in ("rotation_deg", "translation_mm") and min(values) < 0:
                raise ProstlabError(f"{name}: expected non-negative spreads, got {values}")
            object.__setattr__(self, name, values)

    def _check_levels(self) -> None:
        rotation = _levels(self.rotation_deg, "rotation_deg")
        translation = _levels(self.translation_mm, "translation_mm")
        count = max(len(rotation), len(translation))
        if len(rotation) == 1:
            rotation = rotation * count
        if len(translation) == 1:
            translation = translation * count
        if len(rotation) != len(translation):
            raise ProstlabError(
                f"translation_mm: expected one length per level, {len(rotation)} like "
                f"rotation_deg (or one number for all), got {len(translation)}"
            )
        for name in ("rotation_mean_deg", "translation_mean_mm"):
            if any(_triple(getattr(self, name), name)):
                raise ProstlabError(f"{name}: levels are offsets around zero; expected 0")
        order = "cycle" if self.order is None else self.order
        if order not in ORDERS:
            raise ProstlabError(f"order: expected one of {ORDERS}, got {order!r}")
        object.__setattr__(self, "rotation_deg", rotation)
        object.__setattr__(self, "translation_mm", translation)
        object.__setattr__(self, "rotation_mean_deg", (0.0, 0.0, 0.0))
        object.__setattr__(self, "translation_mean_mm", (0.0, 0.0, 0.0))
        object.__setattr__(self, "order", order)

    @classmethod
    def from_config(
        cls, config: Mapping | PoseDistribution, name: str = "poses"
    ) -> PoseDistribution:
        """Build from a mapping of the field names (as in a YAML config), or from the preset
        ``{"preset": "prost", "sigma": 0.15, "half_size_mm": 149.12}`` (:func:`prost_normalised`;
        the default half-size is ProST's, 64 voxels of 2.33 mm)."""
        if isinstance(config, PoseDistribution):
            return config
        if not isinstance(config, Mapping):
            raise ProstlabError(f"{name}: expected a mapping of {list(cls.__dataclass_fields__)}")
        if "preset" in config:
            extra = sorted(set(config) - {"preset", "sigma", "half_size_mm"})
            if config["preset"] != "prost" or extra:
                raise ProstlabError(
                    f"{name}: expected {{preset: prost, sigma, half_size_mm}}, got {dict(config)}"
                )
            return prost_normalised(
                float(config.get("half_size_mm", PROST_HALF_SIZE_MM)),
                float(config.get("sigma", PROST_SIGMA)),
            )
        unknown = sorted(set(config) - set(cls.__dataclass_fields__))
        if unknown:
            raise ProstlabError(
                f"{name}: unknown key(s) {unknown}; expected among {list(cls.__dataclass_fields__)}"
            )
        try:
            return cls(**dict(config))
        except ProstlabError as exc:
            raise ProstlabError(f"{name}.{exc}") from exc

    def sample(self, n: int, generator: torch.Generator, first: int = 0) -> torch.Tensor:
        """``(n, 6)`` float64 poses (rad, mm) drawn with ``generator``; ``first`` is the case
        index of the first row (it picks the levels of ``order: cycle``)."""
        if self.kind == "levels":
            return self._sample_levels(n, generator, first)
        spread = torch.tensor([*self.rotation_deg, *self.translation_mm], dtype=torch.float64)
        mean = torch.tensor(
            [*self.rotation_mean_deg, *self.translation_mean_mm], dtype=torch.float64
        )
        if self.kind == "normal":
            unit = torch.randn(n, 6, generator=generator, dtype=torch.float64)
        else:
            unit = 2.0 * torch.rand(n, 6, generator=generator, dtype=torch.float64) - 1.0
        poses = mean + spread * unit
        poses[:, :3] *= math.pi / 180.0
        return poses

    def _sample_levels(self, n: int, generator: torch.Generator, first: int) -> torch.Tensor:
        """Row ``k`` at level ``l``: ``(rotation_deg[l] * pi / 180 * a, translation_mm[l] * d)``
        with ``a`` and ``d`` independent uniform unit vectors (normalised normal draws)."""
        count = len(self.rotation_deg)
        if self.order == "cycle":
            level = (first + torch.arange(n)) % count
        else:
            level = torch.randint(count, (n,), generator=generator)
        directions = torch.randn(n, 2, 3, generator=generator, dtype=torch.float64)
        directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        angle = torch.tensor(self.rotation_deg, dtype=torch.float64)[level] * math.pi / 180.0
        length = torch.tensor(self.translation_mm, dtype=torch.float64)[level]
        return torch.cat(
            (angle[:, None] * directions[:, 0], length[:, None] * directions[:, 1]), dim=1
        )


def prost_normalised(half_size_mm: float, sigma: float = PROST_SIGMA) -> PoseDistribution:
    """ProST's N(0, sigma) in normalised units for a volume of half-size ``half_size_mm``.

    Rotation std ``sigma * 0.35 pi`` (9.45 degrees at sigma 0.15), translation std
    ``sigma * half_size`` (22.4 mm for ProST's 128 voxels of 2.33 mm).
    """
    return PoseDistribution(
        kind="normal",
        rotation_deg=(sigma * PROST_ROTATION_UNIT_DEG,) * 3,
        translation_mm=(sigma * half_size_mm,) * 3,
    )


@dataclass(frozen=True)
class PoseSampler:
    """Ground-truth poses and starting poses for registration cases.

    The ground truth is drawn from ``ground_truth``; the starting pose is either drawn on its own
    from ``initial`` (``relative=False``, ProST's training scheme: two independent poses) or is the
    ground truth moved by an offset from ``initial`` (``relative=True``, the test scheme: the
    offset is applied with :func:`prostlab.geometry.perturb`, rotation in the body frame).
    """

    ground_truth: PoseDistribution = field(default_factory=PoseDistribution)
    initial: PoseDistribution = field(default_factory=PoseDistribution)
    relative: bool = True

    def sample(
        self, n: int, generator: torch.Generator, offset_scale: float = 1.0, first: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gt, initial)``, each ``(n, 6)`` float64 (rad, mm).

        ``offset_scale`` multiplies the drawn offset of a relative sampler (a training
        curriculum widens it from small to full); it must be 1 for an absolute one. ``first`` is
        the case index of the first row (for laws of ``kind: levels``).
        """
        gt = self.ground_truth.sample(n, generator, first)
        drawn = self.initial.sample(n, generator, first)
        if not self.relative:
            if offset_scale != 1.0:
                raise ProstlabError("offset_scale: a curriculum needs relative: true poses")
            return gt, drawn
        return gt, perturb(gt, offset_scale * drawn)


def case_generator(seed: int, *keys: int) -> torch.Generator:
    """A generator seeded from ``seed`` and integer ``keys`` (split, epoch, index ...).

    Each case draws from its own stream, so the draws do not depend on the order cases are
    visited in, on the number of data-loader workers or on the number of processes.
    """
    mixed = int(seed) & 0xFFFFFFFF
    for key in keys:
        mixed = (mixed * 1_000_003 + int(key) + 0x9E3779B9) % (1 << 61)
    return torch.Generator().manual_seed(mixed)
