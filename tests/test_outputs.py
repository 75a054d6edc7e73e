"""Output files and folders (prostlab.outputs): atomic writes, writable folders, run folders."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from prostlab.errors import ProstlabError
from prostlab.outputs import (
    LOCK,
    MANIFEST,
    atomic_path,
    check_writable_dir,
    claim_latest,
    exclusive_folder,
    fresh_output_dir,
    new_run_dir,
    output_folder,
    point_latest,
    record_outputs,
    write_text,
)


def test_atomic_path_replaces_whole_or_leaves_the_old_file(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary left
    write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_atomic_path_keeps_the_suffix_for_format_sniffing_writers(tmp_path):
    with atomic_path(tmp_path / "ct_mu.nii.gz") as tmp:
        assert tmp.name.endswith(".ct_mu.nii.gz") and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert (tmp_path / "ct_mu.nii.gz").read_bytes() == b"x"


def test_a_file_or_a_path_below_a_file_is_not_a_writable_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ProstlabError, match="a_file: is an existing file"):
        check_writable_dir(blocker)
    with pytest.raises(ProstlabError, match="a_file/sub: cannot write there"):
        check_writable_dir(blocker / "sub")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(ProstlabError, match="ro: cannot write there"):
            check_writable_dir(folder)
    finally:
        folder.chmod(0o700)


def test_fresh_output_dir_refuses_a_non_empty_folder_without_overwrite(tmp_path):
    out = tmp_path / "out"
    assert fresh_output_dir(out).is_dir()  # new: created
    assert fresh_output_dir(out) == out  # empty: fine
    (out / "drr_000.png").write_text("earlier result")
    with pytest.raises(ProstlabError, match=r"out: is not empty; pass --overwrite"):
        fresh_output_dir(out)
    assert fresh_output_dir(out, overwrite=True) == out
    assert (out / "drr_000.png").read_text() == "earlier result"  # overwrite itself removes nothing


def _write(folder, *names):
    for name in names:
        (folder / name).write_text("x")
    return [folder / name for name in names]


def _names(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)


def test_overwrite_removes_only_what_the_same_command_wrote_before(tmp_path):
    _write(tmp_path, "drr_for_paper.png", "notes.txt")  # the user's
    assert record_outputs(tmp_path, "render", _write(tmp_path, "drr_000.png", "drr_001.png")) == []
    assert record_outputs(tmp_path, "register", _write(tmp_path, "pose.json")) == []
    removed = record_outputs(tmp_path, "render", _write(tmp_path, "drr_000.png"), overwrite=True)
    assert removed == [tmp_path / "drr_001.png"]
    assert _names(tmp_path) == ["drr_000.png", "drr_for_paper.png", "notes.txt", "pose.json"]
    # without overwrite nothing is removed, and the earlier files stay listed
    assert record_outputs(tmp_path, "render", _write(tmp_path, "drr_005.png")) == []
    removed = record_outputs(tmp_path, "render", _write(tmp_path, "drr_000.png"), overwrite=True)
    assert removed == [tmp_path / "drr_005.png"]


def test_without_a_readable_manifest_overwrite_removes_nothing(tmp_path):
    _write(tmp_path, "drr_000.png", "drr_001.png", "drr_for_paper.png")
    assert record_outputs(tmp_path, "render", _write(tmp_path, "drr_000.png"), True) == []
    (tmp_path / MANIFEST).write_text('{"format": "prostlab-outputs/1", "written": '
                                     '{"render": ["../outside.png", ".hidden", "drr_001.png"]}}')
    (tmp_path.parent / "outside.png").write_text("x")
    _write(tmp_path, ".hidden")
    removed = record_outputs(tmp_path, "render", _write(tmp_path, "drr_000.png"), True)
    assert removed == [tmp_path / "drr_001.png"]  # plain names only, never a path or a dot file
    assert (tmp_path.parent / "outside.png").exists() and (tmp_path / ".hidden").exists()
    (tmp_path / MANIFEST).write_text("not json")
    assert record_outputs(tmp_path, "render", _write(tmp_path, "drr_000.png"), True) == []
    assert (tmp_path / "drr_for_paper.png").exists()


def test_a_folder_holding_only_the_manifest_counts_as_empty(tmp_path):
    record_outputs(tmp_path, "render", [])
    assert (tmp_path / MANIFEST).is_file()
    assert fresh_output_dir(tmp_path) == tmp_path


def test_run_folders_are_new_and_latest_points_at_the_newest(tmp_path):
    first = new_run_dir(tmp_path / "results", "demo")
    second = new_run_dir(tmp_path / "results", "demo")
    assert (first.name, second.name) == ("demo", "demo-2")
    assert point_latest(tmp_path / "results", first) == tmp_path / "results" / "latest"
    (first / "cases.csv").write_text("one")
    assert (tmp_path / "results" / "latest" / "cases.csv").read_text() == "one"
    point_latest(tmp_path / "results", second)
    assert os.readlink(tmp_path / "results" / "latest") == "demo-2"  # relative: folder can move
    stamped = new_run_dir(tmp_path / "results")
    assert stamped.name[:2] == "20" and stamped.is_dir()


def test_a_run_claims_latest_only_while_it_points_there(tmp_path, monkeypatch):
    """Two runs of one run_name at once: B replaces latest just after A's update. A names its own
    folder and says latest is B's; before, A's output said latest was its own."""
    import prostlab.outputs

    a, b = new_run_dir(tmp_path, "same"), new_run_dir(tmp_path, "same")

    def b_finishes_meanwhile(parent, run):
        link = point_latest(parent, run)
        point_latest(parent, b)
        return link

    monkeypatch.setattr(prostlab.outputs, "point_latest", b_finishes_meanwhile)
    said = claim_latest(tmp_path, a)
    assert said.startswith(f"{a}/ (") and "also" not in said
    assert f"{tmp_path / 'latest'} is not this run" in said and "now same-2/" in said
    monkeypatch.undo()
    assert claim_latest(tmp_path, b) == f"{b}/ (also {tmp_path / 'latest'}/)"
    assert os.readlink(tmp_path / "latest") == "same-2"


def test_latest_that_is_a_real_folder_is_never_replaced(tmp_path):
    (tmp_path / "latest").mkdir()
    (tmp_path / "latest" / "keep.txt").write_text("mine")
    run = new_run_dir(tmp_path, "run")
    assert point_latest(tmp_path, run) is None
    assert claim_latest(tmp_path, run) == f"{run}/"
    assert (tmp_path / "latest" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["latest", "../up", "a/b", ".hidden", ""])
def test_bad_run_names_are_refused(tmp_path, name):
    with pytest.raises(ProstlabError, match="run name"):
        new_run_dir(tmp_path, name)


def test_concurrent_runs_get_distinct_folders(tmp_path):
    got: list[Path] = []
    lock = threading.Lock()

    def take():
        folder = new_run_dir(tmp_path, "same-second")
        with lock:
            got.append(folder)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({p.name for p in got}) == 8


def _temporary(folder: Path, pid: int, age_s: float, name: str) -> Path:
    """A temporary file of the writer ``pid`` in ``folder``, last modified ``age_s`` ago."""
    path = folder / f".tmp-{pid}-0badcafe.{name}"
    path.write_text("half")
    past = time.time() - age_s
    os.utime(path, (past, past))
    return path


def _finished_pid() -> int:
    """The PID of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def _enter_last_checkpoint_folder(folder: Path) -> None:
    from prostlab.lightning.last_checkpoint import LastCheckpoint

    trainer = SimpleNamespace(callbacks=[], default_root_dir=str(folder.parent))
    LastCheckpoint(dirpath=str(folder)).setup(trainer, None, "fit")


