"""The cone-beam camera: a point source and a flat detector, and its intrinsic matrix.

Frames and conventions are those of ``docs/geometry.md``: the camera frame has its origin at the
source, x along detector columns, y along detector rows (down the image), z along the beam; pixel
``(u, v)`` is (column, row) with pixel centres at integer coordinates; the isocentre sits ``sid``
mm from the source on the principal ray.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from prostlab.errors import ProstlabError
from prostlab.geometry.checks import check_batched, check_tensor
from prostlab.geometry.so3 import so3_exp

# Relative tolerance for the consistency checks of from_intrinsics.
_K_TOLERANCE = 1e-9


def _positive_real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ProstlabError(f"{name}: expected a positive number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ProstlabError(f"{name}: expected a positive finite number, got {value}")
    return value


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ProstlabError(f"{name}: expected a positive integer, got {type(value).__name__}")
    if value <= 0:
        raise ProstlabError(f"{name}: expected a positive integer, got {value}")
    return int(value)


def _pair(value: object, name: str, form: str) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ProstlabError(f"{name}: expected a pair {form}, got {value!r}")
    out = []
    for item in value:  # type: ignore[union-attr]
        if isinstance(item, bool) or not isinstance(item, numbers.Real):
            raise ProstlabError(f"{name}: expected a pair of numbers {form}, got {value!r}")
        if not math.isfinite(float(item)):
            raise ProstlabError(f"{name}: expected finite numbers {form}, got {value!r}")
        out.append(float(item))
    return out[0], out[1]


@dataclass(frozen=True)
class Camera:
    """A cone-beam X-ray camera.

    Attributes:
        sdd: source-to-detector distance, mm.
        sid: source-to-isocentre distance, mm; ``0 < sid < sdd``.
        height: detector rows.
        width: detector columns.
        pixel_spacing: ``(dv, du)``, the pixel size along rows and columns, mm.
        principal_point: ``(cx, cy)`` in pixels (column, row), where the principal ray meets the
            detector; ``None`` means the detector's centre ``((width - 1) / 2, (height - 1) / 2)``.

    The intrinsic matrix is ``K = [[sdd / du, 0, cx], [0, sdd / dv, cy], [0, 0, 1]]`` and a
    camera-frame point ``X`` projects to ``(u, v, 1) ~ K X``.
    """

    sdd: float
    sid: float
    height: int
    width: int
    pixel_spacing: tuple[float, float]
    principal_point: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        sdd = _positive_real(self.sdd, "sdd")
        sid = _positive_real(self.sid, "sid")
        if not sid < sdd:
            raise ProstlabError(
                f"sid: expected less than sdd = {sdd} (the isocentre lies between source and "
                f"detector), got {sid}"
            )
        height = _positive_int(self.height, "height")
        width = _positive_int(self.width, "width")
        spacing = _pair(self.pixel_spacing, "pixel_spacing", "(dv, du) in mm")
        for value, label in zip(spacing, ("dv", "du"), strict=True):
            if not value > 0:
                raise ProstlabError(
                    f"pixel_spacing: expected positive (dv, du), got {label} = {value}"
                )
        principal = self.principal_point
        if principal is not None:
            principal = _pair(principal, "principal_point", "(cx, cy) in pixels")
        for name, value in (
            ("sdd", sdd),
            ("sid", sid),
            ("height", height),
            ("width", width),
            ("pixel_spacing", spacing),
            ("principal_point", principal),
        ):
            object.__setattr__(self, name, value)

    # ----------------------------------------------------------------------------- intrinsics

    @property
    def cx(self) -> float:
        """The principal point's column, pixels."""
        return (self.width - 1) / 2 if self.principal_point is None else self.principal_point[0]

    @property
    def cy(self) -> float:
        """The principal point's row, pixels."""
        return (self.height - 1) / 2 if self.principal_point is None else self.principal_point[1]

    @property
    def focal_lengths(self) -> tuple[float, float]:
        """``(fx, fy) = (sdd / du, sdd / dv)``: the focal length in pixels along columns, rows."""
        dv, du = self.pixel_spacing
        return self.sdd / du, self.sdd / dv

    @property
    def magnification(self) -> float:
        """``sdd / sid``, the magnification of an object at the isocentre."""
        return self.sdd / self.sid

    @property
    def intrinsics(self) -> Tensor:
        """The intrinsic matrix ``K``, a new ``(3, 3)`` float64 CPU tensor."""
        fx, fy = self.focal_lengths
        return torch.tensor(
            [[fx, 0.0, self.cx], [0.0, fy, self.cy], [0.0, 0.0, 1.0]], dtype=torch.float64
        )

    @classmethod
    def from_intrinsics(
        cls,
        K: Any,
        height: int,
        width: int,
        sid: float,
        *,
        sdd: float | None = None,
        pixel_spacing: tuple[float, float] | None = None,
    ) -> Camera:
        """Build a camera from its intrinsic matrix.

        ``K`` fixes only ``sdd / du`` and ``sdd / dv``, so exactly one of ``sdd`` (then
        ``du = sdd / K[0, 0]``, ``dv = sdd / K[1, 1]``) or ``pixel_spacing = (dv, du)`` (then
        ``sdd = K[0, 0] du``, which must equal ``K[1, 1] dv``) completes it. A principal point at
        the detector's centre gives ``principal_point=None``, so ``Camera -> K -> Camera`` is
        the identity up to rounding.

        Args:
            K: ``(3, 3)`` array-like, ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` with
                ``fx, fy > 0``.
            height: detector rows.
            width: detector columns.
            sid: source-to-isocentre distance, mm (extrinsic, not in ``K``).
            sdd: source-to-detector distance, mm.
            pixel_spacing: ``(dv, du)``, mm.

        Raises:
            ValueError: ``K`` is not of that form, both or neither of ``sdd`` and
                ``pixel_spacing`` are given, or ``pixel_spacing``'s aspect disagrees with ``K``.
        """
        height = _positive_int(height, "height")
        width = _positive_int(width, "width")
        try:
            k = torch.as_tensor(K, dtype=torch.float64).detach().cpu()
        except (TypeError, ValueError, RuntimeError) as error:
            raise ProstlabError(
                f"K: expected a (3, 3) array of numbers, got {type(K).__name__}"
            ) from error
        if k.shape != (3, 3):
            raise ProstlabError(f"K: expected shape (3, 3), got {tuple(k.shape)}")
        if not bool(torch.isfinite(k).all()):
            raise ProstlabError("K: expected finite values, got NaN or inf")
        fx, fy = float(k[0, 0]), float(k[1, 1])
        if not (fx > 0 and fy > 0):
            raise ProstlabError(
                f"K: expected positive focal terms K[0, 0], K[1, 1], got {fx}, {fy}"
            )
        scale = _K_TOLERANCE * max(fx, fy)
        if abs(float(k[0, 1])) > scale or abs(float(k[1, 0])) > scale:
            raise ProstlabError(
                f"K: expected zero skew K[0, 1] = K[1, 0] = 0, got {float(k[0, 1])}, "
                f"{float(k[1, 0])}"
            )
        bottom = tuple(float(x) for x in k[2])
        if max(abs(bottom[0]), abs(bottom[1]), abs(bottom[2] - 1.0)) > _K_TOLERANCE:
            raise ProstlabError(f"K: expected bottom row (0, 0, 1), got {bottom}")
        if (sdd is None) == (pixel_spacing is None):
            raise ProstlabError(
                "sdd, pixel_spacing: expected exactly one of them (K fixes only sdd / du and "
                "sdd / dv), got " + ("both" if sdd is not None else "neither")
            )
        if sdd is not None:
            sdd = _positive_real(sdd, "sdd")
            spacing = (sdd / fy, sdd / fx)
        else:
            dv, du = _pair(pixel_spacing, "pixel_spacing", "(dv, du) in mm")
            if not (dv > 0 and du > 0):
                raise ProstlabError(f"pixel_spacing: expected positive (dv, du), got {(dv, du)}")
            sdd = fx * du
            if abs(fy * dv - sdd) > 1e-6 * sdd:
                raise ProstlabError(
                    f"pixel_spacing: K gives sdd = K[0, 0] * du = {sdd} but K[1, 1] * dv = "
                    f"{fy * dv}; expected (dv, du) in the ratio K[0, 0] : K[1, 1]"
                )
            spacing = (dv, du)
        cx, cy = float(k[0, 2]), float(k[1, 2])
        centred = abs(cx - (width - 1) / 2) <= 1e-9 and abs(cy - (height - 1) / 2) <= 1e-9
        return cls(
            sdd=sdd,
            sid=sid,
            height=height,
            width=width,
            pixel_spacing=spacing,
            principal_point=None if centred else (cx, cy),
        )

    # ----------------------------------------------------------------------------- geometry

    def extrinsics(self, pose: Tensor) -> Tensor:
        """Extrinsic matrices ``E = [R(omega) | t + sid e_z]``: volume frame to camera frame.

        Args:
            pose: ``(B, 6)`` poses ``(omega rad, t mm)``.

        Returns:
            ``(B, 3, 4)``, same dtype and device as ``pose``.
        """
        check_batched(pose, "pose", (6,))
        rotation = so3_exp(pose[:, :3])
        shift = torch.tensor([0.0, 0.0, self.sid], dtype=pose.dtype, device=pose.device)
        return torch.cat((rotation, (pose[:, 3:] + shift)[..., None]), dim=-1)

    def ray_directions(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> Tensor:
        """Camera-frame vectors from the source to every pixel centre.

        ``d(u, v) = ((u - cx) du, (v - cy) dv, sdd)`` for column ``u`` and row ``v``; not
        normalised: ``|d|`` is the distance from the source to the pixel centre.

        Returns:
            ``(height * width, 3)``, flattened row-major: row ``v * width + u``.
        """
        dv, du = self.pixel_spacing
        v, u = torch.meshgrid(
            torch.arange(self.height, dtype=dtype, device=device),
            torch.arange(self.width, dtype=dtype, device=device),
            indexing="ij",
        )
        x = (u.reshape(-1) - self.cx) * du
        y = (v.reshape(-1) - self.cy) * dv
        return torch.stack((x, y, torch.full_like(x, self.sdd)), dim=-1)

    def project(self, points: Tensor) -> Tensor:
        """Pixel coordinates of camera-frame points: ``(u, v) = (fx x / z + cx, fy y / z + cy)``.

        Args:
            points: ``(..., 3)`` camera-frame points with ``z > 0``, mm.

        Returns:
            ``(..., 2)`` pixel coordinates ``(u, v)`` (column, row), same dtype and device.
        """
        check_tensor(points, "points", (3,), "(..., 3)")
        fx, fy = self.focal_lengths
        x, y, z = points.unbind(-1)
        return torch.stack((fx * x / z + self.cx, fy * y / z + self.cy), dim=-1)

    # ----------------------------------------------------------------------------- resolution

    def resized(self, height: int, width: int) -> Camera:
        """The same detector area and field of view sampled by ``height x width`` pixels.

        The pixel spacing becomes ``(dv height_old / height, du width_old / width)``. A pixel
        coordinate maps as ``u' = (u + 1/2) width / width_old - 1/2`` (pixel centres at integers,
        the detector's edge at ``-1/2``), and so does the principal point; the default (centred)
        one stays the default.
        """
        height = _positive_int(height, "height")
        width = _positive_int(width, "width")
        dv, du = self.pixel_spacing
        principal = self.principal_point
        if principal is not None:
            sx, sy = width / self.width, height / self.height
            principal = ((principal[0] + 0.5) * sx - 0.5, (principal[1] + 0.5) * sy - 0.5)
        return Camera(
            sdd=self.sdd,
            sid=self.sid,
            height=height,
            width=width,
            pixel_spacing=(dv * self.height / height, du * self.width / width),
            principal_point=principal,
        )

    def scaled(self, factor: float) -> Camera:
        """:meth:`resized` to ``(height * factor, width * factor)``, which must be integers.

        ``factor = 0.5`` halves the resolution (pixels twice as large), keeping the field of view.
        """
        factor = _positive_real(factor, "factor")
        height, width = self.height * factor, self.width * factor
        if abs(height - round(height)) > 1e-9 or abs(width - round(width)) > 1e-9:
            raise ProstlabError(
                f"factor: expected a value that makes height x width = {self.height} x "
                f"{self.width} integers, got {factor} (gives {height} x {width}); use resized()"
            )
        if round(height) < 1 or round(width) < 1:
            raise ProstlabError(f"factor: expected at least one pixel, got {factor}")
        return self.resized(round(height), round(width))

    # ----------------------------------------------------------------------------- configs

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (numbers and lists) for configs; :meth:`from_dict` reads it back."""
        return {
            "sdd": self.sdd,
            "sid": self.sid,
            "height": self.height,
            "width": self.width,
            "pixel_spacing": list(self.pixel_spacing),
            "principal_point": None if self.principal_point is None else list(self.principal_point),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Camera:
        """Build a camera from a mapping with the field names as keys.

        Raises:
            TypeError: ``data`` is not a mapping.
            ValueError: a key is unknown or a required one is missing.
        """
        if not isinstance(data, Mapping):
            raise ProstlabError(f"camera: expected a mapping of fields, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ProstlabError(f"camera: unknown key(s) {unknown}; expected keys among {names}")
        missing = [n for n in names if n != "principal_point" and n not in data]
        if missing:
            raise ProstlabError(f"camera: missing key(s) {missing}")
        return cls(**dict(data))
