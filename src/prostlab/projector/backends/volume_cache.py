"""Copies of a volume in another memory layout, kept while the volume is unchanged.

A registration or a benchmark renders the same volume again and again. A backend that reads it
in a layout of its own (the kernels' bricks, :mod:`~prostlab.projector.backends.bricks`; the
torch backend's axis order) pays for the copy once: :func:`cached_copy` keeps the last copy of
each kind. A copy is keyed by its parameters and by the volume's storage, offset, shape, strides,
dtype, device and version counter (bumped by any in-place change), and its slot holds a reference
to the storage, so that a freed and reallocated tensor cannot be mistaken for the volume.

Changes made behind torch's back do not move the version counter: writes through ``.data``, a
NumPy view or ``gradcheck``'s perturbations. After those, :func:`clear_volume_cache` before the next
render. (Only volumes of 2^20 voxels or more are copied, so gradient checks on small volumes are
unaffected.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable

import torch

__all__ = ["cached_copy", "clear_volume_cache"]

_lock = threading.Lock()
_slots: dict[str, tuple[tuple, torch.UntypedStorage, torch.Tensor]] = {}


def _key(vol: torch.Tensor, params: Hashable) -> tuple:
    return (vol.untyped_storage().data_ptr(), vol.storage_offset(), tuple(vol.shape),
            vol.stride(), vol.dtype, vol.device, vol._version, params)


def cached_copy(vol: torch.Tensor, kind: str, params: Hashable,
                make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()``, a copy of ``vol`` of ``kind`` with ``params``, reused while the same,
    unchanged volume comes back with the same parameters (one copy per kind)."""
    key = _key(vol, params)
    with _lock:
        slot = _slots.get(kind)
        if slot is not None and slot[0] == key:
            return slot[2]
    copy = make()
    with _lock:
        _slots[kind] = (key, vol.untyped_storage(), copy)
    return copy


def clear_volume_cache(kind: str | None = None) -> None:
    """Drop the copies of ``kind`` (all kinds by default); each is about the volume's size."""
    with _lock:
        if kind is None:
            _slots.clear()
        else:
            _slots.pop(kind, None)
