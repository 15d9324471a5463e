"""Feature stores: rows of features with their labels, paths, split and content hashes, behind one interface.

Two backends, chosen by the store's name (`backend_of`): a path or URL ending in `.zarr` is a zarr v3
group, anything else one HDF5 file. Both hold the same arrays: `features` (rows x dim, float32 or
float16, chunks of `rows_per_chunk` rows), `labels` (int64), `label_names`, `paths`, `split`, `hashes`
(strings), and the same attributes (scalars as they are, anything nested as JSON text), so
`open_store(...)` describes either identically and `read_features` always returns float32.

HDF5 keeps the classic layout (`features`, `labels`, `label_names`) that the classic recipe's training
step reads unchanged. Zarr reads with `dask.array.from_zarr(path, component="features")` and, through
fsspec, lives on object stores (`s3://bucket/x.zarr` with the `s3` extra installed; credentials as
s3fs finds them in the environment).

Writing: a store is written under a temporary name beside its target and renamed into place only when
complete, so a reader never sees half a store. Locally that rename is atomic (a file, or a directory
for zarr); on an object store it is a copy then delete (`fs.mv`), not atomic: a reader listing the
target mid-move can see part of it.

- One writer appending batches: `create_store(...)` (both backends).
- Several processes writing disjoint row ranges of one store, without locks (zarr only; HDF5 has a
  single writer): `preallocate_zarr_store` once, `write_rows` from each worker at starts aligned to the
  row chunk (every array shares that row chunking, so two ranges never write the same chunk file),
  then `commit_store` once, which refuses a store with rows never written.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import posixpath
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import h5py
import numpy as np
from pydantic import BaseModel, Field

from transfer_flow.storage.atomic import atomic_path, rename_into_place, temp_dir_beside
from transfer_flow.storage.content_keys import content_key, package_version
from transfer_flow.storage.errors import OutputExistsError, StoreError

TARGET_CHUNK_BYTES = 1 << 20  # ~1 MiB row chunks: h5py's advice for chunk size, whatever the feature width
FEATURE_DTYPES = ("float32", "float16")  # float16 halves the bytes; reads come back as float32 either way
STRING_COLUMNS = ("paths", "split", "hashes")
ROW_COLUMNS = ("features", "labels", *STRING_COLUMNS)  # one entry per row, all grown and written together
UNWRITTEN_LABEL = -1  # fill value of zarr `labels`: a preallocated row nobody wrote is visible as such

Backend = Literal["hdf5", "zarr"]
StorePath = str | os.PathLike


class FeatureStore(BaseModel):
    """A complete feature store on disk: the box the training stage reads."""

    path: str
    n_rows: int
    feature_dim: int
    label_names: list[str]
    attrs: dict[str, Any] = Field(default_factory=dict)

    def fingerprint(self) -> str:
        """Identifies the rows by content: the extraction settings and the manifest they came from."""
        return content_key(self.attrs.get("extraction_key"), self.attrs.get("manifest_fingerprint"), self.n_rows,
                           self.feature_dim, self.label_names)


class StoreContents(BaseModel, arbitrary_types_allowed=True):
    """Arrays read back from a store (features loaded only when asked)."""

    labels: np.ndarray
    label_names: list[str]
    paths: list[str]
    split: list[str]
    hashes: list[str]
    attrs: dict[str, Any]


def rows_per_chunk(feature_dim: int, dtype: np.dtype = np.dtype(np.float32)) -> int:
    return max(1, TARGET_CHUNK_BYTES // (feature_dim * np.dtype(dtype).itemsize))


# --- Inputs, parsed once, the same for every backend -------------------------------------------------------


def backend_of(path: StorePath) -> Backend:
    """`zarr` for a path or URL ending in `.zarr`, else `hdf5`."""
    return "zarr" if os.fspath(path).rstrip("/").endswith(".zarr") else "hdf5"


def parse_feature_dtype(dtype: Any) -> np.dtype:
    try:
        parsed = np.dtype(dtype)
    except TypeError:
        parsed = None
    if parsed is None or parsed.name not in FEATURE_DTYPES:
        raise StoreError(f"Expected a feature dtype in {FEATURE_DTYPES}, got {dtype!r}")
    return parsed


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a batch of rows must fit: the store's width, feature dtype and number of classes."""

    feature_dim: int
    dtype: np.dtype
    n_labels: int


