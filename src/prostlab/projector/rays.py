"""The rays of one rendering call: what every projector backend needs to know about them.

A ray leaves the source along the unit direction ``d_p`` (camera frame) of pixel ``p`` and ends at
the pixel's centre, ``L_p`` mm away. Its samples sit at ``tau_k = k * step`` (k = 0, 1, ...), and a
sample's position in the volume frame is

    x_pk = M @ (tau_k d_p, 1),        M = E^-1 = [R^T | -R^T (t + sid e_z)]  (3 x 4, per batch item)

so the pose enters the hot path only through the 12 numbers of ``M``. Samples outside the volume's
support (the box one voxel beyond the outermost voxel centres, where the zero-padded trilinear
interpolant vanishes) are skipped: ``sample_range`` clips every ray to it.

A ray crosses the support over at most its diagonal ``2 |h|``, so it takes at most
``2 |h| / step + 1`` samples. More than :data:`MAX_SAMPLES_PER_RAY` is refused (a ``step`` far
below the voxel size, e.g. ``1e-6`` mm, would otherwise run for hours).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from prostlab.errors import ProstlabError

MAX_SAMPLES_PER_RAY = 1 << 16
"""The most samples one ray may take through the volume (65,536): a 512^3 CT at 1 mm voxels has
a diagonal of 887 mm, so any step down to 0.014 mm fits; ProST's setting takes about 300."""


@functools.lru_cache(maxsize=16)
def morton_order(height: int, width: int) -> torch.Tensor:
    """The row-major pixel indices ``(height * width,)`` of a detector sorted by Morton (Z)
    code, the bits of the row and of the column interleaved: the order walks 2 x 2 tiles, then
    4 x 4 tiles of them, and so on (rows and columns beyond a power of two fall at the end of
    their tile's range, so every pixel still appears once)."""
    row, col = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    code = torch.zeros(height * width, dtype=torch.int64)
    for bit in range(max(height, width).bit_length()):
        code |= ((row.reshape(-1) >> bit) & 1) << (2 * bit + 1)
        code |= ((col.reshape(-1) >> bit) & 1) << (2 * bit)
    return torch.argsort(code)


_CACHED_BUNDLES = 8
"""How many ray bundles :meth:`RayBundle.from_camera` keeps (cameras, volume grids, dtypes)."""


@functools.lru_cache(maxsize=_CACHED_BUNDLES)
def _camera_rays(camera, spacing, grid, step, dtype, device) -> RayBundle:
    rays = camera.ray_directions(dtype=dtype, device=device)
    lengths = rays.norm(dim=-1)
    return RayBundle(rays / lengths[:, None], lengths, spacing, grid, step,
                     (camera.height, camera.width))


