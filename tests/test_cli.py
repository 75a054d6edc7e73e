"""The `prostlab` command line: render and prepare, and one-line errors with exit code 2."""

import json

import numpy as np
import pytest

from prostlab.cli import main
from prostlab.outputs import MANIFEST

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


# ---------------------------------------------------------------- output folders (issue 11)


def _mu_nifti(path, value=0.02, shape=(16, 16, 16), spacing=4.0):
    """A small NIfTI of attenuation (1/mm): a cube of ``value`` in air."""
    import nibabel as nib

    mu = np.zeros(shape, dtype=np.float32)
    mu[4:12, 4:12, 4:12] = value
    nib.save(nib.Nifti1Image(mu, np.diag([spacing] * 3 + [1.0])), path)
    return path


def _ct_nifti(folder, slice_mm=2.0, labels=True):
    """A small CT in HU (a bright block in air) and its label map (id 3) in ``folder``."""
    import nibabel as nib

    hu = np.full((20, 18, 16), -1000.0, dtype=np.float32)
    hu[6:14, 5:13, 4:12] = 700.0
    affine = np.diag([1.5, 1.5, slice_mm, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), folder / "ct.nii.gz")
    if labels:
        ids = np.zeros(hu.shape, dtype=np.uint8)
        ids[6:14, 5:13, 4:12] = 3
        nib.save(nib.Nifti1Image(ids, affine), folder / "labels.nii.gz")
    return folder / "ct.nii.gz", folder / "labels.nii.gz"


def _render(tmp_path, out, *extra):
    volume = _mu_nifti(tmp_path / "mu.nii.gz")
    return main(["render", "--volume", str(volume), "--out", str(out), *SMALL, *extra])


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_render_refuses_a_non_empty_folder_and_overwrite_replaces_stale_drrs(tmp_path, capsys):
    out = tmp_path / "drr"
    assert _render(tmp_path, out, "--pose", *["0"] * 6, "--pose", *["0"] * 5, "30") == 0
    assert _names(out) == ["drr_000.png", "drr_001.png", "drrs.npy"]
    before = (out / "drrs.npy").read_bytes()
    assert _render(tmp_path, out) == 2
    err = _error(capsys)
    assert str(out) in err and "--overwrite" in err
    assert (out / "drrs.npy").read_bytes() == before  # nothing replaced
    assert _render(tmp_path, out, "--overwrite") == 0
    assert _names(out) == ["drr_000.png", "drrs.npy"]  # no stale 001
    assert np.load(out / "drrs.npy").shape[0] == 1


def _names(folder):
    """The files in ``folder`` but prostlab's manifest of what it wrote there."""
    return sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)


def test_render_overwrite_keeps_files_that_prostlab_did_not_write(tmp_path, capsys):
    out = tmp_path / "drr"
    out.mkdir()
    (out / "drr_for_paper.png").write_bytes(b"the user's figure")
    assert _render(tmp_path, out, "--overwrite") == 0  # a folder prostlab never wrote to
    assert _render(tmp_path, out, "--pose", *["0"] * 6, "--pose", *["0"] * 5, "30",
                   "--overwrite") == 0
    assert _render(tmp_path, out, "--overwrite") == 0
    assert _names(out) == ["drr_000.png", "drr_for_paper.png", "drrs.npy"]
    assert (out / "drr_for_paper.png").read_bytes() == b"the user's figure"


@pytest.mark.parametrize("command", ["render", "prepare"])
@pytest.mark.parametrize("where", ["file", "below_file"])
def test_out_that_is_a_file_or_unwritable_is_one_line(tmp_path, capsys, command, where):
    (tmp_path / "taken").write_text("a file")
    out = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "sub"
    if command == "render":
        code = _render(tmp_path, out)
    else:
        ct, _ = _ct_nifti(tmp_path, labels=False)
        code = main(["prepare", "--ct", str(ct), "--out", str(out), "--size", "8"])
    assert code == 2
    err = _error(capsys)
    assert str(out) in err and ("existing file" in err or "cannot write" in err)
    assert (tmp_path / "taken").read_text() == "a file"


