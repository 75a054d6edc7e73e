"""The DeepFluoro reader against images made without it.

A small file in DeepFluoro's layout holds four balls of bone in air (a CT on a non-cubic,
anisotropic ITK grid whose direction matrix swaps two axes) and projections whose stored images
are line integrals of those balls traced through the authors' documented camera model, written
here: a CT point ``p`` (LPS) lands on stored pixel ``(u, v)`` when ``(u, v, 1) ~ K E T^-1 p``
(``K`` the intrinsic with negative focal terms and an off-centre principal point, ``E`` the
extrinsic, ``T`` the ground truth ``cam-to-pelvis-vol``). Pixel ``(u, v)`` therefore sees the
line ``T E^-1 (lambda K^-1 (u, v, 1))``, ``lambda < 0``, and its value is the sum of the balls'
chords along that line, times their attenuation: no prostlab function makes the images, flips
them or converts a pose.

The reader's case (its oriented, fitted target, its camera and its ground-truth pose of the
prepared cube) must then match prostlab's DRR of the prepared cube at that pose, with the head up
in every case; and each of the reader's flips and signs, inverted in turn, must break that.
"""

from __future__ import annotations

import dataclasses
import math

import h5py
import numpy as np
import pytest
import torch

from deepfluoro_synthetic import _itk_group
from prostlab.data import MU_WATER, load_prepared, prepare_ct
from prostlab.data import deepfluoro as df
from prostlab.geometry import pose_to_matrix
from prostlab.projector import Projector

SPECIMEN = df.SPECIMEN_IDS[0]
ROWS, COLS, PIXEL_MM, SDD = 96, 80, 5.0, 1000.0
PRINCIPAL = (30.0, 58.0)  # (cx, cy), far off the centre (39.5, 47.5): a missed flip moves it
I0, BORDER, SID = 50000.0, 4, 500.0
FLAGS = (False, True, False, True)
# centre (LPS mm), radius mm, HU: four sizes and places, so that no flip maps them onto
# themselves
BALLS = (((-40.0, -10.0, 30.0), 22.0, 1000.0), ((35.0, 5.0, -20.0), 14.0, 1500.0),
         ((10.0, 30.0, 50.0), 10.0, 2000.0), ((-10.0, -25.0, -45.0), 9.0, 2500.0))
SHAPE = (24, 20)  # the model's detector: 4 x 4 bins of the stored image


def _mu(hu: float) -> float:
    return MU_WATER * (1.0 + hu / 1000.0)


def _ct() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(hu, labels, affine_lps)`` of the balls on an ITK grid: index ``(i, j, k)`` to LPS by
    ``origin + D diag(spacing) (i, j, k)`` with ``D`` sending i to -P and j to +L."""
    shape, spacing = (36, 44, 40), np.array([4.5, 4.0, 3.5])
    direction = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = -(affine[:3, :3] @ (np.array(shape) - 1) / 2) + (2.0, -3.0, 1.0)
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape],
                                 indexing="ij"), axis=-1)
    offsets = (np.stack(np.meshgrid(*[[-0.25, 0.25]] * 3, indexing="ij"), -1).reshape(-1, 3))
    hu = np.full(shape, -1000.0)
    labels = np.zeros(shape, dtype=np.uint8)
    for label, (centre, radius, value) in enumerate(BALLS, start=1):
        inside = np.zeros(shape)
        for offset in offsets:  # 2 x 2 x 2 samples per voxel for the partial volume
            lps = (index + offset) @ affine[:3, :3].T + affine[:3, 3]
            inside += np.linalg.norm(lps - centre, axis=-1) <= radius
        hu += inside / len(offsets) * (value + 1000.0)
        centre_in = np.linalg.norm(index @ affine[:3, :3].T + affine[:3, 3] - centre, axis=-1)
        labels[centre_in <= radius] = label
    return hu.astype(np.float32), labels, affine


def _rotation(vector) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_rotvec(vector).as_matrix()


def _ground_truth(extrinsic: np.ndarray, flag: bool, rng) -> np.ndarray:
    """``T`` whose camera ``G = E T^-1`` (LPS to the file's camera) views the balls from the
    front, 500 mm from the source on the negative z side, with the head towards the stored
    image's first row, or its last when ``flag`` (the image must then turn 180 degrees)."""
    rows = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, -1.0, 0.0]])  # x, y, z in LPS
    if flag:
        rows = np.diag([-1.0, -1.0, 1.0]) @ rows
    camera_from_lps = np.eye(4)
    camera_from_lps[:3, :3] = _rotation(rng.uniform(-0.08, 0.08, 3)) @ rows
    camera_from_lps[:3, 3] = (0.0, 0.0, -SID) + rng.uniform(-8.0, 8.0, 3)
    return np.linalg.inv(np.linalg.inv(extrinsic) @ camera_from_lps)


