"""`prostlab test`: the registration benchmark end to end, its outputs, and its errors."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prostlab.data.noise import poisson_noise

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def prostlab(workdir: Path, *args: str, threads: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run([sys.executable, "-m", "prostlab.cli", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=900)


def without_wall_time(path: Path) -> bytes:
    """``cases.csv`` as bytes without its ``seconds`` column (wall time, which no rerun repeats)."""
    lines = path.read_text().splitlines(keepends=True)
    column = lines[0].rstrip("\n").split(",").index("seconds")
    return "".join(",".join(c for i, c in enumerate(line.split(",")) if i != column)
                   for line in lines).encode()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny network trained for two steps, and its folder."""
    folder = tmp_path_factory.mktemp("trained")
    done = prostlab(folder, "fit", "--config", str(TINY), "--trainer.max_steps", "2",
                    "--trainer.limit_val_batches", "0", "--model.image_every_n_steps", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, folder / "checkpoints" / "runs" / "tiny" / "last.ckpt"


def read_cases(folder: Path) -> list[dict]:
    """The rows of the newest run under ``folder/results/tiny`` (through its ``latest`` link)."""
    with (folder / "results" / "tiny" / "latest" / "cases.csv").open() as f:
        return list(csv.DictReader(f))


def test_benchmark_writes_tables_figures_and_animation(trained):
    folder, checkpoint = trained
    done = prostlab(folder, "test", "--config", str(TINY), "--ckpt_path", str(checkpoint))
    assert done.returncode == 0, done.stderr[-3000:]
    out = folder / "results" / "tiny" / "latest"
    assert out.is_symlink() and (out.parent / os.readlink(out)).is_dir()
    rows = read_cases(folder)
    assert len(rows) == 4 * 2  # cases x methods
    assert [r["method"] for r in rows[:2]] == ["gradncc", "net_gradncc"]
    assert {int(r["case"]) for r in rows} == {0, 1, 2, 3}
    summary = json.loads((out / "summary.json").read_text())
    assert "gradncc" in json.dumps(summary) and "net_gradncc" in json.dumps(summary)
    # The tiny config's test patient is the bundled chest: its table is named after it.
    assert list(summary["patients"]) == ["chest_ct_128"]
    assert summary["patients"]["chest_ct_128"]["gradncc"]["n_cases"] == 4
    assert "net_gradncc" in (out / "summary.md").read_text()
    for name in ("success_vs_initial.png", "mtre_cdf.png", "overlays.png", "registration.gif"):
        assert (out / name).stat().st_size > 0, name
    assert "net_gradncc" in done.stdout  # the table is printed


def test_one_and_two_processes_give_the_same_table(trained, tmp_path):
    """Issue 22: the same table, bit for bit, whichever cases share a batch. With the cpu backend
    on one thread per process (DDP runs each of its two processes on one), every per-case sum
    is the same: the kernels' pose sums are per pose, and gradient-NCC's are per image. (The
    torch backend's chunks of samples depend on the batch, so its tables may differ by a
    rounding that a wandering registration grows to micrometres.)"""
    _, checkpoint = trained
    common = ("test", "--config", str(TINY), "--ckpt_path", str(checkpoint),
              "--model.backend", "cpu")
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    done = prostlab(one, *common, threads=1)
    assert done.returncode == 0, done.stderr[-3000:]
    done = prostlab(two, *common, "--trainer.devices", "2", "--trainer.strategy", "ddp",
                    threads=1)
    assert done.returncode == 0, done.stderr[-3000:]
    one_rows, two_rows = read_cases(one), read_cases(two)
    assert len(one_rows) == len(two_rows) == 4 * 2
    for a, b in zip(one_rows, two_rows, strict=True):
        a.pop("seconds"), b.pop("seconds")
        assert a == b


def test_two_runs_write_the_same_cases(trained, tmp_path):
    """Issue 22: two runs, same seed, same thread count (2), cpu backend: cases.csv byte for byte
    (less its wall-time column), and summary.json says what decides it."""
    quick = ["test", "--config", str(TINY), "--ckpt_path", str(trained[1]),
             "--model.backend", "cpu", "--data.test_samples", "3",
             "--model.benchmark.gif_case", "null", "--model.benchmark.overlays", "0"]
    runs = []
    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        done = prostlab(folder, *quick, threads=2)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(folder / "results" / "tiny" / "latest")
    assert len(read_cases(tmp_path / "first")) == 3 * 2
    assert without_wall_time(runs[0] / "cases.csv") == without_wall_time(runs[1] / "cases.csv")
    facts = json.loads((runs[0] / "summary.json").read_text())["meta"]["reproducibility"]
    assert facts["backend"] == "cpu" and facts["deterministic"] is True
    assert facts["torch_threads"] == 2 and facts["seed"] == 0
    assert facts["versions"]["torch"] == torch.__version__


def test_runs_into_one_output_dir_keep_their_own_folders(trained, tmp_path):
    """Two runs at once, then a third: three folders, each complete, and latest at the newest."""
    quick = ["test", "--config", str(TINY), "--ckpt_path", str(trained[1]),
             "--data.test_samples", "2",
             "--model.benchmark.max_iterations", "3", "--model.benchmark.gif_case", "null"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    runs = [subprocess.Popen([sys.executable, "-m", "prostlab.cli", *quick], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    for run in runs:
        _, err = run.communicate(timeout=900)
        assert run.returncode == 0, err[-3000:]
    done = prostlab(tmp_path, *quick, "--model.benchmark.run_name", "third")
    assert done.returncode == 0, done.stderr[-3000:]
    results = tmp_path / "results" / "tiny"
    folders = sorted(p for p in results.iterdir() if not p.is_symlink())
    assert len(folders) == 3 and results / "third" in folders
    for folder in folders:
        with (folder / "cases.csv").open() as f:
            assert len(list(csv.DictReader(f))) == 2 * 2, folder  # cases x methods
        assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]
    assert os.readlink(results / "latest") == "third"
    assert "results/tiny/third/" in done.stdout


@pytest.mark.parametrize("where", ["file", "below_file"])
def test_unwritable_output_dir_is_refused_before_registering(trained, tmp_path, where):
    (tmp_path / "taken").write_text("a file, not a folder")
    output_dir = "taken" if where == "file" else "taken/results"
    done = prostlab(tmp_path, "test", "--config", str(TINY), "--ckpt_path", str(trained[1]),
                    "--model.benchmark.output_dir", output_dir)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("prostlab test: error: model.benchmark.output_dir")
    assert output_dir in last and "Traceback" not in done.stderr
    assert "success_running" not in done.stdout  # no registration ran


def test_bad_run_name_is_refused(tmp_path):
    done = prostlab(tmp_path, "test", "--config", str(TINY),
                    "--model.benchmark.run_name", "latest")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "model.benchmark.run_name" in done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("problem", ["corrupt", "camera", "architecture"])
def test_bad_checkpoint_is_one_line_naming_the_file(trained, tmp_path, problem):
    folder, checkpoint = trained
    args = ["test", "--config", str(TINY)]
    if problem == "corrupt":
        bad = tmp_path / "corrupt.ckpt"
        bad.write_bytes(checkpoint.read_bytes()[:1000])
        args += ["--ckpt_path", str(bad)]
    elif problem == "camera":
        args += ["--ckpt_path", str(checkpoint), "--model.camera.height", "20"]
    else:
        args += ["--ckpt_path", str(checkpoint), "--model.net.embedding_dim", "12"]
    done = prostlab(tmp_path, *args)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "ckpt" in last and "Traceback" not in done.stderr
    assert {"corrupt": "not a readable checkpoint", "camera": "camera",
            "architecture": "architecture"}[problem] in last


def test_poisson_noise_is_seeded_and_scales_with_dose():
    clean = torch.full((64, 64), 2.0)
    low = poisson_noise(clean, 1e3, torch.Generator().manual_seed(0))
    high = poisson_noise(clean, 1e6, torch.Generator().manual_seed(0))
    again = poisson_noise(clean, 1e3, torch.Generator().manual_seed(0))
    assert torch.equal(low, again)
    assert abs(high.mean().item() - 2.0) < 1e-2 and abs(low.mean().item() - 2.0) < 5e-2
    assert low.std() > 5 * high.std()
    assert poisson_noise(clean, None) is clean


def test_benchmark_moving_is_each_stages_choice_unless_overridden():
    from prostlab.errors import ProstlabError
    from prostlab.lightning.benchmark import DEFAULT_METHODS, BenchmarkConfig

    assert "mncc" in DEFAULT_METHODS
    methods = {"prost": "net_gradncc", "ncc": "ncc"}
    own = BenchmarkConfig.from_config({"methods": methods}).schedules()
    assert {k: [s.moving for s in v.stages] for k, v in own.items()} == {
        "prost": [None, None], "ncc": [None]}  # net: bone, image similarities: the whole CT
    for moving in ("bone", "ct"):
        forced = BenchmarkConfig.from_config({"methods": methods, "moving": moving}).schedules()
        assert all(s.moving == moving for v in forced.values() for s in v.stages)
    with pytest.raises(ProstlabError, match="model.benchmark.moving: expected 'bone', 'ct' or"):
        BenchmarkConfig.from_config({"moving": "lungs"})