def test_prepare_refuses_a_non_empty_folder_and_overwrite_removes_stale_files(tmp_path, capsys):
    ct, labels = _ct_nifti(tmp_path)
    out = tmp_path / "prepared"
    args = ["prepare", "--ct", str(ct), "--out", str(out), "--size", "8"]
    assert main([*args, "--labels", str(labels), "--bones", "3"]) == 0
    assert (out / "labels.nii.gz").is_file()
    assert main(args) == 2
    assert str(out) in _error(capsys)
    assert main([*args, "--overwrite"]) == 0
    names = _names(out)
    # The earlier labels are gone; the bones are now the CT's own, by threshold.
    assert names == ["bone_mu.nii.gz", "ct_mu.nii.gz", "meta.json"]
    assert json.loads((out / "meta.json").read_text())["bones"]["method"] == "threshold"


def test_prepare_into_the_inputs_folder_never_replaces_an_input(tmp_path, capsys):
    ct, labels = _ct_nifti(tmp_path)
    (tmp_path / "structures.csv").write_text("id,name,group\n3,block,bones\n")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for extra in ([], ["--overwrite"]):
        assert main(["prepare", "--ct", str(ct), "--labels", str(labels), "--bones", "3",
                     "--out", str(tmp_path), "--size", "8", *extra]) == 2
        err = _error(capsys)
        assert str(labels) in err and "would replace the input" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written
    # Without labels nothing of the folder is an output: the user's labels stay.
    assert main(["prepare", "--ct", str(ct), "--out", str(tmp_path), "--size", "8",
                 "--overwrite"]) == 0
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert (tmp_path / "ct_mu.nii.gz").is_file()


def test_a_refused_job_leaves_no_new_output_folder(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["render", "--volume", str(tmp_path / "absent.nii.gz"), "--out", str(out)]) == 2
    assert not out.exists()


# ---------------------------------------------------------------- input values (issue 11)


@pytest.mark.parametrize("mu_water", ["nan", "-0.02", "0", "inf"])
def test_prepare_refuses_non_finite_or_non_positive_mu_water(tmp_path, capsys, mu_water):
    ct, _ = _ct_nifti(tmp_path, labels=False)
    out = tmp_path / "prepared"
    assert main(["prepare", "--ct", str(ct), "--out", str(out), "--size", "8",
                 "--mu-water", mu_water]) == 2
    assert "mu_water" in _error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("mu_water", [float("nan"), -0.02, 0.0])
def test_library_refuses_bad_mu_water(tmp_path, mu_water):
    from prostlab.data import hu_to_mu, prepare_ct
    from prostlab.errors import ProstlabError

    with pytest.raises(ProstlabError, match="mu_water"):
        hu_to_mu(np.zeros(3), mu_water=mu_water)
    ct, _ = _ct_nifti(tmp_path, labels=False)
    with pytest.raises(ProstlabError, match="mu_water"):
        prepare_ct(ct, None, tmp_path / "out", size=8, mu_water=mu_water)


@pytest.mark.parametrize("mu_water", ["1e9", "0.27"])
def test_prepare_refuses_mu_water_far_above_waters(tmp_path, capsys, mu_water):
    """1e9 /mm wrote bone volumes of 2e9 /mm that render refuses; 0.27 is water in 1/cm
    (probe p27)."""
    ct, _ = _ct_nifti(tmp_path, labels=False)
    out = tmp_path / "prepared"
    assert main(["prepare", "--ct", str(ct), "--out", str(out), "--size", "8",
                 "--mu-water", mu_water]) == 2
    assert f"mu_water: {float(mu_water)!r}" in _error(capsys)
    assert not out.exists()


def test_render_refuses_which_bone_of_a_nifti(tmp_path, capsys):
    """A NIfTI volume has no bones apart: --which bone was ignored and the whole volume rendered
    (probe r49)."""
    out = tmp_path / "drr"
    assert _render(tmp_path, out, "--which", "bone") == 2
    assert "--which bone: " in _error(capsys)
    assert not out.exists()