@dataclasses.dataclass(frozen=True)
class Rows:
    """One batch of rows, checked: equal lengths, the store's width, labels that name a class."""

    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    split: list[str]
    hashes: list[str]

    @property
    def n(self) -> int:
        return len(self.features)

    def columns(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ROW_COLUMNS}


def parse_rows(features: np.ndarray, labels: np.ndarray, paths: Sequence[str], split: Sequence[str],
               hashes: Sequence[str] | None, layout: Layout) -> Rows:
    """Check a batch; features come back in the store's dtype, rounded by numpy (round to nearest even):
    HDF5's own float32 -> float16 conversion was seen to turn -0.9999962 into -0.5 in a chunked write."""
    features = np.asarray(features)
    labels = np.asarray(labels)
    n = len(features)
    hashes = [""] * n if hashes is None else hashes
    if not (n == len(labels) == len(paths) == len(split) == len(hashes)):
        raise StoreError(f"Expected equal row counts, got {n} features, {len(labels)} labels, "
                         f"{len(paths)} paths, {len(split)} split values, {len(hashes)} hashes")
    if features.ndim != 2 or features.shape[1] != layout.feature_dim:
        raise StoreError(f"Expected features of shape (rows, {layout.feature_dim}), got {features.shape}")
    if n and labels.dtype.kind not in "iu":
        raise StoreError(f"Expected integer labels, got dtype {labels.dtype}")
    if n and (labels.min() < 0 or labels.max() >= layout.n_labels):
        raise StoreError(f"Expected labels in 0..{layout.n_labels - 1}, got {labels.min()}..{labels.max()}")
    return Rows(features.astype(layout.dtype, copy=False), labels.astype(np.int64), [str(p) for p in paths],
                [str(s) for s in split], [str(h) for h in hashes])


def _disk_attrs(attrs: dict[str, Any], n_rows: int) -> dict[str, Any]:
    """Attributes as both backends store them: JSON-able scalars; anything nested kept as JSON text."""
    values = {key: _plain(_attr_value(value)) for key, value in attrs.items()}
    return {**values, "created": _now(), "transfer_flow_version": package_version(), "n_rows": n_rows}


def _attr_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (str, int, float, bool, np.integer, np.floating, np.bool_)):
        return value
    return json.dumps(value, default=str)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# --- Where a store lives: written beside its target, then renamed in ---------------------------------------


class _LocalPlace:
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


class _RemotePlace:
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


def _place(path: StorePath, backend: Backend | None = None) -> _LocalPlace | _RemotePlace:
    text = os.fspath(path)
    if "://" not in text:
        return _LocalPlace(Path(text))
    if text.startswith("file://"):
        import fsspec

        return _LocalPlace(Path(fsspec.core.url_to_fs(text)[1]))
    if (backend or backend_of(text)) != "zarr":
        raise StoreError(f"Expected a local path for an HDF5 feature store (remote stores are zarr: name them "
                         f"*.zarr), got {text}")
    return _RemotePlace(text)


def _refuse_existing(place: _LocalPlace | _RemotePlace, overwrite: bool) -> None:
    if not overwrite and place.exists():
        raise OutputExistsError(f"Feature store {place.uri} already exists (pass --overwrite to replace it)")


# --- The backends: one writer and one reader each, nothing but what differs ----------------------------------


