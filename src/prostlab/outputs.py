"""Output files and folders: a file is written whole or not at all, and results are never
silently replaced.

Every command that writes results uses these helpers:

* :func:`atomic_path` yields a temporary name beside the target, ``.tmp-<pid>-<hex>.<name>``
  (the target's suffix is kept, so writers that pick a format from it still work); on success
  the file is renamed onto the target with :func:`os.replace`, which is atomic within one file
  system, so a reader sees the old file or the new one, never half of one. On an error the
  temporary file is removed and the target is left as it was.
* :func:`check_writable_dir` creates a folder (and its parents) and writes and removes a probe
  file in it, so an unwritable output folder is refused *before* the work starts. It also
  removes the temporary files that killed writers left there (:func:`remove_stale_temporaries`).
* :func:`fresh_output_dir` is the rule of ``prostlab render``, ``prepare`` and ``register``: the
  folder must be empty (or new) unless ``overwrite`` is set. :func:`output_folder` applies it for
  the length of a job, holding the folder's lock (:func:`exclusive_folder`) meanwhile, and
  removes the folder again if the job fails before writing into it.
* :func:`exclusive_folder` lets one prostlab process at a time write into a folder: a second
  command into it (two renders into one ``--out``, two fits sharing one ``last.ckpt``) is refused
  while the first runs, naming it, instead of both writing file by file.
* :func:`record_outputs` lists the files each command wrote in the folder's manifest,
  ``.prostlab-outputs.json``. With ``overwrite`` a command removes the files that its earlier run
  wrote there and this one did not (a ``drr_004.png`` of a longer pose list), and only those:
  files that prostlab did not write (a user's ``drr_for_paper.png``) are never removed.
* :func:`new_run_dir` and :func:`point_latest` give each ``prostlab test`` run its own folder
  ``<parent>/<name>`` (``<name>-2``, ``<name>-3``, ... when taken; created with an exclusive
  ``mkdir``, so two runs started at once get two folders) and a ``<parent>/latest`` symbolic
  link to the newest one, replaced atomically; :func:`claim_latest` says whether it is still a
  run's after the update.

Errors are :class:`~prostlab.errors.ProstlabError` naming the folder or file.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from prostlab.errors import ProstlabError

LATEST = "latest"
"""Name of the link, in a runs folder, to the newest run."""

_TMP_PREFIX = ".tmp-"
_TEMPORARY = re.compile(r"\.tmp-(\d+)-[0-9a-f]+\..+")
"""A temporary name of :func:`temporary_name`; group 1 is the writer's PID."""

QUIET_S = 60.0
"""A temporary file written to within this many seconds is never removed: a writer on another
machine that shares the folder has a PID that means nothing here, but its file keeps changing."""

STALE_AFTER_S = 24 * 3600.0
"""A temporary file untouched this long is stale even if its PID runs: the PID has been reused
(prostlab's writers move their files into place within seconds to minutes)."""

MANIFEST = ".prostlab-outputs.json"
"""Name of the file, in an output folder, that lists the files each command wrote there."""

_MANIFEST_FORMAT = "prostlab-outputs/1"

LOCK = ".prostlab-lock"
"""Name of the file, in a folder that a prostlab process writes into, that it holds locked
(:func:`exclusive_folder`); it holds the writer's PID and command line, and is removed after."""

_BOOKKEEPING = (MANIFEST, LOCK)
"""prostlab's own files in an output folder: a folder holding only these counts as empty."""


