"""The `prostlab` command line: render and prepare, and one-line errors with exit code 2."""

import numpy as np
import pytest

from prostlab.cli import main

SMALL = ["--height", "24", "--width", "20", "--pixel-spacing", "12", "--step", "6"]


def test_render_writes_png_and_npy(tmp_path, example_dir):
    out = tmp_path / "drr"
    code = main(
        [
            "render",
            "--volume",
            str(example_dir),
            "--pose",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "--pose",
            "0",
            "0",
            "90",
            "0",
            "0",
            "0",
            "--colorbar",
            "--out",
            str(out),
            *SMALL,
        ]
    )
    assert code == 0
    images = np.load(out / "drrs.npy")
    assert images.shape == (2, 1, 24, 20)
    assert (out / "drr_000.png").is_file() and (out / "drr_001.png").is_file()
    assert images.min() >= 0 and images.max() > 1.0  # line integrals through a chest


def test_render_reads_poses_from_csv_and_camera_from_config(tmp_path, example_dir):
    table = tmp_path / "poses.csv"
    table.write_text("rx_deg,ry_deg,rz_deg,tx_mm,ty_mm,tz_mm\n0,0,0,0,0,0\n0,0,0,30,0,0\n")
    config = tmp_path / "camera.yaml"
    config.write_text(
        "camera:\n  sdd: 1020\n  sid: 620\n  height: 16\n  width: 16\n"
        "  pixel_spacing: [20.0, 20.0]\n"
    )
    out = tmp_path / "drr"
    assert (
        main(
            [
                "render",
                "--volume",
                str(example_dir),
                "--poses",
                str(table),
                "--config",
                str(config),
                "--step",
                "6",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    images = np.load(out / "drrs.npy")
    assert images.shape == (2, 1, 16, 16)
    assert not np.allclose(images[0], images[1])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["render", "--volume", "no/such/dir.nii.gz"], "no/such/dir.nii.gz"),
        (["render", "--poses", "missing.csv"], "missing.csv"),
        (["render", "--sid", "2000"], "sid"),
        (["prepare", "--ct", "absent.nii.gz", "--out", "x"], "absent.nii.gz"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


def test_bad_pose_table_names_the_file_and_columns(tmp_path, capsys):
    table = tmp_path / "poses.csv"
    table.write_text("rx,ry\n1,2\n")
    assert main(["render", "--poses", str(table), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "poses.csv" in err and "rx_deg" in err


def test_prepare_writes_a_loadable_folder(tmp_path):
    import nibabel as nib

    from prostlab.data import load_prepared

    hu = np.full((20, 18, 16), -1000.0, dtype=np.float32)
    hu[6:14, 5:13, 4:12] = 700.0
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[6:14, 5:13, 4:12] = 3
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "labels.nii.gz")
    out = tmp_path / "prepared"
    assert (
        main(
            [
                "prepare",
                "--ct",
                str(tmp_path / "ct.nii.gz"),
                "--labels",
                str(tmp_path / "labels.nii.gz"),
                "--out",
                str(out),
                "--size",
                "16",
                "--bones",
                "3",
            ]
        )
        == 0
    )
    prepared = load_prepared(out)
    assert prepared.ct.shape == (1, 16, 16, 16)
    assert prepared.bone.data.sum() > 0