class HDF5Writer:
    """The datasets of one HDF5 file being written. HDF5 has one writer at a time: no concurrent writes."""

    def __init__(self, location: str, *, n_rows: int, feature_dim: int, label_names: Sequence[str], dtype: np.dtype):
        self._file = h5py.File(location, "w")
        self.layout = Layout(feature_dim, dtype, len(label_names))
        text = h5py.string_dtype()
        chunk = rows_per_chunk(feature_dim, dtype)
        create = self._file.create_dataset
        create("features", shape=(n_rows, feature_dim), maxshape=(None, feature_dim), dtype=dtype,
               chunks=(chunk, feature_dim))
        create("labels", shape=(n_rows,), maxshape=(None,), dtype="int64", chunks=(4096,))
        for name in STRING_COLUMNS:
            create(name, shape=(n_rows,), maxshape=(None,), dtype=text, chunks=(4096,))
        create("label_names", data=np.array(list(label_names), dtype=object), dtype=text)

    def resize(self, n_rows: int) -> None:
        for name in ROW_COLUMNS:
            self._file[name].resize(n_rows, axis=0)

    def write(self, start: int, rows: Rows) -> None:
        for name, values in rows.columns().items():
            self._file[name][start:start + rows.n] = values

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        self._file.attrs.update(attrs)

    def close(self) -> None:
        self._file.close()


class HDF5Reader:
    label = "HDF5"
    errors: tuple[type[Exception], ...] = (OSError,)

    def __init__(self, location: str):
        self._file = h5py.File(location, "r")

    def has(self, name: str) -> bool:
        return name in self._file

    def shape(self) -> tuple[int, int]:
        return self._file["features"].shape

    def attrs(self) -> dict[str, Any]:
        return {key: _plain(value) for key, value in self._file.attrs.items()}

    def strings(self, name: str) -> list[str]:
        return list(self._file[name].asstr()[:])

    def labels(self) -> np.ndarray:
        return self._file["labels"][:]

    def rows(self, increasing: np.ndarray) -> np.ndarray:
        return self._file["features"][increasing]  # h5py reads strictly increasing indices only

    def close(self) -> None:
        self._file.close()


class ZarrWriter:
    """The arrays of one zarr v3 group being written. Every row array has the same row chunking, so writers
    of disjoint ranges that start on a chunk boundary never touch the same chunk."""

    def __init__(self, group: Any):
        self._group = group
        self._arrays = {name: group[name] for name in ROW_COLUMNS}

    @classmethod
    def create(cls, location: str, *, n_rows: int, feature_dim: int, label_names: Sequence[str],
               dtype: np.dtype) -> ZarrWriter:
        import zarr

        group = zarr.open_group(location, mode="w", zarr_format=3)
        chunk = rows_per_chunk(feature_dim, dtype)
        group.create_array("features", shape=(n_rows, feature_dim), dtype=dtype, chunks=(chunk, feature_dim),
                           fill_value=0)
        group.create_array("labels", shape=(n_rows,), dtype="int64", chunks=(chunk,), fill_value=UNWRITTEN_LABEL)
        for name in STRING_COLUMNS:
            group.create_array(name, shape=(n_rows,), dtype=str, chunks=(chunk,), fill_value="")
        names = group.create_array("label_names", shape=(len(label_names),), dtype=str,
                                   chunks=(max(1, len(label_names)),), fill_value="")
        names[:] = list(label_names)
        return cls(group)

    @classmethod
    def open(cls, location: str) -> ZarrWriter:
        import zarr

        return cls(zarr.open_group(location, mode="r+", zarr_format=3))

    @property
    def layout(self) -> Layout:
        features = self._arrays["features"]
        return Layout(features.shape[1], np.dtype(features.dtype), self._group["label_names"].shape[0])

    @property
    def chunk_rows(self) -> int:
        return self._arrays["features"].chunks[0]

    @property
    def n_rows(self) -> int:
        return self._arrays["features"].shape[0]

    def resize(self, n_rows: int) -> None:
        for array in self._arrays.values():
            array.resize((n_rows, *array.shape[1:]))

    def write(self, start: int, rows: Rows) -> None:
        for name, values in rows.columns().items():
            self._arrays[name][start:start + rows.n] = values

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        self._group.attrs.update(attrs)

    def close(self) -> None:
        pass


