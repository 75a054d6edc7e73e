"""Output files and folders (prostlab.outputs): atomic writes, writable folders, run folders."""

import os
import threading
from pathlib import Path

import pytest

from prostlab.errors import ProstlabError
from prostlab.outputs import (
    atomic_path,
    check_writable_dir,
    fresh_output_dir,
    new_run_dir,
    point_latest,
    remove_stale,
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


def test_remove_stale_removes_only_listed_files_not_kept(tmp_path):
    for name in ("drr_000.png", "drr_001.png", "notes.txt"):
        (tmp_path / name).write_text("x")
    removed = remove_stale(tmp_path, ["drr_000.png", "drr_001.png", "drr_002.png"],
                           keep=[tmp_path / "drr_000.png"])
    assert removed == [tmp_path / "drr_001.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drr_000.png", "notes.txt"]


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


def test_latest_that_is_a_real_folder_is_never_replaced(tmp_path):
    (tmp_path / "latest").mkdir()
    (tmp_path / "latest" / "keep.txt").write_text("mine")
    assert point_latest(tmp_path, new_run_dir(tmp_path, "run")) is None
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
