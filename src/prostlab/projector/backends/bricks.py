"""The bricked volume layout of the kernels, the last volume bricked, and when to use it.

A volume larger than the caches is read by the kernels' trilinear gathers one scattered cache
line at a time: in the linear ``(D, H, W)`` layout the eight corners of a cell sit on four lines,
and two rays a few voxels apart share lines only along ``W``. In the bricked layout (``kernels/
prost_common.cuh``, ``Launch``) the grid, padded to whole bricks of ``e = 2^b`` voxels a side,
is stored brick after brick, each brick's ``e^3`` voxels together: a cell's corners lie in one
brick or a few, and nearby rays in any direction share bricks.

:func:`to_bricks` makes that copy slab by slab; :func:`cached_bricks` keeps the last one
(:mod:`~prostlab.projector.backends.volume_cache`), so that a registration or a benchmark that
renders the same volume again and again pays for it once. Bricks are not always faster:
:class:`LayoutChoice` times both layouts on the first launches of each configuration and keeps
the faster.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable

import torch

from prostlab.projector.backends.volume_cache import cached_copy, clear_volume_cache

__all__ = ["to_bricks", "cached_bricks", "clear_brick_cache", "LayoutChoice"]


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


def cached_bricks(vol: torch.Tensor, shift: int) -> torch.Tensor:
    """:func:`to_bricks` of ``vol``, reused while the same, unchanged volume comes back."""
    return cached_copy(vol, "bricks", int(shift), lambda: to_bricks(vol, shift))


def clear_brick_cache() -> None:
    """Drop the cached bricked copy (it holds about the volume's size in memory)."""
    clear_volume_cache("bricks")


class LayoutChoice:
    """The faster of the linear layout (shift 0) and bricks of ``2^shift`` voxels, per launch
    configuration, found by timing both on its first launches.

    Which layout wins depends on the machine's caches and on how the rays cross the volume. On a
    2-core Xeon (``bench/results/layouts_cpu.md``), bricks took a 128^2 AP DRR of the 512 x 512 x
    133 chest CT, whose rays cross its rows, from 64 to 48 ms, but a 256^2 AP DRR of a 256^3 cube,
    whose rays run along its rows, from 95 to 118 ms. So the first ``2 trials`` launches of a
    configuration (a hashable ``key``) alternate linear, bricked, linear, ...; then
    the layout with the shorter fastest launch is kept for that key. The images do not depend on
    the choice: both layouts hold the same values and the kernels add in the same order.
    """

    def __init__(self, shift: int, trials: int = 2):
        self.shift, self.trials = int(shift), int(trials)
        self._times: dict[Hashable, dict[int, list[float]]] = {}
        self._chosen: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def next(self, key: Hashable) -> int:
        """The brick shift for the next launch of ``key``: the chosen one, else the trial's."""
        with self._lock:
            if key in self._chosen:
                return self._chosen[key]
            times = self._times.setdefault(key, {0: [], self.shift: []})
            return 0 if len(times[0]) <= len(times[self.shift]) else self.shift

    def record(self, key: Hashable, shift: int, seconds: float) -> None:
        """Note how long a launch of ``key`` in layout ``shift`` took (ignored once chosen)."""
        with self._lock:
            times = self._times.get(key)
            if key in self._chosen or times is None:
                return
            times[shift].append(seconds)
            if all(len(t) >= self.trials for t in times.values()):
                self._chosen[key] = min(times, key=lambda s: min(times[s]))
                del self._times[key]

    def settled(self) -> bool:
        """Whether no configuration is on trial."""
        with self._lock:
            return not self._times

    def bricked(self) -> bool:
        """Whether some configuration keeps the bricked layout."""
        with self._lock:
            return self.shift in self._chosen.values()

    def chosen(self, key: Hashable) -> int | None:
        """The layout kept for ``key``, or None while it is still on trial."""
        with self._lock:
            return self._chosen.get(key)
