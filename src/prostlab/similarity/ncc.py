"""Normalised cross-correlation (NCC) and gradient-NCC of image batches, and their losses.

For images ``x, y`` of one channel and weights ``w >= 0`` (a mask, all ones without one), with
weighted means ``E_w[f] = sum(w f) / sum(w)``:

    NCC(x, y) = E_w[(x - E_w x)(y - E_w y)] / sqrt(Var_w(x) Var_w(y)),

which lies in ``[-1, 1]``, is symmetric, equals 1 for ``y = a x + b`` with ``a > 0`` and -1 for
``a < 0``. Multi-channel images are compared channel by channel and the NCCs averaged.

**Flat images.** An image of (near-)zero variance carries no correlation; its NCC is defined
as 0. "Near-zero" is relative to the image's own scale, ``Var_w(x) <= eps * E_w[x^2]``, so the
rule does not depend on the intensity unit and catches a constant image whatever its value
(float32 rounding leaves ``Var / E[x^2]`` near 1e-14 for a constant). The same holds when the
weights sum to 0. Both the value and its gradient (zero there) are then finite.

**Gradient-NCC.** The mean NCC of the Sobel-x and Sobel-y images,

    GradNCC(x, y) = (NCC(S_x * x, S_x * y) + NCC(S_y * x, S_y * y)) / 2,

with ``S_x = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]`` (the derivative along the columns, image
``u``) and ``S_y = S_x^T`` (along the rows, ``v``). The filters are applied to the **valid**
region only (no padding), so the gradient images are ``(H - 2) x (W - 2)`` and no padding
rule invents edges at the border. A mask is **eroded** to match: the weight of a gradient
pixel is the minimum weight over its 3 x 3 neighbourhood, so a gradient pixel that reads any
masked-out pixel (weight 0) is itself masked out, and pixels under weight 0 cannot change the
value.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prostlab.errors import ProstlabError
from prostlab.geometry.checks import check_real_device, check_same_device

__all__ = ["GradientNCCLoss", "NCCLoss", "gradient_ncc", "ncc", "sobel"]

_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def _check_images(x: object, y: object) -> tuple[Tensor, Tensor]:
    for name, image in (("x", x), ("y", y)):
        if not isinstance(image, Tensor) or image.ndim != 4:
            got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ProstlabError(
                f"{name}: expected an image tensor of shape (B, C, H, W), got {got}"
            )
        if not image.is_floating_point():
            raise ProstlabError(
                f"{name}: expected a floating-point tensor, got dtype {image.dtype}"
            )
        check_real_device(image, name)
    check_same_device(("x", x), ("y", y))
    if x.shape[1:] != y.shape[1:]:
        raise ProstlabError(
            f"y: expected shape (B, C, H, W) = (B, {', '.join(map(str, x.shape[1:]))}) like x, "
            f"got {tuple(y.shape)}"
        )
    if x.shape[0] != y.shape[0] and 1 not in (x.shape[0], y.shape[0]):
        raise ProstlabError(
            f"y: expected batch size {x.shape[0]} (that of x) or 1, got {y.shape[0]}"
        )
    return x, y


def _check_mask(mask: object, x: Tensor, y: Tensor) -> Tensor | None:
    """Validate a mask against images ``x``, ``y``; return it as a floating tensor."""
    if mask is None:
        return None
    batch, channels, height, width = max(x.shape[0], y.shape[0]), *x.shape[1:]
    form = f"(B | 1, 1 | C, H, W) = ({batch} | 1, 1 | {channels}, {height}, {width})"
    if not isinstance(mask, Tensor) or mask.ndim != 4:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ProstlabError(f"mask: expected a tensor of shape {form}, got {got}")
    check_real_device(mask, "mask")
    check_same_device(("x", x), ("mask", mask))
    if (
        mask.shape[0] not in (1, batch)
        or mask.shape[1] not in (1, channels)
        or tuple(mask.shape[2:]) != (height, width)
    ):
        raise ProstlabError(f"mask: expected shape {form}, got {tuple(mask.shape)}")
    dtype = torch.promote_types(x.dtype, y.dtype)
    mask = mask.to(dtype)
    low, high = torch.aminmax(mask)
    if not (bool(low >= 0) and bool(high <= 1)):  # also false for NaN
        raise ProstlabError(
            f"mask: expected weights in [0, 1] (1 = use the pixel), got values in "
            f"[{float(low)}, {float(high)}]"
        )
    return mask.detach()


def _patch_matrix(size: int, parts: int, like: Tensor) -> Tensor:
    """``(parts, size)`` 0/1 matrix: row ``i`` marks the pixels ``r`` with ``floor(r parts / size)
    = i``, so ``parts`` patches, as equal as integers allow, tile the axis (of ``like``'s dtype
    and device; made once per size, count, dtype and device: never change it in place)."""
    return _patch_matrix_of(size, parts, like.dtype, like.device)


@functools.lru_cache(maxsize=32)
def _patch_matrix_of(size: int, parts: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    patch_of_pixel = torch.arange(size, device=device) * parts // size
    parts_index = torch.arange(parts, device=device)
    return (patch_of_pixel[None, :] == parts_index[:, None]).to(dtype)


def _ncc(
    x: Tensor, y: Tensor, w: Tensor | None, eps: float, grid: int = 1
) -> tuple[Tensor, Tensor]:
    """Per-channel weighted NCC on each patch of a ``grid x grid`` tiling; inputs already checked.

    Patch statistics are sums ``P_r f P_c^T`` with the 0/1 patch matrices ``P_r (grid, H)`` and
    ``P_c (grid, W)``; ``grid = 1`` is the whole image. Means are subtracted before the second
    moments are taken (two passes, no ``E[x^2] - E[x]^2`` cancellation in float32).

    Returns:
        ``(value, informative)``, both ``(B, C, grid, grid)``: the NCC of each patch (0 where
        either image is flat or the weights sum to 0), and whether the patch carries any
        information (positive weight, and not flat in *both* images).
    """
    rows = _patch_matrix(x.shape[-2], grid, x)
    cols = _patch_matrix(x.shape[-1], grid, x)

    def total(f: Tensor) -> Tensor:  # (..., H, W) -> (..., grid, grid) patch sums
        if grid == 1:  # a sum per image: its rounding does not depend on the batch (a matmul's
            return f.sum(dim=(-2, -1), keepdim=True)  # blocking, and so its rounding, does)
        return rows @ f @ cols.T

    def spread(s: Tensor) -> Tensor:  # (..., grid, grid) -> (..., H, W), each pixel its patch's
        if grid == 1:
            return s.expand(*s.shape[:-2], x.shape[-2], x.shape[-1])
        return rows.T @ s @ cols

    if w is None:
        weight = total(torch.ones_like(x[:1, :1]))
        valid_weights = None

        def mean(f: Tensor) -> Tensor:
            return total(f) / weight

    else:
        weight = total(w)
        valid_weights = weight > 0
        safe_weight = torch.where(valid_weights, weight, torch.ones_like(weight))

        def mean(f: Tensor) -> Tensor:
            return total(w * f) / safe_weight

    dx = x - spread(mean(x))
    dy = y - spread(mean(y))
    var_x = mean(dx * dx)
    var_y = mean(dy * dy)
    cov = mean(dx * dy)
    # Flat (near-constant) images: Var <= eps * E[f^2], relative to the image's own scale.
    flat_x = var_x <= eps * mean(x * x)
    flat_y = var_y <= eps * mean(y * y)
    valid = ~(flat_x | flat_y)
    informative = ~(flat_x & flat_y)
    if valid_weights is not None:
        valid = valid & valid_weights
        informative = informative & valid_weights
    # Safe denominators where invalid, so that neither branch of the where makes NaN gradients;
    # two rsqrt rather than one of the product, which could underflow for faint images.
    one = torch.ones_like(cov)
    safe_x = torch.where(valid, var_x, one)
    safe_y = torch.where(valid, var_y, one)
    value = torch.where(valid, cov * torch.rsqrt(safe_x) * torch.rsqrt(safe_y), 0.0 * one)
    return value, informative.expand_as(value)


def ncc(x: Tensor, y: Tensor, mask: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """Zero-normalised cross-correlation of two image batches.

    Computed per channel with (optionally) weighted means and variances, then averaged over
    the channels. An image of near-zero variance, ``Var_w <= eps * E_w[x^2]``, or a mask of zero
    total weight gives NCC = 0, with a finite (zero) gradient. See the module docstring.

    Args:
        x: ``(B | 1, C, H, W)`` images.
        y: ``(B | 1, C, H, W)`` images; a batch of 1 on either side broadcasts.
        mask: optional ``(B | 1, 1 | C, H, W)`` weights in ``[0, 1]`` ({0, 1} for a binary
            mask; bool is accepted); 0 excludes a pixel. It carries no gradient.
        eps: relative variance below which an image counts as flat.

    Returns:
        ``(B,)`` NCC values in ``[-1, 1]``.
    """
    x, y = _check_images(x, y)
    w = _check_mask(mask, x, y)
    return _ncc(x, y, w, float(eps))[0][..., 0, 0].mean(dim=1)


def sobel(image: Tensor) -> tuple[Tensor, Tensor]:
    """Sobel-x and Sobel-y images of ``(B, C, H, W)``, valid region: two ``(B, C, H-2, W-2)``.

    Sobel-x differentiates along the columns (image ``u``, left to right), Sobel-y along the rows
    (image ``v``, top to bottom); both are cross-correlations, as ``conv2d`` would compute. They
    are computed as shifted differences and sums (elementwise), not by ``conv2d``, whose
    gradient rounds differently with the batch's size: an image's Sobel gradients, and so a
    registration, must not depend on which other cases share its batch (issue 22).
    """
    if image.shape[-2] < 3 or image.shape[-1] < 3:
        raise ProstlabError(
            f"image: expected at least 3 x 3 pixels for the Sobel filters, got "
            f"{tuple(image.shape[-2:])}"
        )
    # _SOBEL_X is the difference (-1, 0, 1) along the columns smoothed by (1, 2, 1) along the
    # rows; Sobel-y is its transpose.
    across = image[..., :, 2:] - image[..., :, :-2]  # (H, W - 2)
    down = image[..., 2:, :] - image[..., :-2, :]  # (H - 2, W)
    gx = across[..., :-2, :] + 2.0 * across[..., 1:-1, :] + across[..., 2:, :]
    gy = down[..., :, :-2] + 2.0 * down[..., :, 1:-1] + down[..., :, 2:]
    return gx, gy


def _erode(mask: Tensor) -> Tensor:
    """The minimum weight over each pixel's 3 x 3 neighbourhood, valid region."""
    return -F.max_pool2d(-mask, kernel_size=3, stride=1)