def test_render_refuses_a_volume_in_hounsfield_units(tmp_path, capsys):
    import nibabel as nib

    hu = np.full((16, 16, 16), -1000.0, dtype=np.float32)
    hu[4:12, 4:12, 4:12] = 400.0
    nib.save(nib.Nifti1Image(hu, np.diag([4.0, 4.0, 4.0, 1.0])), tmp_path / "ct_hu.nii.gz")
    out = tmp_path / "drr"
    assert main(["render", "--volume", str(tmp_path / "ct_hu.nii.gz"), "--out", str(out),
                 *SMALL]) == 2
    err = _error(capsys)
    assert "ct_hu.nii.gz" in err and "Hounsfield" in err and "prostlab prepare" in err
    assert not out.exists()


def test_prepare_refuses_slices_of_500_mm(tmp_path, capsys):
    ct, labels = _ct_nifti(tmp_path, slice_mm=500.0)
    assert main(["prepare", "--ct", str(ct), "--labels", str(labels), "--bones", "3",
                 "--out", str(tmp_path / "prepared"), "--size", "16"]) == 2
    err = _error(capsys)
    assert "ct.nii.gz" in err and "voxel spacing" in err and "500" in err


def test_prepare_refuses_a_cube_in_which_the_bones_vanish(tmp_path, capsys):
    ct, labels = _ct_nifti(tmp_path)
    assert main(["prepare", "--ct", str(ct), "--labels", str(labels), "--bones", "3",
                 "--out", str(tmp_path / "prepared"), "--size", "8", "--side-mm", "5000"]) == 2
    err = _error(capsys)
    assert "labels.nii.gz" in err and "vanish" in err
    assert not (tmp_path / "prepared").exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--step", "1e-6"], "samples along a ray"),
        (["--batch-size", "0"], "batch_size"),
        (["--batch-size", "-3"], "batch_size"),
        (["--device", "gpu"], "not a torch device"),
        (["--device", "meta"], "not supported"),
        (["--height", "200000", "--width", "200000"], "needs about"),
        (["--height", "1"], "(--height, --width, or the config's camera): 1 x 20; expected at "
                            "least 8 pixels a side"),
        (["--pixel-spacing", "0.001", "12"], "(--pixel-spacing, or the config's camera): 0.001, "
                                             "12 mm; expected at least 0.01 mm"),
        # register's bound on an X-ray's camera; rendered without a word (probe r25)
        (["--sdd", "1e9", "--sid", "620"], "sdd (--sdd, or the config's camera): 1e+09 mm; "
                                           "expected the source-to-detector distance in mm "
                                           "within [100, 3000]"),
    ],
)
def test_render_refuses_bad_values_before_rendering(tmp_path, capsys, extra, needle):
    out = tmp_path / "drr"
    assert _render(tmp_path, out, *extra) == 2
    err = _error(capsys)
    assert err.startswith("prostlab render: error:") and needle in err
    assert not out.exists()


def test_render_refuses_cuda_without_cuda(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _render(tmp_path, tmp_path / "drr", "--device", "cuda:0") == 2
    err = _error(capsys)
    assert "cuda:0" in err and "CUDA" in err


def test_render_refuses_a_cuda_index_past_the_device_count(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _render(tmp_path, tmp_path / "drr", "--device", "cuda:3") == 2
    assert "1 CUDA device" in _error(capsys)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--size", "1"], "size (--size): 1; expected at least 8 voxels a side"),
        (["--size", "16", "--side-mm", "0.001"], "(--side-mm 0.001 / --size 16): 6.25e-05 mm; "
                                                 "expected at least 0.01 mm"),
        (["--margin-mm", "-5"], "margin_mm (--margin-mm): -5; expected a finite margin >= 0"),
        (["--margin-mm", "nan"], "margin_mm (--margin-mm): nan; expected a finite margin >= 0"),
    ],
)
def test_prepare_refuses_a_cube_too_coarse_or_fine_to_hold_anatomy(tmp_path, capsys, extra,
                                                                     needle):
    """``--size 1`` and ``--side-mm 0.001`` were prepared without a word."""
    ct, _ = _ct_nifti(tmp_path, labels=False)
    out = tmp_path / "prepared"
    assert main(["prepare", "--ct", str(ct), "--out", str(out), *extra]) == 2
    err = _error(capsys)
    assert err.startswith("prostlab prepare: error:") and needle in err
    assert not out.exists()


