"""The bricked volume layout of the kernels, and a cache of the last volume bricked.

A volume larger than the caches is read by the kernels' trilinear gathers one scattered cache
line at a time: in the linear ``(D, H, W)`` layout the eight corners of a cell sit on four lines,
and two rays a few voxels apart share lines only along ``W``. In the bricked layout (``kernels/
prost_common.cuh``, ``Launch``) the grid, padded to whole bricks of ``e = 2^b`` voxels a side,
is stored brick after brick, each brick's ``e^3`` voxels together: a cell's corners lie in one
brick or a few, and nearby rays in any direction share bricks.

:func:`to_bricks` makes that copy slab by slab; :func:`cached_bricks`
keeps the last one, so that a registration or a benchmark that renders the same volume again and
again pays for it once. The cache is keyed by the volume's storage, offset, shape, strides, dtype
and version counter (bumped by any in-place change), and holds a reference to the storage, so a
freed and reallocated tensor cannot be mistaken for it.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["to_bricks", "cached_bricks", "clear_brick_cache"]

_lock = threading.Lock()
_cache: dict[str, object] = {}


def to_bricks(vol: torch.Tensor, shift: int) -> torch.Tensor:
    """``(Bv, C, D, H, W)`` -> ``(Bv, C, nb_D nb_H nb_W e^3)``, bricks of ``e = 2^shift`` voxels.

    The grid is zero-padded up to ``nb_a = ceil(N_a / e)`` bricks per axis; brick
    ``(I, J, K)`` holds voxels ``(I e + i, J e + j, K e + k)`` for ``0 <= i, j, k < e``, in that
    order, and the bricks follow each other in ``(I, J, K)`` order.

    Written one slab of ``e`` slices at a time, so that besides the result only a slab's padded
    copy exists (8 slices; a whole padded copy would double the memory this takes).
    """
    e = 1 << int(shift)
    bv, c, d, h, w = vol.shape
    nb = [(n + e - 1) // e for n in (d, h, w)]
    bricks = vol.new_zeros(bv, c, nb[0], nb[1], nb[2], e, e, e)
    slab = vol.new_zeros(bv, c, e, nb[1] * e, nb[2] * e)
    for i in range(nb[0]):
        part = vol[:, :, i * e : (i + 1) * e]
        if part.shape[2] < e:
            slab.zero_()
        slab[:, :, : part.shape[2], :h, :w] = part
        blocks = slab.reshape(bv, c, e, nb[1], e, nb[2], e)
        bricks[:, :, i] = blocks.permute(0, 1, 3, 5, 2, 4, 6)
    return bricks.reshape(bv, c, -1)


def _key(vol: torch.Tensor, shift: int) -> tuple:
    return (vol.untyped_storage().data_ptr(), vol.storage_offset(), tuple(vol.shape),
            vol.stride(), vol.dtype, vol.device, vol._version, int(shift))


def cached_bricks(vol: torch.Tensor, shift: int) -> torch.Tensor:
    """:func:`to_bricks` of ``vol``, reused while the same, unchanged volume comes back."""
    key = _key(vol, shift)
    with _lock:
        if _cache.get("key") == key:
            return _cache["bricks"]  # type: ignore[return-value]
    bricks = to_bricks(vol, shift)
    with _lock:
        _cache.update(key=key, storage=vol.untyped_storage(), bricks=bricks)
    return bricks


def clear_brick_cache() -> None:
    """Drop the cached copy (it holds about the volume's size in memory)."""
    with _lock:
        _cache.clear()