def _trace(k: np.ndarray, extrinsic: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The stored image's line integrals: pixel ``(u, v)`` sees the line of the points ``p`` with
    ``K E T^-1 p ~ (u, v, 1)``, from the source ``T E^-1 0`` along ``T E^-1 K^-1 (u, v, 1)``."""
    lps_from_camera = truth @ np.linalg.inv(extrinsic)
    v, u = np.meshgrid(np.arange(ROWS, dtype=np.float64), np.arange(COLS, dtype=np.float64),
                       indexing="ij")
    rays = np.linalg.inv(k) @ np.stack((u.ravel(), v.ravel(), np.ones(u.size)))
    directions = (lps_from_camera[:3, :3] @ rays).T
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    source = lps_from_camera[:3, 3]
    total = np.zeros(u.size)
    for centre, radius, hu in BALLS:
        to_centre = np.asarray(centre) - source
        along = directions @ to_centre
        miss = np.maximum(to_centre @ to_centre - along**2, 0.0)
        chord = 2.0 * np.sqrt(np.maximum(radius**2 - miss, 0.0))
        total += _mu(hu) * chord
    return total.reshape(ROWS, COLS)


def write_chain_file(path) -> df.Geometry:
    hu, labels, affine = _ct()
    rng = np.random.default_rng(11)
    focal = SDD / PIXEL_MM
    k = np.array([[-focal, 0.0, PRINCIPAL[0]], [0.0, -focal, PRINCIPAL[1]], [0.0, 0.0, 1.0]])
    extrinsic = np.eye(4)
    extrinsic[:3, :3] = _rotation([0.4, -0.1, 0.7])
    extrinsic[:3, 3] = (-20.0, 15.0, 300.0)
    with h5py.File(path, "w") as f:
        params = f.create_group("proj-params")
        params["intrinsic"], params["extrinsic"] = k, extrinsic
        params["num-rows"], params["num-cols"] = ROWS, COLS
        params["pixel-row-spacing"], params["pixel-col-spacing"] = PIXEL_MM, PIXEL_MM
        specimen = f.create_group(SPECIMEN)
        _itk_group(specimen.create_group("vol"), hu, affine)
        _itk_group(specimen.create_group("vol-seg").create_group("image"), labels, affine)
        for n, (centre, _, _) in enumerate(BALLS, start=1):
            specimen[f"vol-landmarks/ball{n}"] = np.reshape(centre, (3, 1))
        for index, flag in enumerate(FLAGS):
            truth = _ground_truth(extrinsic, flag, rng)
            intensity = I0 * np.exp(-_trace(k, extrinsic, truth))
            intensity[:BORDER], intensity[-BORDER:] = 10.0, 10.0
            intensity[:, :BORDER], intensity[:, -BORDER:] = 10.0, 10.0
            group = specimen.create_group(f"projections/{index:03d}")
            _itk_group(group.create_group("image"), intensity.astype(np.float32).T,
                       np.diag([PIXEL_MM, PIXEL_MM, 1.0]))
            group["gt-poses/cam-to-pelvis-vol"] = truth
            group["rot-180-for-up"] = int(flag)
    return df.Geometry(k, extrinsic, ROWS, COLS, (PIXEL_MM, PIXEL_MM))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chain")
    path = folder / "chain.h5"
    write_chain_file(path)
    files = df.export_specimen(path, 1, folder / "raw")
    prepare_ct(files["ct"], files["labels"], folder / "prepared", size=32, bones="1,2,3,4",
               margin_mm=10.0)
    return path, load_prepared(folder / "prepared").ct


def _ncc(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _reader_scores(path, cube) -> tuple[float, bool]:
    """The lowest NCC between the reader's target and the DRR of the prepared cube at the
    reader's ground truth, over the projections; whether every pose shows the head up."""
    geometry = df.read_geometry(path)
    vol_to_lps = df.volume_to_lps(cube.affine, cube.shape[1:])
    superior = np.linalg.inv(vol_to_lps)[:3, :3] @ np.array([0.0, 0.0, 1.0])
    superior /= np.linalg.norm(superior)
    lowest, upright = 1.0, True
    for pid in df.projection_ids(path, SPECIMEN):
        projection = df.read_projection(path, SPECIMEN, pid)
        case = df.xray_case(projection, geometry, vol_to_lps, SHAPE, SID, i0=I0,
                            collimator_px=BORDER)
        drr = Projector(case.camera, step=1.0, backend="torch")(
            cube.batched(), cube.spacing, case.gt_pose[None].float())[0, 0]
        mask = torch.from_numpy(case.mask)
        score = _ncc(drr[mask], torch.from_numpy(case.target)[mask])
        lowest = min(lowest, score if math.isfinite(score) else -1.0)  # a blank DRR: NaN
        rotation = pose_to_matrix(case.gt_pose[None])[0, :3, :3].numpy()
        upright &= bool((rotation @ superior)[1] < -0.9)
    return lowest, upright


def test_reader_matches_images_traced_through_the_files_camera_model(chain):
    lowest, upright = _reader_scores(*chain)
    assert upright and lowest > 0.97, (lowest, upright)


def _flip_only(rows: bool, cols: bool):
    def orient(image, signs):
        return np.ascontiguousarray(image[:: int(signs[1]) if rows else 1,
                                          :: int(signs[0]) if cols else 1])
    return orient


def _wrap(name, change):
    original = getattr(df, name)
    return name, lambda *args: change(original, *args)


MUTATIONS = {
    "columns not reversed": ("orient_image", lambda *a: _flip_only(True, False)(*a)),
    "rows not reversed": ("orient_image", lambda *a: _flip_only(False, True)(*a)),
    "rot-180-for-up ignored": _wrap("camera_signs", lambda f, k, flag: f(k, False)),
    "rot-180-for-up inverted": _wrap("camera_signs", lambda f, k, flag: f(k, not flag)),
    "mirror ignored (sz = +1)": _wrap(
        "camera_signs", lambda f, k, flag: f(k, flag) * np.array([-1.0, 1.0, -1.0])),
    "principal point not flipped": _wrap(
        "detector_camera", lambda f, g, signs, sid: dataclasses.replace(
            f(g, signs, sid), principal_point=(g.intrinsic[0, 2], g.intrinsic[1, 2]))),
    "cam-to-pelvis-vol read as its inverse": _wrap(
        "pose_from_file", lambda f, t, e, *rest: f(np.linalg.inv(t), e, *rest)),
    "extrinsic ignored": _wrap("pose_from_file", lambda f, t, e, *rest: f(t, np.eye(4), *rest)),
    "extrinsic inverted": _wrap(
        "pose_from_file", lambda f, t, e, *rest: f(t, np.linalg.inv(e), *rest)),
    "RAS taken for LPS": _wrap(
        "volume_to_lps", lambda f, affine, shape: df.LPS_FROM_RAS @ f(affine, shape)),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_each_inverted_flip_or_sign_breaks_the_match(chain, mutation, monkeypatch):
    name, replacement = MUTATIONS[mutation]
    monkeypatch.setattr(df, name, replacement)
    try:
        lowest, upright = _reader_scores(*chain)
    except Exception:  # noqa: BLE001 - a reader that cannot even run is broken too
        return
    assert not (upright and lowest > 0.97), (mutation, lowest, upright)
