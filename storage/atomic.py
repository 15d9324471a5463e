"""Atomic writes: write under a temporary name in the target's folder, then rename into place.

A reader never sees a half-written file under its final name, and a crash leaves only a
temporary file that the next write ignores. `file_lock` keeps two writers of one place apart.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(target: Path, *, overwrite: bool = False, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success rename it to `target`.

    With `overwrite=False` an existing `target` raises FileExistsError before any work and again
    at rename time (another writer may have won meanwhile). On error the temporary is removed.
    """
    target = Path(target)
    tmp = temp_dir_beside(target, overwrite=overwrite)
    work = tmp if is_dir else tmp / target.name
    try:
        yield work
        rename_into_place(work, target, overwrite=overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def temp_dir_beside(target: Path, *, overwrite: bool = False) -> Path:
    """A new empty directory `.<name>.XXXX.tmp` beside `target`: same filesystem, so renaming is atomic.

    The first half of `atomic_path`, for writes that outlive one `with` block (several processes
    filling one directory, then one of them calling `rename_into_place`).
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    chmod_as_new(tmp)  # a renamed-in directory should look like any other
    return tmp


def rename_into_place(work: Path, target: Path, *, overwrite: bool = False) -> None:
    """Rename a finished file or directory `work` to `target` (the second half of `atomic_path`)."""
    work, target = Path(work), Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists")
    if work.is_dir() and target.exists():
        # A directory cannot be renamed over a non-empty one: move the old aside first.
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, old / "x")
        os.replace(work, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, target)


def umask() -> int:
    """The process's umask (read without changing it): what a new file's mode would be masked with."""
    current = os.umask(0)
    os.umask(current)
    return current


def chmod_as_new(path: Path) -> None:
    """Give a `mkdtemp` directory (0700) the mode any new directory gets, before it is renamed into view."""
    Path(path).chmod(0o777 & ~umask())


@contextlib.contextmanager
def file_lock(path: Path, *, wait: bool = True) -> Iterator[IO[str]]:
    """Hold an exclusive OS lock on `path` (created if missing) and yield its open handle.

    An flock dies with its process, so a killed holder never leaves a stale lock. With `wait=False`
    a lock held elsewhere raises BlockingIOError at once; the handle lets the caller note who holds it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_text(target: Path, text: str, *, overwrite: bool = True) -> Path:
    with atomic_path(target, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_bytes(target: Path, data: bytes, *, overwrite: bool = True) -> Path:
    with atomic_path(target, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_json(target: Path, value: Any, *, overwrite: bool = True) -> Path:
    return write_text(target, json.dumps(value, indent=2, sort_keys=False, default=str) + "\n", overwrite=overwrite)