def gradient_ncc(x: Tensor, y: Tensor, mask: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """Gradient-NCC: ``(NCC(S_x x, S_x y) + NCC(S_y x, S_y y)) / 2``.

    The Sobel images cover the valid region, ``(H - 2) x (W - 2)``; a mask is eroded by the 3 x 3
    neighbourhood (minimum weight) to match, so pixels under weight 0 do not affect the value.
    Flat gradient images follow :func:`ncc`'s rule (their NCC is 0).

    Args:
        x: ``(B | 1, C, H, W)`` images, ``H, W >= 3``.
        y: ``(B | 1, C, H, W)`` images.
        mask: optional ``(B | 1, 1 | C, H, W)`` weights in ``[0, 1]``.
        eps: relative variance below which a gradient image counts as flat.

    Returns:
        ``(B,)`` values in ``[-1, 1]``.
    """
    x, y = _check_images(x, y)
    w = _check_mask(mask, x, y)
    if w is not None:
        w = _erode(w)
    gx_x, gy_x = sobel(x)
    gx_y, gy_y = sobel(y)
    eps = float(eps)
    both = _ncc(gx_x, gx_y, w, eps)[0] + _ncc(gy_x, gy_y, w, eps)[0]
    return 0.5 * both[..., 0, 0].mean(dim=1)


class NCCLoss(nn.Module):
    """``1 - NCC(moving, target)``, ``(B,)`` in ``[0, 2]``; lower is better.

    Args:
        eps: relative variance below which an image counts as flat (see :func:`ncc`).
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = float(eps)

    def forward(self, moving: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """Compare ``(B | 1, C, H, W)`` images; ``mask`` as in :func:`ncc`."""
        return 1.0 - ncc(moving, target, mask, self.eps)


class GradientNCCLoss(nn.Module):
    """``1 - GradNCC(moving, target)``, ``(B,)`` in ``[0, 2]``; lower is better.

    Written ``1 - 0.5 NCC_x - 0.5 NCC_y`` in the ProST paper. See :func:`gradient_ncc`.

    Args:
        eps: relative variance below which a gradient image counts as flat.
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = float(eps)

    def forward(self, moving: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """Compare ``(B | 1, C, H, W)`` images, ``H, W >= 3``; ``mask`` as in :func:`ncc`."""
        return 1.0 - gradient_ncc(moving, target, mask, self.eps)