class ZarrReader:
    label = "zarr"
    # zarr raises GroupNotFoundError (a ValueError and FileNotFoundError), ContainsArrayError, JSONDecodeError...
    errors: tuple[type[Exception], ...] = (OSError, ValueError)

    def __init__(self, location: str):
        import zarr

        self._group = zarr.open_group(location, mode="r", zarr_format=3)

    def has(self, name: str) -> bool:
        return name in self._group

    def shape(self) -> tuple[int, int]:
        return self._group["features"].shape

    def attrs(self) -> dict[str, Any]:
        return dict(self._group.attrs)

    def strings(self, name: str) -> list[str]:
        return self._group[name][:].tolist()

    def labels(self) -> np.ndarray:
        return self._group["labels"][:]

    def rows(self, increasing: np.ndarray) -> np.ndarray:
        return self._group["features"].oindex[increasing]

    def close(self) -> None:
        pass


class _Backend(NamedTuple):
    writer: Callable[..., HDF5Writer | ZarrWriter]  # (location, *, n_rows, feature_dim, label_names, dtype)
    reader: type[HDF5Reader] | type[ZarrReader]
    is_dir: bool


_BACKENDS: dict[Backend, _Backend] = {
    "hdf5": _Backend(HDF5Writer, HDF5Reader, is_dir=False),
    "zarr": _Backend(ZarrWriter.create, ZarrReader, is_dir=True),
}


@contextlib.contextmanager
def _reading(path: StorePath, kind: Backend | None = None) -> Iterator[HDF5Reader | ZarrReader]:
    """A reader of the store at `path`, of backend `kind` (default: by its name; temporaries end in .tmp)."""
    kind = kind or backend_of(path)
    backend = _BACKENDS[kind]
    place = _place(path, kind)
    try:
        reader = backend.reader(place.uri)
        try:
            yield reader
        finally:
            reader.close()
    except StoreError:
        raise
    except backend.reader.errors as error:
        raise StoreError(f"{path} is not a readable {backend.reader.label} feature store: {error}") from error


# --- Writing -------------------------------------------------------------------------------------------------


class FeatureWriter:
    """What `create_store` yields: appends row batches at the end of the store being written."""

    def __init__(self, arrays: HDF5Writer | ZarrWriter):
        self._arrays = arrays
        self._layout = arrays.layout
        self.n_rows = 0

    def append(self, features: np.ndarray, labels: np.ndarray, paths: Sequence[str], split: Sequence[str],
               hashes: Sequence[str] | None = None) -> None:
        rows = parse_rows(features, labels, paths, split, hashes, self._layout)
        if rows.n == 0:
            return
        self._arrays.resize(self.n_rows + rows.n)
        self._arrays.write(self.n_rows, rows)
        self.n_rows += rows.n


@contextlib.contextmanager
def create_store(path: StorePath, *, feature_dim: int, label_names: Sequence[str], attrs: dict[str, Any],
                 dtype: str = "float32", overwrite: bool = False) -> Iterator[FeatureWriter]:
    """Open a writer; on clean exit the store is renamed to `path`, on error nothing appears there.

    The backend follows the name (`backend_of`). One writer; see `preallocate_zarr_store` for several.
    """
    backend = _BACKENDS[backend_of(path)]
    dtype = parse_feature_dtype(dtype)
    place = _place(path)
    _refuse_existing(place, overwrite)
    with place.writing(overwrite=overwrite, is_dir=backend.is_dir) as tmp:
        arrays = backend.writer(str(tmp), n_rows=0, feature_dim=feature_dim, label_names=label_names, dtype=dtype)
        try:
            writer = FeatureWriter(arrays)
            yield writer
            arrays.set_attrs(_disk_attrs(attrs, writer.n_rows))
        finally:
            arrays.close()


def preallocate_zarr_store(path: StorePath, *, n_rows: int, feature_dim: int, label_names: Sequence[str],
                           attrs: dict[str, Any], dtype: str = "float32", overwrite: bool = False) -> str:
    """Create a full-size zarr store under a temporary name beside `path` and return that name.

    Workers then fill disjoint row ranges with `write_rows` (any process, no locks), and one caller
    renames the store into place with `commit_store` (or removes it with `discard_store`).
    """
    if backend_of(path) != "zarr":
        raise StoreError(f"Expected a .zarr store for concurrent writes (HDF5 has a single writer), got {path}")
    dtype = parse_feature_dtype(dtype)
    place = _place(path)
    _refuse_existing(place, overwrite)
    tmp = place.temp(overwrite=overwrite)
    try:
        writer = ZarrWriter.create(tmp, n_rows=n_rows, feature_dim=feature_dim, label_names=label_names, dtype=dtype)
        writer.set_attrs(_disk_attrs(attrs, n_rows))
    except BaseException:
        place.discard(tmp)
        raise
    return tmp