def temporary_name(path: str | Path) -> Path:
    """A temporary name beside ``path``, ``.tmp-<pid>-<hex>.<name>``, for a file written there
    and renamed onto ``path``; the PID tells :func:`remove_stale_temporaries` whose it is."""
    path = Path(path)
    return path.with_name(f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.{path.name}")


def _runs(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (on doubt, or off POSIX: yes)."""
    if os.name != "posix":  # os.kill would end the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files (:func:`temporary_name`) of killed writers from ``folder``.

    A writer killed outright (SIGKILL, power loss) leaves its ``.tmp-<pid>-<hex>.<name>``
    behind. Such a file (or link) is removed when it has not been modified for
    :data:`QUIET_S` and its PID runs no process here, or when it has not been modified for
    :data:`STALE_AFTER_S`. A live writer's file is kept: its PID runs, or it is being written.
    Returns the removed paths; a folder that cannot be listed yields none.
    """
    now, removed = time.time(), []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or entry.is_dir(follow_symlinks=False):
            continue
        with contextlib.suppress(OSError):  # gone already, or not ours to remove
            age = now - entry.stat(follow_symlinks=False).st_mtime
            if age >= STALE_AFTER_S or (age >= QUIET_S and not _runs(int(match[1]))):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` under; move it into place on success.

    Usage::

        with atomic_path(folder / "summary.json") as tmp:
            tmp.write_text(text)

    The parent folder must exist. If the block raises, or writes nothing, the temporary file is
    removed and ``path`` is untouched (an exception is re-raised; an empty block is an error).
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        if not tmp.exists():
            raise ProstlabError(f"{path}: nothing was written to its temporary file {tmp.name}")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`); return ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def check_writable_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create the folder ``path`` (with its parents) and check that files can be written in it.

    A probe file is created and removed, and so are the temporary files that killed writers
    left there (:func:`remove_stale_temporaries`). Raises ``ProstlabError`` naming the folder
    when ``path`` is an existing file, cannot be created, or is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ProstlabError(f"{what} {path}: is an existing file; expected a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = temporary_name(path / "probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ProstlabError(
            f"{what} {path}: cannot write there ({reason}); expected a writable folder"
        ) from exc
    remove_stale_temporaries(path)
    return path


def fresh_output_dir(path: str | Path, overwrite: bool = False, what: str = "--out") -> Path:
    """An output folder for one command's results: new or empty, or anything with ``overwrite``.

    Raises ``ProstlabError`` naming the folder when it is a file, is not empty and ``overwrite``
    is false, or is not writable (:func:`check_writable_dir`). Returns the folder, created.
    """
    _check_empty(Path(path), overwrite, what)
    return check_writable_dir(path, what)


def _check_empty(path: Path, overwrite: bool, what: str) -> None:
    """Refuse a folder ``path`` that holds more than prostlab's bookkeeping, unless
    ``overwrite``."""
    if path.is_dir() and not overwrite and any(p.name not in _BOOKKEEPING
                                               for p in path.iterdir()):
        raise ProstlabError(
            f"{what} {path}: is not empty; pass --overwrite to replace its results, or "
            "choose a new folder"
        )


@contextlib.contextmanager
def output_folder(path: str | Path, overwrite: bool = False, what: str = "--out") -> Iterator[Path]:
    """:func:`fresh_output_dir` for the duration of a job, with the folder's lock held
    (:func:`exclusive_folder`; the emptiness is checked after the lock is taken, so of two
    commands started into one new folder at once, one runs and the other is refused).

    If the block raises and this call created the folder, the folder is removed again when it is
    still empty, so a refused job leaves nothing behind.
    """
    path = Path(path)
    existed = path.exists()
    try:
        with exclusive_folder(check_writable_dir(path, what), what):
            _check_empty(path, overwrite, what)
            yield path
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):
                path.rmdir()  # only succeeds while empty
        raise


@contextlib.contextmanager
def exclusive_folder(folder: str | Path, what: str = "output folder") -> Iterator[Path]:
    """Hold ``folder``'s lock for the block: one prostlab process writes into a folder at a time.

    The lock is an exclusive ``flock`` of ``folder/.prostlab-lock`` (:data:`LOCK`), which holds
    the writer's PID and command line; the operating system releases it when the process ends,
    however it ends, so a killed writer never leaves the folder locked. Raises ``ProstlabError``
    naming the folder and the process that holds it when another holds it (the block does not
    run). Locks of one process do not nest: a second ``exclusive_folder`` of the same folder in
    the same process is refused too. On file systems or platforms without ``flock`` (Windows)
    the block runs without a lock.
    """
    folder = Path(folder)
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        yield folder
        return
    lock = folder / LOCK
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise ProstlabError(
                f"{what} {folder}: another prostlab process is writing there now ({holder}); "
                "expected it to be free: wait for that process to end, or choose another folder"
            ) from None
        except OSError:  # a file system without locks (some network mounts)
            os.close(fd)
            yield folder
            return
        try:  # the holder before us may have removed the file between our open and our lock
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        os.write(fd, f"pid {os.getpid()}: {command}".encode())
        yield folder
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still held, so no one takes a lock on a file being removed
        os.close(fd)


def record_outputs(
    folder: str | Path, command: str, written: list[Path], overwrite: bool = False
) -> list[Path]:
    """Record in ``folder``'s manifest that ``command`` wrote the files ``written`` there.

    With ``overwrite``, the files that the manifest lists for an earlier run of ``command`` and
    that this run did not write are removed first, so that results of two runs are not mixed;
    without it they stay listed. Only plain file names of the manifest are removed, never a file
    the manifest does not list: a folder without a manifest (or with one that cannot be read)
    loses nothing. A file now written by ``command`` is no longer listed for another command.
    The manifest is written atomically. Returns the removed paths.
    """
    folder = Path(folder)
    names = {Path(p).name for p in written}
    listed = _read_manifest(folder)
    earlier = set(listed.get(command, []))
    removed = []
    if overwrite:
        removed = _remove_listed(folder, sorted(earlier - names))
        earlier = set()
    for other in listed:
        listed[other] = sorted(set(listed[other]) - names)
    listed[command] = sorted(earlier | names)
    listed = {key: value for key, value in listed.items() if value}
    write_text(folder / MANIFEST,
               json.dumps({"format": _MANIFEST_FORMAT, "written": listed}, indent=2) + "\n")
    return removed


def remove_recorded(folder: str | Path, command: str) -> list[Path]:
    """Remove the files in ``folder`` that its manifest lists as written by ``command`` (an
    earlier run's results; never a file prostlab did not write); return the removed paths.

    They stay listed: :func:`record_outputs` updates the manifest when the new run ends.
    """
    folder = Path(folder)
    return _remove_listed(folder, _read_manifest(folder).get(command, []))


def _remove_listed(folder: Path, names: list[str]) -> list[Path]:
    """Remove the files ``folder/name`` of a manifest's ``names``; return the removed paths.

    Only plain file names are followed (no folder part, not hidden), so a manifest edited by hand
    cannot reach outside ``folder`` nor the manifest itself.
    """
    removed = []
    for name in names:
        file = folder / name
        if Path(name).name == name and not name.startswith(".") and file.is_file():
            file.unlink()
            removed.append(file)
    return removed


def _read_manifest(folder: Path) -> dict[str, list[str]]:
    """The manifest's ``{command: [file names]}``; empty when it is missing or unreadable."""
    try:
        content = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        listed = content["written"]
        if content.get("format") != _MANIFEST_FORMAT or not isinstance(listed, dict):
            return {}
        return {str(k): [str(n) for n in v] for k, v in listed.items() if isinstance(v, list)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def check_run_name(name: str, what: str = "run name") -> str:
    """Return ``name`` if it can name a run folder: letters, digits and ``._+-``, not ``latest``."""
    if not isinstance(name, str) or not _RUN_NAME.fullmatch(name) or name == LATEST:
        raise ProstlabError(
            f"{what}: {name!r}; expected a folder name of letters, digits and . _ + - "
            f"(not starting with . or -, and not {LATEST!r})"
        )
    return name


def timestamp() -> str:
    """The local time as ``YYYY-MM-DD_HH-MM-SS``, a run name that sorts by date."""
    return datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def new_run_dir(parent: str | Path, name: str | None = None, what: str = "output folder") -> Path:
    """Create and return a new, empty run folder ``parent/name`` (``name`` defaults to
    :func:`timestamp`).

    When ``parent/name`` exists, ``name-2``, ``name-3``, ... are tried: each attempt is an
    exclusive ``mkdir``, so concurrent callers never share a folder. ``parent`` is created and
    checked for writability first (:func:`check_writable_dir`), and the temporary files that
    killed runs left in its run folders are removed (:func:`remove_stale_temporaries`).
    """
    parent = check_writable_dir(parent, what)
    for earlier in parent.iterdir():
        if earlier.is_dir() and not earlier.is_symlink():
            remove_stale_temporaries(earlier)
    name = check_run_name(name if name is not None else timestamp())
    for attempt in range(1, 10_000):
        folder = parent / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise ProstlabError(
                f"{what} {folder}: cannot create it ({exc.strerror}); expected a writable folder"
            ) from exc
        return check_writable_dir(folder, what)
    raise ProstlabError(f"{what} {parent}: {name}-2 to {name}-9999 are all taken")


def point_latest(parent: str | Path, run: str | Path) -> Path | None:
    """Point the symbolic link ``parent/latest`` at the run folder ``run`` (relative link).

    The link is replaced atomically (a new link is renamed over the old one). Returns the link,
    or ``None`` when it cannot be made: the file system has no symbolic links, or ``latest`` is
    a real file or folder, which is never replaced.
    """
    parent = Path(parent)
    link = parent / LATEST
    if link.exists() and not link.is_symlink():
        return None
    tmp = temporary_name(link)
    try:
        os.symlink(Path(run).name, tmp, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return None
    return link


def claim_latest(parent: str | Path, run: str | Path) -> str:
    """Point ``parent/latest`` at the run folder ``run`` and say where its results are.

    ``run/``, followed by ``(also parent/latest/)`` only when the link points at ``run`` after
    the update: a run that finished a moment later (two runs of one ``run_name`` at once) may
    have replaced it in between, and then the text names the run the link is now, instead of
    claiming it. The link is unchanged and unnamed when :func:`point_latest` cannot make it.
    """
    run = Path(run)
    link = point_latest(parent, run)
    if link is None:
        return f"{run}/"
    try:
        now = os.readlink(link)
    except OSError:  # removed meanwhile
        now = None
    if now == run.name:
        return f"{run}/ (also {link}/)"
    return f"{run}/ ({link} is not this run: another run replaced it since, now {now}/)"


__all__ = [
    "LATEST",
    "LOCK",
    "MANIFEST",
    "atomic_path",
    "check_run_name",
    "claim_latest",
    "check_writable_dir",
    "exclusive_folder",
    "fresh_output_dir",
    "new_run_dir",
    "output_folder",
    "point_latest",
    "record_outputs",
    "remove_recorded",
    "remove_stale_temporaries",
    "temporary_name",
    "timestamp",
    "write_text",
]
