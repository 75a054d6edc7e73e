"""The benchmark's target X-rays, and how far they are from the image the methods render.

A target rendered by the same projector from the same volume as the moving image is an
"inverse crime": at the true pose the two images are identical, which flatters every method. A
:class:`TargetConfig` (``model.benchmark.target``) makes targets that differ the way real X-rays
do, each knob on its own:

- ``volume: fine`` renders the prepared CT **before** ``data.downsample`` (e.g. 128^3 where the
  methods move the 64^3 average), at ``step_mm`` (e.g. half the model's step);
- ``blur_mm`` blurs the detector image (:func:`prostlab.data.blur.detector_blur`);
- ``photons`` adds Poisson quantum noise (:func:`prostlab.data.noise.poisson_noise`).

They apply in that order: render, blur (the detector's point spread of the expected signal),
noise. The noise of case ``i`` is drawn from its own generator ``(seed, NOISE_STREAM, i)``, so a
target does not depend on the batch it is rendered in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from prostlab.data.blur import detector_blur
from prostlab.data.noise import poisson_noise
from prostlab.data.poses import case_generator
from prostlab.errors import ProstlabError
from prostlab.projector import Projector

NOISE_STREAM = 3
"""Generator key of the targets' noise draws, apart from the pose splits 0..2."""
TARGET_VOLUMES = ("ct", "fine")


def _positive_or_none(value: Any, name: str, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
        math.isfinite(value) and value > 0
    ):
        raise ProstlabError(f"{name}: expected {what} or null, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class TargetConfig:
    """How the benchmark renders its targets (``model.benchmark.target``).

    Attributes:
        volume: "ct", the whole CT the methods render (after ``data.downsample``), or "fine",
            the prepared CT before ``data.downsample`` (finer voxels, same field of view).
        step_mm: the ray step of the targets' renderer, mm; None: the model's ``step``.
        photons: unattenuated photons per pixel for Poisson noise; None: no noise.
        blur_mm: standard deviation of a Gaussian detector blur, mm on the detector; 0: none.
    """

    volume: str = "ct"
    step_mm: float | None = None
    photons: float | None = None
    blur_mm: float = 0.0

    def __post_init__(self) -> None:
        name = "model.benchmark.target"
        if self.volume not in TARGET_VOLUMES:
            raise ProstlabError(
                f"{name}.volume: expected one of {TARGET_VOLUMES}, got {self.volume!r}"
            )
        step = _positive_or_none(self.step_mm, f"{name}.step_mm", "a positive ray step in mm")
        photons = _positive_or_none(self.photons, f"{name}.photons",
                                    "a positive photon count per pixel")
        blur = self.blur_mm
        if isinstance(blur, bool) or not isinstance(blur, int | float) or not (
            math.isfinite(blur) and blur >= 0
        ):
            raise ProstlabError(
                f"{name}.blur_mm: expected a non-negative standard deviation in mm, got {blur!r}"
            )
        object.__setattr__(self, "step_mm", step)
        object.__setattr__(self, "photons", photons)
        object.__setattr__(self, "blur_mm", float(blur))

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> TargetConfig:
        """From the ``model.benchmark.target`` mapping (None: the inverse-crime default)."""
        if config is None:
            return cls()
        if not isinstance(config, Mapping):
            raise ProstlabError(
                f"model.benchmark.target: expected a mapping of "
                f"{[f.name for f in fields(cls)]}, got {config!r}"
            )
        unknown = sorted(set(config) - {f.name for f in fields(cls)})
        if unknown:
            raise ProstlabError(
                f"model.benchmark.target: unknown key(s) {unknown}; expected among "
                f"{[f.name for f in fields(cls)]}"
            )
        return cls(**dict(config))

    @property
    def inverse_crime(self) -> bool:
        """Whether a target is exactly the image the methods render at the true pose."""
        return (self.volume, self.step_mm, self.photons, self.blur_mm) == ("ct", None, None, 0.0)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def noisy_targets(clean: torch.Tensor, photons: float | None, seed: int,
                  cases: torch.Tensor) -> torch.Tensor:
    """``clean`` ``(B, C, H, W)`` with Poisson noise, case ``cases[b]`` drawing from its own
    seeded generator, so that the noise does not depend on batching."""
    if photons is None:
        return clean
    return torch.stack([
        poisson_noise(image, photons, case_generator(seed, NOISE_STREAM, int(case)))
        for image, case in zip(clean, cases, strict=True)
    ])


def render_targets(config: TargetConfig, projector: Projector, view, gt: torch.Tensor,
                   cases: torch.Tensor, seed: int) -> torch.Tensor:
    """The targets ``(B, 1, H, W)`` of cases ``cases`` ``(B,)`` at ground-truth poses ``gt``
    ``(B, 6)``, for a :class:`~prostlab.lightning.volume_bank.VolumeView` ``view``.

    ``projector`` is the methods' projector; its camera and backend are kept, its step replaced
    by ``config.step_mm`` when given. ``volume: fine`` needs ``view.fine`` (see
    :meth:`~prostlab.lightning.volume_bank.VolumeBank.keep_fine`).
    """
    volume, spacing = view.ct, view.spacing
    if config.volume == "fine":
        if view.fine is None:
            raise ProstlabError(
                "model.benchmark.target.volume: 'fine' needs the full-resolution CT, which this "
                "volume bank does not hold (VolumeBank.keep_fine)"
            )
        volume, spacing = view.fine, view.fine_spacing
    if config.step_mm is not None:
        projector = Projector(projector.camera, step=config.step_mm, backend=projector.backend,
                              max_samples=projector.max_samples)
    with torch.no_grad():
        image = projector(volume, spacing, gt)
    image = detector_blur(image, config.blur_mm, projector.camera.pixel_spacing)
    return noisy_targets(image, config.photons, seed, cases)


__all__ = ["NOISE_STREAM", "TargetConfig", "noisy_targets", "render_targets"]