def write_rows(tmp_path: str, start: int, features: np.ndarray, labels: np.ndarray, paths: Sequence[str],
               split: Sequence[str], hashes: Sequence[str] | None = None) -> None:
    """Write rows `start`, `start + 1`, ... of a preallocated store. Safe beside other processes writing
    other ranges, as long as every range starts on a row-chunk boundary (checked)."""
    writer = ZarrWriter.open(tmp_path)
    rows = parse_rows(features, labels, paths, split, hashes, writer.layout)
    if start % writer.chunk_rows:
        raise ValueError(f"Expected start aligned to {writer.chunk_rows}-row chunks, got {start}")
    if start < 0 or start + rows.n > writer.n_rows:
        raise ValueError(f"Expected rows within 0..{writer.n_rows}, got {start}..{start + rows.n}")
    writer.write(start, rows)


def commit_store(tmp_path: str, path: StorePath, *, overwrite: bool = False) -> FeatureStore:
    """Rename a filled preallocated store to `path`; refused if any row was never written."""
    place = _place(path)
    _refuse_existing(place, overwrite)
    with _reading(tmp_path, "zarr") as reader:
        unwritten = np.flatnonzero(reader.labels() == UNWRITTEN_LABEL)
    if len(unwritten):
        raise StoreError(f"{len(unwritten)} rows of {tmp_path} were never written (first: row {unwritten[0]}); "
                         "write them or discard_store it")
    ZarrWriter.open(tmp_path).set_attrs({"created": _now()})
    place.commit(tmp_path, overwrite=overwrite)
    return open_store(path)


def discard_store(tmp_path: str) -> None:
    """Remove a preallocated store that will not be committed."""
    name = posixpath.basename(os.fspath(tmp_path).rstrip("/"))
    if not (name.startswith(".") and name.endswith(".tmp")):
        raise ValueError(f"Expected a temporary store from preallocate_zarr_store, got {tmp_path}")
    _place(tmp_path, "zarr").discard(os.fspath(tmp_path))


# --- Reading -------------------------------------------------------------------------------------------------


def store_exists(path: StorePath) -> bool:
    """Whether anything (a store or not) is at `path`, local or remote."""
    return _place(path).exists()


def open_store(path: StorePath) -> FeatureStore:
    """Describe an existing store (no feature data is read)."""
    place = _place(path)
    if not place.exists():
        raise StoreError(f"Feature store {path} does not exist")
    with _reading(path) as reader:
        for name in ("features", "labels", "label_names"):
            if not reader.has(name):
                raise StoreError(f"{path} is not a feature store: it has no '{name}' dataset")
        n_rows, feature_dim = reader.shape()
        return FeatureStore(path=place.uri, n_rows=n_rows, feature_dim=feature_dim,
                            label_names=reader.strings("label_names"), attrs=reader.attrs())


def read_contents(store: FeatureStore) -> StoreContents:
    with _reading(store.path) as reader:
        n = reader.shape()[0]

        def strings(name: str) -> list[str]:
            return reader.strings(name) if reader.has(name) else [""] * n

        return StoreContents(labels=reader.labels(), label_names=reader.strings("label_names"),
                             paths=strings("paths"), split=strings("split"), hashes=strings("hashes"),
                             attrs=reader.attrs())


def read_features(store: FeatureStore, rows: np.ndarray) -> np.ndarray:
    """Features of the given row indices (any order, repeats allowed), as float32."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) == 0:
        return np.empty((0, store.feature_dim), dtype=np.float32)
    unique, inverse = np.unique(rows, return_inverse=True)
    with _reading(store.path) as reader:
        values = np.asarray(reader.rows(unique), dtype=np.float32)
    return values if len(unique) == len(rows) and (unique == rows).all() else values[inverse]
