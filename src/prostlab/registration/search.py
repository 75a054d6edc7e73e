"""A coarse multi-start search for registrations that start far from the truth.

Gradient descent on an image similarity converges only inside its capture range (tens of mm and
degrees, ``docs/registration.md``). When the start is a named view or a rough guess, this search
scans a grid of poses around it at a low resolution and hands the best few to the engine as
starts (:func:`~prostlab.registration.register` takes ``(B, S, 6)`` initial poses).

1. **Grid.** Rotations ``R = R_0 exp([delta]x)`` (a body-frame turn of the volume about its own
   centre, as :func:`~prostlab.geometry.perturb`) with each component of ``delta`` on
   ``-r, ..., 0, ..., r`` in steps of ``rotation_step_deg``, times depths ``t_z = t_0z + d`` with
   ``d`` on ``-z, ..., z`` in steps of ``depth_step_mm``.
2. **In-plane translation for free.** Each grid pose is rendered once at the coarse level
   (:mod:`~prostlab.registration.levels`: by default a detector of about 32 pixels across and the
   volume pooled by 2). The shift of the DRR over the target that maximises
   their correlation is found for all shifts at once, by FFT: with ``T`` and ``D`` the target and
   the DRR, each standardised (zero mean, unit variance; ``T`` over the mask) and zero-padded to
   twice the size, ``c(s) = IFFT(FFT(T) conj(FFT(D)))(s) / N = sum_x T(x + s) D(x) / N``. A shift
   of ``s = (s_u, s_v)`` pixels of ``(du, dv)`` mm at the detector moves an object at depth
   ``Z = sid + t_z`` from the source by ``(s_u du, s_v dv) Z / sdd`` mm in the isocentre frame.
   Shifts are limited to ``shift_mm`` there.
3. **Rescoring.** The ``rescore`` poses of highest correlation, translated by their shifts, are
   scored by the objective the caller gives (1 - NCC, or the network, at full resolution); the
   ``keep`` best that lie at least ``rotation_step_deg / 2`` or ``depth_step_mm / 2`` apart are
   the starts.

The cost is one coarse render per grid pose (``(2 r / step + 1)^3 (2 z / step + 1)``: 625 with the
defaults) and ``rescore`` objective evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from prostlab.errors import ProstlabError
from prostlab.geometry import geodesic_angle, perturb, so3_exp
from prostlab.projector import Projector
from prostlab.registration.levels import build_level

__all__ = ["SearchSpace", "SearchResult", "coarse_search"]


@dataclass(frozen=True)
class SearchSpace:
    """Where and how finely :func:`coarse_search` looks.

    Attributes:
        rotation_deg: half-range of each rotation component about the start, degrees.
        rotation_step_deg: grid step of the rotation components, degrees.
        depth_mm: half-range of the translation along the beam, mm.
        depth_step_mm: grid step along the beam, mm.
        shift_mm: largest in-plane translation from the start, mm (isocentre frame).
        detector_scale: the coarse detector, a fraction of the full one (see ``Stage``); None:
            the coarsest whole-pixel one that keeps at least ``detector_pixels`` along its longer
            side (:meth:`scale_for`).
        detector_pixels: the coarse detector's longer side, at least, when ``detector_scale`` is
            None: the correlation needs the anatomy's outline, which 32 pixels still show.
        volume_downsample: the coarse volume's pooling factor.
        rescore: poses rescored by the caller's objective.
        keep: starts returned.
        batch: poses rendered at once.
    """

    rotation_deg: float = 30.0
    rotation_step_deg: float = 15.0
    depth_mm: float = 100.0
    depth_step_mm: float = 50.0
    shift_mm: float = 100.0
    detector_scale: float | None = None
    detector_pixels: int = 32
    volume_downsample: int = 2
    rescore: int = 32
    keep: int = 4
    batch: int = 64

    def __post_init__(self) -> None:
        for name in ("rotation_deg", "depth_mm", "shift_mm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ProstlabError(f"search.{name}: expected a finite number >= 0, got {value}")
        for name in ("rotation_step_deg", "depth_step_mm", "detector_scale"):
            value = getattr(self, name)
            if name == "detector_scale" and value is None:
                continue
            if not (math.isfinite(value) and value > 0):
                raise ProstlabError(f"search.{name}: expected a positive number, got {value}")
        for name in ("volume_downsample", "rescore", "keep", "batch", "detector_pixels"):
            if int(getattr(self, name)) < 1:
                raise ProstlabError(f"search.{name}: expected a positive integer, got "
                                    f"{getattr(self, name)}")
        if self.keep > self.rescore:
            raise ProstlabError(f"search.keep: expected at most search.rescore = {self.rescore}, "
                                f"got {self.keep}")

    def scale_for(self, height: int, width: int) -> float:
        """``detector_scale``, or ``1 / f`` for the largest divisor ``f`` of both sides with
        ``max(height, width) / f >= detector_pixels`` (1 for a detector smaller than that)."""
        if self.detector_scale is not None:
            return self.detector_scale
        common = math.gcd(height, width)
        factor = max(f for f in range(1, common + 1)
                     if common % f == 0 and max(height, width) / f >= min(self.detector_pixels,
                                                                          max(height, width)))
        return 1.0 / factor

    def grid(self) -> Tensor:
        """``(N, 4)`` float64: rotation offsets (rad, body frame) and depth offsets (mm)."""
        def axis(half: float, step: float) -> Tensor:
            n = int(math.floor(half / step + 1e-9))
            return torch.arange(-n, n + 1, dtype=torch.float64) * step

        rot = torch.deg2rad(axis(self.rotation_deg, self.rotation_step_deg))
        depth = axis(self.depth_mm, self.depth_step_mm)
        return torch.cartesian_prod(rot, rot, rot, depth)


@dataclass(frozen=True)
class SearchResult:
    """The outcome of :func:`coarse_search`.

    Attributes:
        starts: ``(keep, 6)`` the best poses, best first (rad, mm).
        values: ``(keep,)`` the caller's objective there (lower is better).
        evaluated: grid poses rendered.
    """

    starts: Tensor
    values: Tensor
    evaluated: int


def _standardised(image: Tensor, weight: Tensor) -> Tensor:
    """``(x - mean_w) / std_w`` over the weighted pixels, 0 where the weight is 0; ``(B, h, w)``."""
    total = weight.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    mean = (image * weight).sum(dim=(-2, -1), keepdim=True) / total
    var = (((image - mean) ** 2) * weight).sum(dim=(-2, -1), keepdim=True) / total
    return (image - mean) / var.sqrt().clamp_min(1e-12) * weight


def _best_shifts(target: Tensor, mask: Tensor, drr: Tensor, max_shift: tuple[int, int]):
    """Per DRR, the shift ``(s_u, s_v)`` maximising ``c(s)`` and that maximum (module doc).

    Args:
        target: ``(h, w)``; mask: ``(h, w)`` weights; drr: ``(B, h, w)``.
        max_shift: the largest ``|s_u|``, ``|s_v|`` in pixels.

    Returns:
        ``(shifts (B, 2) long, correlation (B,))``.
    """
    h, w = target.shape
    size = (2 * h, 2 * w)
    t = _standardised(target[None], mask[None])
    d = _standardised(drr, torch.ones_like(drr))
    corr = torch.fft.irfft2(torch.fft.rfft2(t, s=size) * torch.fft.rfft2(d, s=size).conj(), s=size)
    corr = corr / mask.sum().clamp_min(1.0)
    # Shifts s >= 0 sit at index s, s < 0 at 2h + s: keep |s| <= max_shift along each axis.
    su = torch.arange(size[1])
    sv = torch.arange(size[0])
    su = torch.where(su < w, su, su - size[1])
    sv = torch.where(sv < h, sv, sv - size[0])
    allowed = (sv.abs()[:, None] <= max_shift[1]) & (su.abs()[None, :] <= max_shift[0])
    corr = corr.masked_fill(~allowed, -math.inf)
    best, flat = corr.flatten(1).max(dim=1)
    return torch.stack((su[flat % size[1]], sv[flat // size[1]]), dim=1), best


def coarse_search(
    target: Tensor,
    start: Tensor,
    projector: Projector,
    volume: Tensor,
    spacing: Sequence[float],
    objective: Callable[[Tensor], Tensor],
    *,
    mask: Tensor | None = None,
    space: SearchSpace | None = None,
    progress: Callable[[int], None] | None = None,
) -> SearchResult:
    """Scan poses around ``start`` and return the best few as registration starts.

    Args:
        target: ``(1, 1, h, w)`` the X-ray on ``projector``'s detector.
        start: ``(6,)`` or ``(1, 6)`` the pose the grid is centred on (rad, mm).
        projector: the full-resolution projector.
        volume: ``(1, 1, D, H, W)`` the volume the correlation renders (the whole CT).
        spacing: its voxel size, mm.
        objective: ``(B, 6) -> (B,)``, lower is better: rescores the best grid poses.
        mask: optional ``(1, 1, h, w)`` weights of the usable pixels.
        space: the grid, levels and counts (:class:`SearchSpace`).
        progress: called with the number of grid poses done after each batch.

    Returns:
        A :class:`SearchResult`.
    """
    space = space or SearchSpace()
    start = start.reshape(1, 6).to(torch.float64)
    if target.ndim != 4 or target.shape[:2] != (1, 1):
        raise ProstlabError(f"target: expected shape (1, 1, h, w), got {tuple(target.shape)}")
    weight = torch.ones_like(target) if mask is None else mask.to(target.dtype)
    camera = projector.camera
    level = build_level(projector, spacing, target, volume, None, weight,
                        space.scale_for(camera.height, camera.width), space.volume_downsample,
                        where="search")
    camera = level.projector.camera
    dv, du = camera.pixel_spacing
    depth = camera.sid + float(start[0, 5])
    max_shift = (int(space.shift_mm * camera.sdd / (depth * du)),
                 int(space.shift_mm * camera.sdd / (depth * dv)))

    grid = space.grid()
    poses = perturb(start.expand(len(grid), 6),
                    torch.cat((grid[:, :3], torch.zeros(len(grid), 3, dtype=grid.dtype)), 1))
    poses[:, 5] += grid[:, 3]
    shifts, scores = [], []
    with torch.no_grad():
        for first in range(0, len(poses), space.batch):
            chunk = poses[first:first + space.batch]
            drr = level.projector(level.ct, level.spacing, chunk.to(target.dtype))
            s, c = _best_shifts(level.target[0, 0], level.mask[0, 0], drr[:, 0], max_shift)
            shifts.append(s)
            scores.append(c)
            if progress is not None:
                progress(len(chunk))
    shifts, scores = torch.cat(shifts), torch.cat(scores)
    order = scores.argsort(descending=True)[: space.rescore]
    candidates = poses[order].clone()
    scale = (candidates[:, 5] + camera.sid) / camera.sdd
    candidates[:, 3] += shifts[order, 0].to(torch.float64) * du * scale
    candidates[:, 4] += shifts[order, 1].to(torch.float64) * dv * scale

    with torch.no_grad():
        values = objective(candidates.to(target.dtype)).to(torch.float64).cpu()
    return SearchResult(*_distinct(candidates, values, space), evaluated=len(poses))


def _distinct(candidates: Tensor, values: Tensor, space: SearchSpace) -> tuple[Tensor, Tensor]:
    """The ``keep`` best candidates, each at least half a grid step from the better ones."""
    min_angle = math.radians(space.rotation_step_deg) / 2
    min_mm = space.depth_step_mm / 2
    kept: list[int] = []
    for i in values.argsort().tolist():
        if not math.isfinite(float(values[i])):
            continue
        far = all(
            float(geodesic_angle(so3_exp(candidates[i : i + 1, :3]),
                                 so3_exp(candidates[j : j + 1, :3]))) >= min_angle
            or float((candidates[i, 3:] - candidates[j, 3:]).norm()) >= min_mm
            for j in kept
        )
        if far:
            kept.append(i)
        if len(kept) == space.keep:
            break
    if not kept:
        raise ProstlabError("search: every candidate's objective was NaN or infinite; check "
                            "the X-ray and the CT")
    return candidates[kept], values[kept]