def test_prepare_refuses_a_size_that_cannot_fit_in_memory(tmp_path, capsys):
    ct, _ = _ct_nifti(tmp_path, labels=False)
    out = tmp_path / "prepared"
    assert main(["prepare", "--ct", str(ct), "--out", str(out), "--size", "100000"]) == 2
    err = _error(capsys)
    assert "size 100000" in err and "needs about" in err and "available" in err
    assert not out.exists()


@pytest.fixture
def interruptible():
    """SIGINT raises KeyboardInterrupt during the test, as in a terminal, also where the test run
    was started in the background (a shell starts background jobs with SIGINT ignored, and
    Python keeps a signal that it finds ignored)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _signal_now(signum):
    """A stand-in for a command's long step: the signal arrives while it runs."""
    import os

    def step(*_args, **_kwargs):
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal did not stop the command")

    return step


@pytest.mark.parametrize("signum", [2, 15])
@pytest.mark.parametrize("command", ["render", "prepare", "register"])
def test_a_signal_stops_a_command_with_128_plus_its_number_and_no_traceback(
        tmp_path, capsys, monkeypatch, command, signum, interruptible):
    """SIGINT printed a 30-line KeyboardInterrupt; SIGTERM ended the process where it stood."""
    import prostlab.data
    import prostlab.render
    import prostlab.xray.register
    from prostlab.data import example_path

    stop = _signal_now(signum)
    out = tmp_path / "out"
    if command == "render":
        monkeypatch.setattr(prostlab.render, "render_poses", stop)
        args = ["render", "--volume", str(_mu_nifti(tmp_path / "mu.nii.gz")), *SMALL]
    elif command == "prepare":
        monkeypatch.setattr(prostlab.data, "prepare_ct", stop)
        args = ["prepare", "--ct", str(_ct_nifti(tmp_path, labels=False)[0]), "--size", "8"]
    else:
        monkeypatch.setattr(prostlab.xray.register, "prepare_problem", stop)
        args = ["register", "--xray", str(tmp_path / "x.png"), "--ct", str(example_path())]
    assert main([*args, "--out", str(out)]) == 128 + signum
    err = _error(capsys)
    assert err.startswith(f"prostlab {command}: stopped by SIG{'INT' if signum == 2 else 'TERM'}")
    assert not out.exists()


def test_a_stopped_register_overwrite_leaves_no_earlier_pose(tmp_path, capsys, monkeypatch):
    """A killed `register --overwrite` left the earlier pose.json, which looked current, and its
    images, which a new pose.json written before the kill sat beside: they are removed once the
    inputs are checked; a file prostlab did not write stays."""
    import prostlab.xray.register
    from prostlab.data import example_path
    from prostlab.outputs import record_outputs

    out = tmp_path / "reg"
    out.mkdir()
    earlier = [out / name for name in ("pose.json", "overlay.png", "drr.png")]
    for path in earlier:
        path.write_text("the earlier run's")
    (out / "notes.txt").write_text("mine")
    record_outputs(out, "register", earlier)

    class Problem:
        notes: list = []

    monkeypatch.setattr(prostlab.xray.register, "prepare_problem", lambda _settings: Problem())
    monkeypatch.setattr(prostlab.xray.register, "run", _signal_now(15))
    assert main(["register", "--xray", str(tmp_path / "x.png"), "--ct", str(example_path()),
                 "--out", str(out), "--overwrite"]) == 143
    assert not any(path.exists() for path in earlier)
    assert (out / "notes.txt").read_text() == "mine"


def test_ctrl_c_around_a_lightning_command_exits_130_without_a_traceback(capsys, monkeypatch,
                                                                        interruptible):
    """Lightning handles Ctrl-C inside its loops; one outside them (setup, the benchmark's
    summary) printed a KeyboardInterrupt traceback."""
    import prostlab.lightning.cli

    monkeypatch.setattr(prostlab.lightning.cli, "run_lightning", _signal_now(2))
    assert main(["test", "--config", "tiny"]) == 130
    assert _error(capsys).startswith("prostlab test: stopped by SIGINT")


