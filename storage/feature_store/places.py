"""Where a store lives: written under a temporary name beside its target, then renamed into place.

Locally that rename is atomic (a file, or a directory for zarr); on an object store it is a copy then
delete (`fs.mv`), not atomic: a reader listing the target mid-move can see part of it.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from transfer_flow.storage.atomic import atomic_path, rename_into_place, temp_dir_beside
from transfer_flow.storage.errors import OutputExistsError, StoreError
from transfer_flow.storage.feature_store.formats import STORE_FORMATS, StoreFormat, store_format_of

StorePath = str | os.PathLike


class LocalPlace:
    """A path on this machine: the rename into place is atomic."""

    def __init__(self, path: Path):
        self.path = path
        self.uri = str(path)

    def exists(self) -> bool:
        return self.path.exists()

    def writing(self, *, overwrite: bool, is_dir: bool) -> contextlib.AbstractContextManager[Path]:
        return atomic_path(self.path, overwrite=overwrite, is_dir=is_dir)

    def temp(self, *, overwrite: bool) -> str:
        return str(temp_dir_beside(self.path, overwrite=overwrite))

    def commit(self, tmp: str, *, overwrite: bool) -> None:
        rename_into_place(Path(tmp), self.path, overwrite=overwrite)

    def discard(self, tmp: str) -> None:
        shutil.rmtree(tmp, ignore_errors=True)


class RemotePlace:
    """An fsspec URL (s3://..., needs the `s3` extra): written under a temporary prefix, then `fs.mv`-ed.

    Object stores have no rename: the move copies then deletes, so it is not atomic.
    """

    def __init__(self, url: str):
        import fsspec

        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as error:
            raise StoreError(f"Cannot open {url}: {error} (for s3:// install transfer-flow[s3])") from error
        self.root = self.root.rstrip("/")
        self.uri = url

    def exists(self) -> bool:
        return self.fs.exists(self.root)

    @contextlib.contextmanager
    def writing(self, *, overwrite: bool, is_dir: bool) -> Iterator[str]:
        tmp = self.temp(overwrite=overwrite)
        try:
            yield tmp
            self.commit(tmp, overwrite=overwrite)
        except BaseException:
            self.discard(tmp)
            raise

    def temp(self, *, overwrite: bool) -> str:
        if self.exists() and not overwrite:
            raise FileExistsError(f"{self.uri} already exists")
        parent, name = posixpath.split(self.root)
        return self.fs.unstrip_protocol(posixpath.join(parent, f".{name}.{uuid.uuid4().hex[:12]}.tmp"))

    def commit(self, tmp: str, *, overwrite: bool) -> None:
        if self.exists():
            if not overwrite:
                raise FileExistsError(f"{self.uri} already exists")
            self.fs.rm(self.root, recursive=True)
        self.fs.mv(self._path(tmp), self.root, recursive=True)

    def discard(self, tmp: str) -> None:
        if self.fs.exists(self._path(tmp)):
            self.fs.rm(self._path(tmp), recursive=True)

    def _path(self, url: str) -> str:
        return self.fs._strip_protocol(url).rstrip("/")


Place = LocalPlace | RemotePlace


def place_of(path: StorePath, store_format: StoreFormat | None = None) -> Place:
    """Where `path` is: a local path (or file:// URL), or a remote URL for a format that may live there."""
    text = os.fspath(path)
    if "://" not in text:
        return LocalPlace(Path(text))
    if text.startswith("file://"):
        import fsspec

        return LocalPlace(Path(fsspec.core.url_to_fs(text)[1]))
    store_format = store_format or store_format_of(text)
    if not store_format.remote:
        remote = ", ".join(f"{f.name} (name them *{f.suffix})" for f in STORE_FORMATS.values() if f.remote)
        raise StoreError(f"Expected a local path for an {store_format.name.upper()} feature store (remote stores "
                         f"are {remote}), got {text}")
    return RemotePlace(text)


def refuse_existing(place: Place, overwrite: bool) -> None:
    if not overwrite and place.exists():
        raise OutputExistsError(f"Feature store {place.uri} already exists (pass --overwrite to replace it)")
