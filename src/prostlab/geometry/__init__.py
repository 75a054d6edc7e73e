"""Geometry: the camera, rotations, rigid poses and their distances.

Conventions (frames, pose, camera, rays) are stated in ``docs/geometry.md``. Poses are
``(B, 6)`` tensors ``(omega rad, t mm)`` mapping the volume frame to the isocentre frame.
"""

from prostlab.geometry.camera import Camera
from prostlab.geometry.checks import check_pose, check_pose_in_beam, depth_outside_beam
from prostlab.geometry.euler import euler_to_pose, pose_to_euler
from prostlab.geometry.se3 import (
    compose,
    geodesic_distance,
    geodesic_gradient,
    inverse,
    matrix_to_pose,
    perturb,
    pose_to_matrix,
    se3_exp,
    se3_log,
)
from prostlab.geometry.so3 import (
    geodesic_angle,
    hat,
    rotation_angle,
    so3_exp,
    so3_left_jacobian,
    so3_left_jacobian_inverse,
    so3_log,
    vee,
)

__all__ = [
    "Camera",
    "check_pose",
    "check_pose_in_beam",
    "depth_outside_beam",
    "compose",
    "euler_to_pose",
    "geodesic_angle",
    "geodesic_distance",
    "geodesic_gradient",
    "hat",
    "inverse",
    "matrix_to_pose",
    "perturb",
    "pose_to_euler",
    "pose_to_matrix",
    "rotation_angle",
    "se3_exp",
    "se3_log",
    "so3_exp",
    "so3_left_jacobian",
    "so3_left_jacobian_inverse",
    "so3_log",
    "vee",
]
