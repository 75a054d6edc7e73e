"""The CT pipeline: I/O, HU -> mu, reorientation, resampling, bone labels, prepare and load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from prostlab.data import (
    MU_WATER,
    CubeGrid,
    Volume,
    bone_ids,
    cube_grid,
    fill_outside_fov,
    hu_to_mu,
    load_image,
    load_prepared,
    orientation_of,
    prepare_ct,
    reorient,
    reoriented_grid,
    resample_linear,
    resample_nearest,
    save_nifti,
    spacing_of,
)
from prostlab.errors import ProstlabError

STRUCTURES_CSV = """group,original_idx,structure,id
organs,1,liver,5
vertebrae,1,sacrum,25
vertebrae,5,vertebrae_L3,29
cardiac,1,heart,51
skeleton,9,hip_left,77
skeleton,10,hip_right,78
ribs,1,rib_left_1,92
"""


def las_affine(spacing=(0.8, 0.9, 2.0), origin=(120.0, -100.0, -50.0)) -> np.ndarray:
    """A LAS affine: axis 0 towards the Left (-x in RAS), axis 1 Anterior, axis 2 Superior."""
    a = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    a[:3, 3] = origin
    return a


def world(affine: np.ndarray, index) -> np.ndarray:
    return (affine @ np.array([*index, 1.0]))[:3]


# --- HU -> mu -----------------------------------------------------------------------------------


def test_hu_to_mu_values():
    hu = np.array([-2048.0, -1000.0, 0.0, 1000.0, 3071.0], dtype=np.float32)
    mu = hu_to_mu(hu)
    expected = MU_WATER * np.array([0.0, 0.0, 1.0, 2.0, 4.071])
    np.testing.assert_allclose(mu, expected, rtol=1e-6)
    assert mu.dtype == np.float32 and mu[1] == 0.0  # air is exactly zero
    torch.testing.assert_close(hu_to_mu(torch.from_numpy(hu)), torch.from_numpy(mu))
    # HU's definition with a non-zero mu_air: air -> mu_air, water -> mu_water.
    np.testing.assert_allclose(hu_to_mu(hu[1:3], mu_water=0.02, mu_air=0.001), [0.001, 0.02])
    assert hu_to_mu(np.array([-1500.0]), clamp_min=-1.0)[0] < 0  # the clamp is configurable


def test_fill_outside_fov_only_touches_values_below_the_threshold():
    hu = np.array([-2048.0, -1024.0, -1000.0, 40.0], dtype=np.float32)
    np.testing.assert_array_equal(fill_outside_fov(hu), [-1000.0, -1024.0, -1000.0, 40.0])
    assert hu[0] == -2048.0  # the input is left alone


# --- reorientation ------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["LIP", "RAS", "PSR", "IRA"])
def test_reorient_keeps_world_positions_and_round_trips(target):
    rng = np.random.default_rng(0)
    array = rng.random((5, 6, 7)).astype(np.float32)
    array[1, 4, 2] = 10.0
    affine = las_affine()
    out, out_affine = reorient(array, affine, target)
    assert orientation_of(out_affine) == target
    grid_shape, grid_affine = reoriented_grid(array.shape, affine, target)
    assert grid_shape == out.shape and np.array_equal(grid_affine, out_affine)
    peak = np.unravel_index(np.argmax(out), out.shape)
    np.testing.assert_allclose(world(out_affine, peak), world(affine, (1, 4, 2)), atol=1e-9)
    back, back_affine = reorient(out, out_affine, "LAS")
    np.testing.assert_array_equal(back, array)
    np.testing.assert_allclose(back_affine, affine, atol=1e-12)


def test_reorient_las_to_lip_is_a_flip_and_swap():
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    out, _ = reorient(array, las_affine(), "LIP")
    # LIP axis 1 = -S (LAS axis 2 reversed), axis 2 = -A (LAS axis 1 reversed).
    np.testing.assert_array_equal(out, array[:, ::-1, ::-1].transpose(0, 2, 1))


def test_reorient_rejects_a_bad_code():
    with pytest.raises(ProstlabError, match="orientation code"):
        reorient(np.zeros((2, 2, 2)), np.eye(4), "LLP")


# --- resampling ---------------------------------------------------------------------------------


def test_linear_resample_keeps_a_bright_voxel_at_its_world_position():
    # Source spacing (1, 2, 0.5) mm, cube spacing 1 mm: the bright voxel's centre is a cube voxel
    # centre, so trilinear interpolation returns its value there exactly.
    affine = las_affine(spacing=(1.0, 2.0, 0.5))
    array = np.zeros((20, 20, 40), dtype=np.float32)
    array[12, 9, 22] = 5.0
    grid = CubeGrid(centre=(10.0, 10.0, 20.0), side_mm=15.0, size=15, source_spacing=(1, 2, 0.5))
    out = resample_linear(array, grid, antialias=False)
    cube_affine = grid.affine(affine)
    np.testing.assert_allclose(spacing_of(cube_affine), (1.0, 1.0, 1.0))
    peak = np.unravel_index(np.argmax(out), out.shape)
    assert out[peak] == pytest.approx(5.0)
    np.testing.assert_allclose(world(cube_affine, peak), world(affine, (12, 9, 22)), atol=1e-9)
    # Antialiasing spreads the voxel over the coarser axis but keeps its peak in place.
    smooth = resample_linear(array, grid, antialias=True)
    assert np.unravel_index(np.argmax(smooth), smooth.shape) == peak
    assert smooth[peak] < 5.0


def test_resample_after_reorient_keeps_a_blob_centroid_in_world():
    # A smooth blob on an anisotropic LAS grid; reorient to LIP, crop to an off-centre cube and
    # resample: the intensity centroid stays at the blob's world centre.
    affine = las_affine(spacing=(0.7, 0.7, 2.5))
    shape = (60, 60, 24)
    centre_index = np.array([33.3, 25.6, 13.2])
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    sigma_mm = 4.0
    d = (idx - centre_index) * np.array([0.7, 0.7, 2.5])
    blob = np.exp(-0.5 * (d**2).sum(-1) / sigma_mm**2).astype(np.float32)
    expected = world(affine, centre_index)

    lip, lip_affine = reorient(blob, affine, "LIP")
    mask = lip > 0.5
    for antialias in (False, True):
        grid = cube_grid(lip.shape, spacing_of(lip_affine), size=24, side_mm=40.0, mask=mask)
        out = resample_linear(lip, grid, antialias=antialias)
        cube_affine = grid.affine(lip_affine)
        cube_idx = np.stack(np.meshgrid(*[np.arange(24)] * 3, indexing="ij"), -1).reshape(-1, 3)
        centroid = (cube_idx * out.reshape(-1, 1)).sum(0) / out.sum()
        np.testing.assert_allclose(world(cube_affine, centroid), expected, atol=0.05)


def test_resample_pads_outside_the_source_with_the_pad_value():
    array = np.full((4, 4, 4), 3.0, dtype=np.float32)
    grid = cube_grid(array.shape, (1.0, 1.0, 1.0), size=12, side_mm=12.0)  # 4 mm of air per side
    out = resample_linear(array, grid, pad_value=-1.0, antialias=False)
    assert out[0, 0, 0] == -1.0 and out[6, 6, 6] == 3.0
    labels = resample_nearest(np.full((4, 4, 4), 7, dtype=np.uint8), grid)
    assert labels[0, 0, 0] == 0 and labels[6, 6, 6] == 7 and labels.dtype == np.uint8
    assert (labels == 7).sum() == 4**3  # cube spacing = source spacing: every voxel once


def test_nearest_resample_creates_no_new_labels():
    rng = np.random.default_rng(1)
    labels = rng.choice(np.array([0, 3, 7, 42], dtype=np.int16), size=(17, 19, 9))
    grid = cube_grid(labels.shape, (0.7, 0.7, 2.5), size=13)
    out = resample_nearest(labels, grid)
    assert set(np.unique(out)) <= {0, 3, 7, 42}
    # Each output voxel copies the source voxel nearest to its centre.
    coords = grid.source_coords()
    n = (3, 5, 7)
    nearest = tuple(int(np.floor(coords[a][n[a]] + 0.5)) for a in range(3))
    assert out[n] == labels[nearest]


def test_default_cube_covers_the_largest_extent():
    grid = cube_grid((100, 80, 30), (0.5, 0.5, 2.0), size=64)
    assert grid.side_mm == pytest.approx(60.0) and grid.spacing == pytest.approx(60.0 / 64)
    np.testing.assert_allclose(grid.centre, (49.5, 39.5, 14.5))


# --- I/O: NIfTI and DICOM -----------------------------------------------------------------------


def test_nifti_round_trip(tmp_path):
    array = np.random.default_rng(2).random((4, 5, 6)).astype(np.float32)
    affine = las_affine()
    path = save_nifti(tmp_path / "x.nii.gz", array, affine)
    back, back_affine = load_image(path)
    np.testing.assert_array_equal(back, array)
    np.testing.assert_allclose(back_affine, affine, atol=1e-5)
    # A 4D image with a singleton last axis is squeezed.
    nib.save(nib.Nifti1Image(array[..., None], affine), str(tmp_path / "y.nii"))
    assert load_image(tmp_path / "y.nii")[0].shape == (4, 5, 6)


def write_dicom_series(directory: Path, hu: np.ndarray, origin, f_r, f_c, spacing, gap, rng):
    """Write ``hu[i, j, k]`` (column, row, slice) as one int16 CT file per slice, in random order.

    Slice k sits at ``origin + k * gap * (f_r x f_c)`` (LPS); PixelSpacing = (row, column)."""
    series = generate_uid()
    normal = np.cross(f_r, f_c)
    for n, k in enumerate(rng.permutation(hu.shape[2])):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series
        ds.Modality = "CT"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
        ds.ImageOrientationPatient = [float(v) for v in (*f_r, *f_c)]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * gap * normal]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
        stored = ((hu[:, :, k].T + 1024) / 2).astype(np.int16)  # (rows, columns)
        ds.PixelData = stored.tobytes()
        ds.save_as(directory / f"img{n:03d}.dcm", enforce_file_format=True)


def test_dicom_series_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    hu = (rng.integers(-500, 1500, size=(6, 5, 4)) * 2).astype(np.float32)  # even: exact
    # A coronal series: rows go along +x (patient left), columns down (-z), slices towards +y.
    f_r, f_c = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0])
    origin, spacing, gap = np.array([-30.0, 12.0, 80.0]), (0.9, 0.6), 3.0
    write_dicom_series(tmp_path, hu, origin, f_r, f_c, spacing, gap, rng)
    (tmp_path / "README.txt").write_text("not DICOM")  # skipped

    array, affine = load_image(tmp_path)
    np.testing.assert_array_equal(array, hu)
    # Independent truth: the LPS position of voxel (i, j, k), with x and y negated for RAS.
    normal = np.cross(f_r, f_c)
    for i, j, k in [(0, 0, 0), (5, 4, 3), (2, 1, 3)]:
        lps = origin + k * gap * normal + i * spacing[1] * f_r + j * spacing[0] * f_c
        np.testing.assert_allclose(world(affine, (i, j, k)), lps * [-1, -1, 1], atol=1e-6)


def test_dicom_errors_name_the_directory(tmp_path):
    with pytest.raises(ProstlabError, match="no DICOM image files"):
        load_image(tmp_path)
    rng = np.random.default_rng(4)
    hu = np.zeros((3, 3, 3), dtype=np.float32)
    write_dicom_series(tmp_path, hu, (0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1), 1.0, rng)
    moved = pydicom.dcmread(tmp_path / "img001.dcm")
    moved.ImagePositionPatient = [0.0, 0.0, 7.0]  # leaves a gap
    moved.save_as(tmp_path / "img001.dcm")
    with pytest.raises(ProstlabError, match="slice gaps vary") as err:
        load_image(tmp_path)
    assert str(tmp_path) in str(err.value)


# --- I/O errors ---------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(ProstlabError, match="no such file") as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"this is not a NIfTI file")
    with pytest.raises(ProstlabError, match="cannot read as NIfTI") as err:
        load_image(path)
    assert str(path) in str(err.value)
    other = tmp_path / "scan.mha"
    other.write_bytes(b"")
    with pytest.raises(ProstlabError, match="unknown image format") as err:
        load_image(other)
    assert str(other) in str(err.value)


def test_non_3d_image_is_rejected(tmp_path):
    path = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5), dtype=np.float32), np.eye(4)), str(path))
    with pytest.raises(ProstlabError, match="expected a 3D volume") as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_nan_voxels_are_rejected(tmp_path):
    array = np.zeros((3, 3, 3), dtype=np.float32)
    array[1, 1, 1] = np.nan
    path = save_nifti(tmp_path / "nan.nii.gz", array, np.eye(4))
    with pytest.raises(ProstlabError, match="1 voxels are NaN or infinite") as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_volume_checks_its_fields():
    v = Volume(torch.zeros(1, 2, 3, 4), (1.0, 2.0, 3.0), np.eye(4))
    assert v.shape == (1, 2, 3, 4) and v.extent_mm == (2.0, 6.0, 12.0)
    assert v.batched().shape == (1, 1, 2, 3, 4) and v.to("cpu").spacing == v.spacing
    with pytest.raises(ProstlabError, match=r"Volume.data: expected a \(C, D, H, W\)"):
        Volume(torch.zeros(2, 3, 4), (1.0, 1.0, 1.0), np.eye(4))
    with pytest.raises(ProstlabError, match="Volume.spacing"):
        Volume(torch.zeros(1, 2, 3, 4), (1.0, 0.0, 1.0), np.eye(4))


# --- labels -------------------------------------------------------------------------------------


def test_bone_presets_resolve_from_the_class_table(tmp_path):
    csv_path = tmp_path / "structures.csv"
    csv_path.write_text(STRUCTURES_CSV)
    assert bone_ids("bones", csv_path) == [25, 29, 77, 78, 92]
    assert bone_ids("pelvis", csv_path) == [25, 77, 78]
    assert bone_ids("vertebrae", csv_path) == [25, 29]
    assert bone_ids([29, 25, 29]) == [25, 29] and bone_ids("25, 77,78") == [25, 77, 78]
    with pytest.raises(ProstlabError, match="neither a preset"):
        bone_ids("femurs", csv_path)
    with pytest.raises(ProstlabError, match="structures_csv"):
        bone_ids("bones")
    with pytest.raises(ProstlabError, match="positive label ids"):
        bone_ids([0, 3])


# --- prepare on a synthetic pair ----------------------------------------------------------------


def synthetic_pair(directory: Path, shape=(40, 36, 20), spacing=(0.8, 0.8, 2.0)):
    """A LAS CT (air, a water box with an outside-FOV corner, a 'vertebra' of 1000 HU) + labels."""
    affine = las_affine(spacing)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[5:35, 6:30, 2:18] = 0.0
    hu[:4, :4, :] = -2048.0
    hu[18:24, 20:26, 6:14] = 1000.0
    labels = np.zeros(shape, dtype=np.uint8)
    labels[5:35, 6:30, 2:18] = 5  # liver
    labels[18:24, 20:26, 6:14] = 29  # vertebra L3
    ct = save_nifti(directory / "ct.nii.gz", hu, affine)
    lab = save_nifti(directory / "labels.nii.gz", labels, affine)
    (directory / "structures.csv").write_text(STRUCTURES_CSV)
    return ct, lab, affine


def test_prepare_synthetic_pair(tmp_path):
    ct, lab, affine = synthetic_pair(tmp_path)
    out = tmp_path / "prepared"
    written = prepare_ct(ct, lab, out, size=16, bones="bones", margin_mm=8.0)
    assert {"ct", "bone", "labels", "meta", "structures"} <= set(written)
    prepared = load_prepared(out)
    meta = prepared.meta

    # The bone box is 6 x 6 x 8 voxels = 4.8 x 4.8 x 16 mm; plus 2 x 8 mm margin: 32 mm cube.
    assert meta["side_mm"] == pytest.approx(32.0) and meta["spacing_mm"] == pytest.approx(2.0)
    for vol in (prepared.ct, prepared.bone):
        assert vol.shape == (1, 16, 16, 16)
        np.testing.assert_allclose(vol.spacing, (2.0, 2.0, 2.0), rtol=1e-6)
        assert orientation_of(vol.affine) == "LIP"
    assert prepared.labels.shape == (16, 16, 16)
    assert set(np.unique(prepared.labels)) <= {0, 5, 29}
    assert meta["bones"]["ids"] == [25, 29, 77, 78, 92] and meta["bones"]["ids_present"] == [29]
    assert meta["sources"]["ct"]["sha256"] == hashlib.sha256(ct.read_bytes()).hexdigest()

    # The cube is centred on the bone box, whose centre keeps its world position.
    box_centre = world(affine, (20.5, 22.5, 9.5))
    np.testing.assert_allclose(meta["centre_world_ras_mm"], box_centre, atol=1e-3)
    bone = prepared.bone.data[0].numpy()
    mu = prepared.ct.data[0].numpy()
    assert np.all(bone <= mu + 1e-7) and bone[0, 0, 0] == 0.0
    # The antialiased resampling preserves the bone's integral of mu over the volume (mm^2).
    source_mass = hu_to_mu(np.float32(1000.0)) * 6 * 6 * 8 * 0.8 * 0.8 * 2.0
    assert bone.sum() * 2.0**3 == pytest.approx(source_mass, rel=2e-2)
    # Cube voxel (8, 1, 12) samples the source around index (21.75, 11.25, 16): water only.
    assert mu[8, 1, 12] == pytest.approx(MU_WATER, rel=1e-5)


def test_prepare_centred_on_the_volume_without_labels(tmp_path):
    ct, _, affine = synthetic_pair(tmp_path)
    written = prepare_ct(ct, None, tmp_path / "p", size=8, centre="volume")
    assert set(written) == {"ct", "bone", "meta"}
    prepared = load_prepared(tmp_path / "p")
    assert prepared.labels is None and prepared.meta["bones"]["method"] == "threshold"
    # The thresholded bones are the 'vertebra' of 1000 HU, nothing else.
    assert prepared.meta["bones"]["source_voxels"] == 6 * 6 * 8
    # Default side: the volume's largest extent, max(40 x 0.8, 36 x 0.8, 20 x 2) = 40 mm.
    assert prepared.meta["side_mm"] == pytest.approx(40.0)
    np.testing.assert_allclose(
        prepared.meta["centre_world_ras_mm"], world(affine, (19.5, 17.5, 9.5)), atol=1e-3
    )
    # Outside the field of view is air, never negative.
    assert prepared.ct.data.min() >= 0.0


def test_prepare_rejects_labels_on_another_grid(tmp_path):
    ct, lab, affine = synthetic_pair(tmp_path)
    moved_affine = affine.copy()
    moved_affine[0, 3] += 1.0  # one millimetre off
    shifted = save_nifti(
        tmp_path / "shifted.nii.gz", np.zeros((40, 36, 20), np.uint8), moved_affine
    )
    with pytest.raises(ProstlabError, match="affine differs") as err:
        prepare_ct(ct, shifted, tmp_path / "p")
    assert str(shifted) in str(err.value) and str(ct) in str(err.value)
    small = save_nifti(tmp_path / "small.nii.gz", np.zeros((4, 4, 4), np.uint8), affine)
    with pytest.raises(ProstlabError, match=r"shape \(4, 4, 4\) differs") as err:
        prepare_ct(ct, small, tmp_path / "p")
    assert str(small) in str(err.value) and "(40, 36, 20)" in str(err.value)


def test_prepare_accepts_labels_stored_in_another_orientation(tmp_path):
    # The same grid, stored with other flips and axis order (as a DICOM-to-NIfTI converter might).
    ct, lab, affine = synthetic_pair(tmp_path)
    labels, _ = load_image(lab, dtype=np.uint8)
    rpi = save_nifti(tmp_path / "labels_rpi.nii.gz", *reorient(labels, affine, "RPI"))
    prepare_ct(ct, lab, tmp_path / "a", size=8, structures_csv=tmp_path / "structures.csv")
    prepare_ct(ct, rpi, tmp_path / "b", size=8, structures_csv=tmp_path / "structures.csv")
    a, b = load_prepared(tmp_path / "a"), load_prepared(tmp_path / "b")
    np.testing.assert_array_equal(a.labels, b.labels)
    torch.testing.assert_close(a.bone.data, b.bone.data)


def test_prepare_rejects_an_empty_bone_selection(tmp_path):
    ct, lab, _ = synthetic_pair(tmp_path)
    with pytest.raises(ProstlabError, match=r"none of the bone ids \[25, 77, 78\]") as err:
        prepare_ct(ct, lab, tmp_path / "p", bones="pelvis")
    assert str(lab) in str(err.value)


def test_load_prepared_names_the_bad_file(tmp_path):
    with pytest.raises(ProstlabError, match="meta.json: no such file"):
        load_prepared(tmp_path)
    ct, lab, _ = synthetic_pair(tmp_path)
    out = tmp_path / "p"
    prepare_ct(ct, lab, out, size=8)
    meta = json.loads((out / "meta.json").read_text())
    meta["size"] = 9
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ProstlabError, match=r"ct_mu.nii.gz: shape \(8, 8, 8\); expected \(9"):
        load_prepared(out)


# --- the bundled example and the shared CT ------------------------------------------------------


def test_bundled_example_loads(example_dir):
    prepared = load_prepared(example_dir)
    meta = prepared.meta
    assert prepared.ct.shape == (1, 128, 128, 128) and prepared.bone.shape == (1, 128, 128, 128)
    spacing = meta["side_mm"] / 128
    np.testing.assert_allclose(prepared.ct.spacing, (spacing,) * 3, rtol=1e-6)
    assert orientation_of(prepared.ct.affine) == "LIP"
    labels = prepared.labels
    bone = prepared.bone.data[0].numpy()
    assert bone.max() > 0 and np.isin(labels, meta["bones"]["ids"]).sum() > 1000

    # LIP anatomy: the heart (51) is on the patient's left (larger axis 0) of the spine's
    # vertebrae; C5 (46) lies above (smaller axis 1 than) L3 (29); the spine is posterior.
    def centroid(label_id):
        return np.argwhere(labels == label_id).mean(axis=0)

    heart, c7, l1 = centroid(51), centroid(44), centroid(31)
    assert heart[0] > (c7[0] + l1[0]) / 2 + 5
    assert c7[1] < l1[1]
    assert c7[2] > heart[2] and l1[2] > heart[2]


@pytest.fixture(scope="session")
def shared_prepared(shared_chest_ct, tmp_path_factory) -> Path:
    """The shared chest CT prepared like the bundled example (reads the 34 MB CT once)."""
    out = tmp_path_factory.mktemp("chest_ct_128")
    prepare_ct(
        shared_chest_ct / "ct.nii.gz",
        shared_chest_ct / "labels.nii.gz",
        out,
        size=128,
        bones="bones",
    )
    return out


def test_bundled_example_matches_the_pipeline(shared_prepared, example_dir, shared_chest_ct):
    bundled, fresh = load_prepared(example_dir), load_prepared(shared_prepared)
    sha = bundled.meta["sources"]["ct"]["sha256"]
    assert fresh.meta["sources"]["ct"]["sha256"] == sha
    np.testing.assert_allclose(bundled.ct.affine, fresh.ct.affine, atol=1e-6)
    torch.testing.assert_close(bundled.ct.data, fresh.ct.data, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(bundled.bone.data, fresh.bone.data, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(bundled.labels, fresh.labels)
