"""Training-time augmentation of the CT and of the target X-ray, so that the similarity network
learns anatomy rather than one rendering of one volume.

Two groups, both optional and both seeded by ``(seed, global_step)`` so that a resumed run draws
what an uninterrupted one would:

- **Volume** (:meth:`TrainingAugmentation.volumes`): one random affine map of the CT and its
  segmented bones together (MONAI ``RandAffine``: small rotations, scalings and shears about the
  volume centre, trilinear), so target and moving image stay consistent with the same poses;
  then a random soft-tissue weight ``w``: ``ct' = bone + w (ct - bone)``, which changes the
  contrast of bone against soft tissue as a different tube voltage would.
- **Image** (:meth:`TrainingAugmentation.target`), on the target's line integrals ``L``
  (B, 1, h, w): Poisson quantum noise at a random photon count (:func:`poisson_noise`), a
  Gaussian detector blur of random width (MONAI ``GaussianSmooth``), then min-max
  normalisation and a random gamma ``x -> x^gamma`` (MONAI ``AdjustContrast``-like contrast
  change of the detector response).

Every range is a config field (``model.augmentation``); a range ``[a, a]`` or a probability 0
turns that part off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prostlab.data.noise import poisson_noise
from prostlab.data.poses import case_generator
from prostlab.errors import ProstlabError
from prostlab.similarity import minmax_normalise

AUGMENT_STREAM = 4
"""Generator key of the augmentation draws, apart from the data splits 0..2 and noise 3."""


def _range(value: Any, name: str, low: float, high: float) -> tuple[float, float]:
    if (not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2
            or not all(isinstance(v, int | float) and math.isfinite(v) for v in value)):
        raise ProstlabError(f"model.augmentation.{name}: expected [min, max], got {value!r}")
    a, b = float(value[0]), float(value[1])
    if not low <= a <= b <= high:
        raise ProstlabError(
            f"model.augmentation.{name}: expected {low} <= min <= max <= {high}, got [{a}, {b}]"
        )
    return a, b


@dataclass(frozen=True)
class AugmentationConfig:
    """Ranges of the random training augmentation (``model.augmentation``).

    Attributes:
        affine_prob: probability of a random affine map of the volumes.
        rotate_deg: half-range of the affine's rotation about each axis, degrees.
        scale: half-range of the relative scaling per axis (0.05: 0.95 to 1.05).
        shear: half-range of the shear factors.
        soft_tissue: range of the soft-tissue weight ``w`` (1: unchanged).
        photons: range of log10 of the unattenuated photons per pixel for Poisson noise;
            None: no noise.
        blur_px: range of the detector blur's Gaussian sigma, pixels (0: none).
        gamma: range of the gamma applied to the normalised target (1: unchanged).
    """

    affine_prob: float = 0.8
    rotate_deg: float = 3.0
    scale: float = 0.06
    shear: float = 0.03
    soft_tissue: tuple[float, float] = (0.6, 1.4)
    photons: tuple[float, float] | None = (3.5, 5.0)
    blur_px: tuple[float, float] = (0.0, 1.0)
    gamma: tuple[float, float] = (0.8, 1.25)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> AugmentationConfig:
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(config) - set(names))
        if unknown:
            raise ProstlabError(
                f"model.augmentation: unknown key(s) {unknown}; expected among {names}"
            )
        made = cls(**dict(config))
        for name in ("affine_prob", "rotate_deg", "scale", "shear"):
            value = getattr(made, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ProstlabError(
                    f"model.augmentation.{name}: expected a number >= 0, got {value!r}"
                )
        if made.affine_prob > 1:
            raise ProstlabError(f"model.augmentation.affine_prob: expected <= 1, got "
                                f"{made.affine_prob}")
        checked = {
            "soft_tissue": _range(made.soft_tissue, "soft_tissue", 0.0, 10.0),
            "blur_px": _range(made.blur_px, "blur_px", 0.0, 20.0),
            "gamma": _range(made.gamma, "gamma", 0.05, 20.0),
        }
        if made.photons is not None:
            checked["photons"] = _range(made.photons, "photons", 0.0, 12.0)
        for name, value in checked.items():
            object.__setattr__(made, name, value)
        return made


class TrainingAugmentation:
    """Seeded random augmentation of a training step's volumes and targets (module docstring).

    Args:
        config: the ranges, an :class:`AugmentationConfig` or a mapping of its fields.
        seed: the run's seed; each step's draws come from ``case_generator(seed, 4, step)``.
    """

    def __init__(self, config: AugmentationConfig | Mapping[str, Any], seed: int = 0):
        from monai.transforms import RandAffine

        self.config = (config if isinstance(config, AugmentationConfig)
                       else AugmentationConfig.from_config(config))
        self.seed = int(seed)
        c = self.config
        self._affine = RandAffine(
            prob=c.affine_prob,
            rotate_range=(math.radians(c.rotate_deg),) * 3,
            scale_range=(c.scale,) * 3,
            shear_range=(c.shear,) * 6,
            mode="bilinear",
            padding_mode="zeros",
            cache_grid=False,
        )

    def generator(self, step: int, volume: int = 0) -> torch.Generator:
        """The torch generator of one volume's draws at one step (it also seeds MONAI's numpy
        state): keyed on the volume, so that the volumes of a batch are augmented
        independently rather than by one shared draw."""
        return case_generator(self.seed, AUGMENT_STREAM, int(step), int(volume))

    def volumes(self, ct: Tensor, bone: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(ct', bone')``, each ``(1, 1, D, H, W)``: one affine map of both, then the
        soft-tissue weight on the CT."""
        state = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        self._affine.set_random_state(state=np.random.RandomState(state))
        both = torch.cat((ct[0], bone[0]), dim=0)  # (2, D, H, W)
        moved = self._affine(both)
        moved = _plain(moved).to(ct.dtype).clamp_min(0.0)
        ct_a, bone_a = moved[0:1][None], moved[1:2][None]
        w = _uniform(self.config.soft_tissue, generator)
        return bone_a + w * (ct_a - bone_a).clamp_min(0.0), bone_a

    def target(self, line_integrals: Tensor, generator: torch.Generator) -> Tensor:
        """Noisy, blurred, min-max normalised and gamma-adjusted targets, ``(B, 1, h, w)``."""
        from monai.transforms import GaussianSmooth

        c = self.config
        images = []
        for image in line_integrals:  # (1, h, w) each
            if c.photons is not None:
                photons = 10.0 ** _uniform(c.photons, generator)
                image = poisson_noise(image, photons, generator)
            sigma = _uniform(c.blur_px, generator)
            if sigma > 0.05:
                image = _plain(GaussianSmooth(sigma=sigma)(image)).to(image)
            image = minmax_normalise(image[None])[0]
            images.append(image ** _uniform(c.gamma, generator))
        return torch.stack(images)


def _plain(image: Tensor) -> Tensor:
    """A plain tensor from MONAI's output (a ``MetaTensor`` when MONAI tracks metadata)."""
    return image.as_tensor() if hasattr(image, "as_tensor") else image


def _uniform(bounds: tuple[float, float], generator: torch.Generator) -> float:
    low, high = bounds
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


__all__ = ["AUGMENT_STREAM", "AugmentationConfig", "TrainingAugmentation"]