@pytest.mark.parametrize(
    ("sub", "enter"),
    [("out", check_writable_dir),  # render, prepare, register, test's output_dir
     ("results/earlier-run", lambda folder: new_run_dir(folder.parent)),  # test's run folders
     ("checkpoints", _enter_last_checkpoint_folder)],  # fit's last.ckpt
)
def test_a_new_run_removes_stale_temporaries_and_keeps_live_ones(tmp_path, sub, enter):
    folder = tmp_path / sub
    folder.mkdir(parents=True)
    finished, live = _finished_pid(), os.getpid()
    stale = [_temporary(folder, finished, 120, "cases.csv"),  # its writer was killed
             _temporary(folder, live, 25 * 3600, "last.ckpt")]  # a day old: the PID was reused
    kept = [_temporary(folder, live, 3 * 3600, "drrs.npy"),  # its writer still runs
            _temporary(folder, finished, 5, "pose.json"),  # being written (from another machine)
            folder / ".tmp-notes.txt", folder / "cases.csv"]  # not temporaries of prostlab
    for path in kept[2:]:
        path.write_text("the user's")
    enter(folder)
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)



_HOLD = """
import sys
from prostlab.outputs import exclusive_folder
with exclusive_folder(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def _holder(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock until its stdin is closed."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX")
def test_a_second_writer_of_a_folder_is_refused_naming_the_first(tmp_path):
    """Two commands into one folder at once: the second is refused while the first holds it,
    before it checks or writes anything, and is let in once the first has ended."""
    out = tmp_path / "d"
    out.mkdir()
    holder = _holder(out)
    try:
        with pytest.raises(ProstlabError, match=rf"{out}: another prostlab process is writing "
                                                rf"there now \(pid {holder.pid}: "):
            with output_folder(out):
                pytest.fail("ran while another process held the folder")
        with pytest.raises(ProstlabError, match="another prostlab process"):  # a new folder too
            with exclusive_folder(out):
                pass
    finally:
        holder.communicate("")
    with output_folder(out) as folder:
        (folder / "drr_000.png").write_bytes(b"x")
    assert sorted(p.name for p in out.iterdir()) == ["drr_000.png"]  # the lock file is gone


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX")
def test_a_killed_writer_leaves_the_folder_free(tmp_path):
    holder = _holder(tmp_path)
    holder.kill()
    holder.wait()
    assert (tmp_path / LOCK).is_file()  # SIGKILL ran no clean-up, but the lock died with it
    with output_folder(tmp_path) as folder:  # and a folder holding only the lock is empty
        assert folder == tmp_path
    assert not (tmp_path / LOCK).exists()


def test_locks_do_not_nest_within_one_process(tmp_path):
    with exclusive_folder(tmp_path):
        with pytest.raises(ProstlabError, match=f"pid {os.getpid()}"):
            with exclusive_folder(tmp_path):
                pass
    with exclusive_folder(tmp_path):  # released on leaving the block
        pass