def test_ctrl_c_while_a_lightning_command_imports_exits_130_without_a_traceback(
        capsys, monkeypatch, interruptible):
    """torch and Lightning take seconds to import, and their import was outside the command's
    handling: a Ctrl-C meanwhile printed a KeyboardInterrupt traceback (probe s10)."""
    import sys
    import types

    class Importing(types.ModuleType):
        def __getattr__(self, name):
            if name != "run_lightning":
                raise AttributeError(name)
            _signal_now(2)()

    monkeypatch.setitem(sys.modules, "prostlab.lightning.cli", Importing("prostlab.lightning.cli"))
    try:
        code = main(["fit", "--config", "tiny"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C during the imports escaped as a KeyboardInterrupt traceback")
    assert code == 130
    assert _error(capsys).startswith("prostlab fit: stopped by SIGINT")


def test_ctrl_c_inside_lightnings_loops_exits_130(tmp_path, capsys, monkeypatch, interruptible):
    """Lightning answers a Ctrl-C inside its loops with sys.exit(1), a failure's status; the
    command exits 130 as every other command does on Ctrl-C (probes s08, s12)."""
    import pytorch_lightning as pl

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pl.Trainer, "_run", _signal_now(2))
    try:
        code = main(["validate", "--config", "tiny", "--trainer.logger", "false"])
    except SystemExit as stop:
        code = stop.code
    assert code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "prostlab validate: stopped by SIGINT" in err, err[-2000:]


def test_prepare_refuses_a_ct_stored_with_an_offset_or_scaled_attenuation(tmp_path, capsys):
    """A +1024 offset (air at +24) made air 0.011/mm; an attenuation volume times 1e4 likewise
    passed the span check. Both are refused naming the file and where air should be."""
    import nibabel as nib

    ct, _ = _ct_nifti(tmp_path, labels=False)
    image = nib.load(ct)
    hu = np.asarray(image.dataobj, dtype=np.float32)
    hu[hu > 0] = 1500.0  # dense bone, so that the scaled volume spans more than 500
    mu_times_1e4 = (1 + hu / 1000) * 268.3  # air 0, water 268, this bone 671
    for name, values in (("offset.nii.gz", hu + 1024), ("scaled.nii.gz", mu_times_1e4)):
        path = tmp_path / name
        nib.save(nib.Nifti1Image(values, image.affine), path)
        out = tmp_path / f"prepared-{name}"
        assert main(["prepare", "--ct", str(path), "--out", str(out), "--size", "8"]) == 2
        err = _error(capsys)
        assert f"{path}: its lowest values" in err and "expected air near -1000 HU" in err
        assert not out.exists()


@pytest.mark.parametrize("scale", ["offset", "integers"])
def test_render_refuses_attenuation_far_above_bone(tmp_path, capsys, scale):
    """A CT with a +1024 offset is never negative, so MIN_MU let it through to DRRs near 1e5;
    attenuation scaled to integers likewise."""
    import nibabel as nib

    mu = np.full((16, 16, 16), 24.0 if scale == "offset" else 0.0, dtype=np.float32)
    mu[4:12, 4:12, 4:12] = 1424.0 if scale == "offset" else 50.0
    path = tmp_path / "volume.nii.gz"
    nib.save(nib.Nifti1Image(mu, np.diag([4.0, 4.0, 4.0, 1.0])), path)
    out = tmp_path / "drr"
    assert main(["render", "--volume", str(path), "--out", str(out), *SMALL]) == 2
    err = _error(capsys)
    assert f"{path}: has attenuation up to" in err and "expected mu in 1/mm, at most 1" in err
    assert not out.exists()


# --------------------------------------- render and register take the same flags (issue 19)


def test_render_and_register_offer_every_projector_backend(tmp_path):
    """``render --backend`` lacked ``cpu``, the compiled kernels that ``register`` and the
    configs accept: both commands offer the projector's own list, and ``cpu`` renders the DRRs
    that torch renders."""
    from prostlab.backend_names import BACKENDS
    from prostlab.cli import _parser
    from prostlab.projector.backends.cpu_kernels import cpu_kernels_available

    register = ["register", "--xray", "x.dcm", "--ct", "ct", "--out", "reg"]
    for command in (["render"], register):
        assert [_parser().parse_args([*command, "--backend", b]).backend
                for b in BACKENDS] == list(BACKENDS)
    if not cpu_kernels_available():
        pytest.skip("the cpu kernels do not build here")
    assert _render(tmp_path, tmp_path / "cpu", "--backend", "cpu") == 0
    assert _render(tmp_path, tmp_path / "torch", "--backend", "torch") == 0
    np.testing.assert_allclose(np.load(tmp_path / "cpu" / "drrs.npy"),
                               np.load(tmp_path / "torch" / "drrs.npy"), rtol=1e-4, atol=1e-4)


def test_render_and_register_take_one_pixel_spacing_or_two(tmp_path, capsys):
    """``render --pixel-spacing`` took one value and ``register``'s two: both take one (square
    pixels) or two (rows, columns), by one parser, and refuse three."""
    from prostlab.cli import _parser

    register = ["register", "--xray", "x.dcm", "--ct", "ct", "--out", "reg"]
    for command in (["render"], register):
        for values, pair in ((["0.5"], (0.5, 0.5)), (["0.5", "0.25"], (0.5, 0.25))):
            assert _parser().parse_args([*command, "--pixel-spacing", *values]).pixel_spacing \
                == pair
        with pytest.raises(SystemExit) as exit_info:
            _parser().parse_args([*command, "--pixel-spacing", "1", "2", "3"])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"prostlab {command[0]}: error: argument --pixel-spacing: expected one value in mm "
            "(square pixels) or two (ROW_MM COLUMN_MM), got 3")
    assert _render(tmp_path, tmp_path / "drr", "--pixel-spacing", "12", "6") == 0
    rectangular = np.load(tmp_path / "drr" / "drrs.npy")
    assert _render(tmp_path, tmp_path / "drr", "--overwrite") == 0  # SMALL's 12 mm square pixels
    assert not np.allclose(rectangular, np.load(tmp_path / "drr" / "drrs.npy"))


