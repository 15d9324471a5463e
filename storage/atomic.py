"""Atomic writes: write under a temporary name in the target's folder, then rename into place.

A reader never sees a half-written file under its final name, and a crash leaves only a
temporary file that the next write ignores.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; a renamed-in directory should look like any other
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


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


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