@dataclass(frozen=True)
class RayBundle:
    """Camera rays and the sampled volume's grid, fixed for one rendering call.

    Attributes:
        directions: (P, 3) unit ray directions in the camera frame, row-major over the detector.
        lengths: (P,) source-to-pixel-centre distances, mm.
        spacing: voxel spacing (s_D, s_H, s_W), mm, in array-axis order.
        grid: the volume's array shape (D, H, W).
        step: distance between samples along a ray, mm.
        detector: the detector's (height, width) when ``directions`` are its pixels row by row,
            else ``None`` (any other set of rays).
    """

    directions: torch.Tensor
    lengths: torch.Tensor
    spacing: tuple[float, float, float]
    grid: tuple[int, int, int]
    step: float
    detector: tuple[int, int] | None = None

    @staticmethod
    def from_camera(camera, spacing, grid, step: float, dtype, device) -> RayBundle:
        """Build the rays of ``camera`` for a volume of array shape ``grid`` and ``spacing``.

        The same arguments give the same bundle (the last :data:`_CACHED_BUNDLES` are kept): a
        registration renders through one camera hundreds of times. Its tensors are shared, so
        they are never changed in place.
        """
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or not all(s > 0 for s in spacing):
            raise ProstlabError(
                f"spacing: expected three positive voxel sizes in mm, got {spacing}"
            )
        if not (step > 0 and math.isfinite(step)):
            raise ProstlabError(f"step: expected a positive sampling distance in mm, got {step}")
        check_samples_per_ray(grid, spacing, step)
        return _camera_rays(camera, spacing, tuple(int(n) for n in grid), float(step), dtype,
                            torch.device(device) if device is not None else None)

    def tiled(self) -> tuple[RayBundle, torch.Tensor] | None:
        """The same rays in Morton order of their pixels, and that order ``(P,)``.

        ``None`` when the rays are not a detector's pixels (:attr:`detector` unset). Rays ``p``
        and ``p + 1`` of the result are neighbours in both image directions, so a thread that
        walks them in turn reads the same volume region twice while it is still cached; an
        image computed on them comes back in row order as ``image[..., order] = tiled_image``.
        Computed once per bundle.
        """
        if self.detector is None:
            return None
        if "_tiled" not in self.__dict__:  # frozen: memoised beside the fields
            order = morton_order(*self.detector).to(self.directions.device)
            rays = RayBundle(self.directions[order], self.lengths[order], self.spacing,
                             self.grid, self.step)
            self.__dict__["_tiled"] = (rays, order)
        return self.__dict__["_tiled"]

    @property
    def half_support(self) -> tuple[float, float, float]:
        """Half-sides (mm) of the box outside which the interpolant is zero (:func:`support_half_sides`)."""
        return support_half_sides(self.grid, self.spacing)

    def sample_range(self, M: torch.Tensor, rays: slice | None = None):
        """First sample index and sample count of each ray inside the volume's support.

        The ray ``x(tau) = c + tau w`` (``w = A d``, ``c = M[:, :, 3]``) enters the box
        ``|x_a| <= h_a`` at ``max_a min(t0_a, t1_a)`` and leaves it at ``max_a``'s twin, the slab
        test; the interval is then cut to ``[0, L_p]`` (between source and pixel).

        Args:
            M: (B, 3, 4) volume-from-camera transforms.
            rays: the slice of rays to clip (all by default).

        Returns:
            k_first: (B, P) int64, index of the first sample (``tau = k_first * step``).
            count: (B, P) int64, number of samples (0 for rays that miss the volume).
        """
        rays = rays or slice(None)
        d, length = self.directions[rays], self.lengths[rays]
        M = M.detach()
        w = torch.einsum("bij,pj->bpi", M[:, :, :3], d)  # (B, P, 3)
        c = M[:, None, :, 3].expand_as(w)
        h = torch.tensor(self.half_support, dtype=w.dtype, device=w.device)
        parallel = w.abs() < 1e-12
        safe_w = torch.where(parallel, torch.ones_like(w), w)
        t0, t1 = (-h - c) / safe_w, (h - c) / safe_w
        inside = c.abs() <= h
        unbounded = torch.full_like(w, torch.inf)
        lo = torch.where(
            parallel, torch.where(inside, -unbounded, unbounded), torch.minimum(t0, t1)
        )
        hi = torch.where(
            parallel, torch.where(inside, unbounded, -unbounded), torch.maximum(t0, t1)
        )
        t_in, t_out = lo.amax(dim=-1), hi.amin(dim=-1)
        length = length.expand_as(t_in)
        # A box wholly behind the source or beyond the pixel is missed too.
        hits = (t_in <= t_out) & (t_out >= 0) & (t_in <= length)
        t_in = torch.minimum(t_in.clamp(min=0.0), length)
        t_out = torch.minimum(t_out.clamp(min=0.0), length)
        k_first = torch.ceil(t_in / self.step)
        k_last = torch.floor(t_out / self.step)
        count = torch.where(hits, k_last - k_first + 1, torch.zeros_like(k_last)).clamp(min=0)
        return k_first.long(), count.long()


def support_half_sides(grid, spacing) -> tuple[float, ...]:
    """Half-sides (mm) of the projector's support for a volume of array shape ``grid`` and voxel
    ``spacing``: ``(N_a + 1) / 2 * s_a``, a voxel beyond the outermost voxel centres, where the
    zero-padded trilinear interpolant vanishes."""
    return tuple((n + 1) / 2 * s for n, s in zip(grid, spacing, strict=True))


def check_samples_per_ray(grid, spacing, step: float) -> int:
    """The most samples a ray takes through a volume of array shape ``grid`` and voxel
    ``spacing`` (mm) at ``step`` mm, ``floor(2 |h| / step) + 1`` with ``h`` the half-sides of the
    support; refused with a ``ProstlabError`` above :data:`MAX_SAMPLES_PER_RAY`."""
    diagonal = 2 * math.sqrt(sum(h * h for h in support_half_sides(grid, spacing)))
    samples = math.floor(diagonal / step) + 1
    if samples > MAX_SAMPLES_PER_RAY:
        raise ProstlabError(
            f"step: {step:g} mm would take up to {samples:,} samples along a ray through this "
            f"volume ({diagonal:.4g} mm across); expected at most {MAX_SAMPLES_PER_RAY:,}, a step "
            f"of at least {diagonal / (MAX_SAMPLES_PER_RAY - 1):.3g} mm"
        )
    return samples