def test_render_refuses_poses_outside_the_beam_and_names_blank_drrs(tmp_path, capsys):
    """A pose 1e9 mm away rendered a blank image without a word. A centre outside the beam is
    refused as ``register --init`` is; a centre in the beam whose volume misses the detector
    gives a blank DRR: refused when every DRR is, named in a warning otherwise."""
    out = tmp_path / "drr"
    assert _render(tmp_path, out, "--pose", "0", "0", "0", "1e9", "0", "0") == 2
    assert ("--pose: translation (1e+09, 0, 0) mm puts the volume's centre outside the beam"
            in _error(capsys))
    table = tmp_path / "poses.csv"
    table.write_text("rx_deg,ry_deg,rz_deg,tx_mm,ty_mm,tz_mm\n0,0,0,0,0,0\n0,0,0,0,0,1e9\n")
    assert _render(tmp_path, out, "--poses", str(table)) == 2
    assert f"{table}: pose 2: translation (0, 0, 1e+09) mm" in _error(capsys)
    beside = ["--pose", "0", "0", "0", "200", "0", "0"]  # in the 240 mm wide beam, 329 mm off
    assert _render(tmp_path, out, *beside) == 2
    assert "--pose: every DRR is blank (1 of 1)" in _error(capsys)
    assert not out.exists()
    assert _render(tmp_path, out, "--pose", *["0"] * 6, *beside) == 0
    assert ("prostlab render: WARNING: --pose 2: blank DRR (drr_001.png; 1 of 2)"
            in capsys.readouterr().err)


def test_render_warns_when_the_beam_cuts_the_volume(tmp_path, capsys):
    """``--sid 1019.9 --sdd 1020`` put the isocentre 0.1 mm before the detector: half the volume
    lay past it and was missing from the DRR, without a word (probe r54). Now a warning names
    the pose and the depth; a pose whose box lies between source and detector gets none."""
    out = tmp_path / "drr"
    assert _render(tmp_path, out, "--sdd", "1020", "--sid", "1019.9") == 0
    err = capsys.readouterr().err
    # the 16^3 fixture at 4 mm: the projector's support reaches (16 + 1) / 2 * 4 = 34 mm along
    # the beam, 33.9 mm past the detector 0.1 mm beyond the isocentre
    assert "prostlab render: WARNING: --pose 1: the volume's box reaches up to 33.9 mm" in err, err
    assert "past the detector (sid 1019.9, sdd 1020 mm)" in err
    assert _render(tmp_path, out, "--overwrite") == 0
    assert "WARNING" not in capsys.readouterr().err
