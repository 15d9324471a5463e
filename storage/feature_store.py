"""Feature stores: rows of features with their labels, paths and split, behind one interface.

HDF5 keeps the classic layout (`features`, `labels`, `label_names`) that the classic recipe's
training step reads unchanged, plus `paths` and `split`. A store is written under a temporary
name, row chunks appended as batches arrive, and renamed into place only when complete.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from pydantic import BaseModel, Field

from storage.atomic import atomic_path
from storage.errors import OutputExistsError, StoreError

TARGET_CHUNK_BYTES = 1 << 20  # ~1 MiB row chunks: h5py's advice for chunk size, whatever the feature width


class FeatureStore(BaseModel):
    """A complete feature store on disk: the box the training stage reads."""

    path: str
    n_rows: int
    feature_dim: int
    label_names: list[str]
    attrs: dict[str, Any] = Field(default_factory=dict)

    def fingerprint(self) -> str:
        """Identifies the rows by content: the extraction settings and the manifest they came from."""
        identity = [self.attrs.get("extraction_key"), self.attrs.get("manifest_fingerprint"), self.n_rows,
                    self.feature_dim, self.label_names]
        return hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()[:16]


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


def package_version() -> str:
    try:
        return metadata.version("transfer-flow")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class HDF5FeatureWriter:
    """Appends row batches to an open HDF5 file (one writer; the file is not yet under its final name)."""

    def __init__(self, file: h5py.File, feature_dim: int, label_names: Sequence[str], dtype: str):
        self._file = file
        text = h5py.string_dtype()
        chunk = rows_per_chunk(feature_dim, np.dtype(dtype))
        self.features = file.create_dataset("features", shape=(0, feature_dim), maxshape=(None, feature_dim),
                                            dtype=dtype, chunks=(chunk, feature_dim))
        self.labels = file.create_dataset("labels", shape=(0,), maxshape=(None,), dtype="int64", chunks=(4096,))
        self.paths = file.create_dataset("paths", shape=(0,), maxshape=(None,), dtype=text, chunks=(4096,))
        self.split = file.create_dataset("split", shape=(0,), maxshape=(None,), dtype=text, chunks=(4096,))
        self.hashes = file.create_dataset("hashes", shape=(0,), maxshape=(None,), dtype=text, chunks=(4096,))
        file.create_dataset("label_names", data=np.array(list(label_names), dtype=object), dtype=text)
        self.n_rows = 0

    def append(self, features: np.ndarray, labels: np.ndarray, paths: Sequence[str], split: Sequence[str],
               hashes: Sequence[str] | None = None) -> None:
        n = len(features)
        hashes = [""] * n if hashes is None else hashes
        if not (n == len(labels) == len(paths) == len(split) == len(hashes)):
            raise StoreError(f"Expected equal row counts, got {n} features, {len(labels)} labels, "
                             f"{len(paths)} paths, {len(split)} split values, {len(hashes)} hashes")
        if n == 0:
            return
        end = self.n_rows + n
        for dataset in (self.features, self.labels, self.paths, self.split, self.hashes):
            dataset.resize(end, axis=0)
        self.features[self.n_rows:end] = features
        self.labels[self.n_rows:end] = labels
        self.paths[self.n_rows:end] = list(paths)
        self.split[self.n_rows:end] = list(split)
        self.hashes[self.n_rows:end] = list(hashes)
        self.n_rows = end


@contextlib.contextmanager
def create_store(path: Path, *, feature_dim: int, label_names: Sequence[str], attrs: dict[str, Any],
                 dtype: str = "float32", overwrite: bool = False) -> Iterator[HDF5FeatureWriter]:
    """Open a writer; on clean exit the store is renamed to `path`, on error nothing appears there."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"Feature store {path} already exists (pass --overwrite to replace it)")
    with atomic_path(path, overwrite=overwrite) as tmp:
        with h5py.File(tmp, "w") as file:
            writer = HDF5FeatureWriter(file, feature_dim, label_names, dtype)
            yield writer
            file.attrs.update({k: _attr_value(v) for k, v in attrs.items()})
            file.attrs["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            file.attrs["transfer_flow_version"] = package_version()
            file.attrs["n_rows"] = writer.n_rows


def _attr_value(value: Any) -> Any:
    """HDF5 attributes hold scalars and strings; anything nested is kept as JSON text."""
    if value is None:
        return ""
    if isinstance(value, (str, int, float, bool, np.integer, np.floating)):
        return value
    return json.dumps(value, default=str)


def open_store(path: Path) -> FeatureStore:
    """Describe an existing store (no feature data is read)."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"Feature store {path} does not exist")
    try:
        with h5py.File(path, "r") as file:
            for name in ("features", "labels", "label_names"):
                if name not in file:
                    raise StoreError(f"{path} is not a feature store: it has no '{name}' dataset")
            return FeatureStore(
                path=str(path), n_rows=int(file["features"].shape[0]), feature_dim=int(file["features"].shape[1]),
                label_names=list(file["label_names"].asstr()[:]), attrs={k: _plain(v) for k, v in file.attrs.items()},
            )
    except OSError as error:
        raise StoreError(f"{path} is not a readable HDF5 feature store: {error}") from error


def read_contents(store: FeatureStore) -> StoreContents:
    with h5py.File(store.path, "r") as file:
        n = file["features"].shape[0]
        return StoreContents(
            labels=file["labels"][:],
            label_names=list(file["label_names"].asstr()[:]),
            paths=list(file["paths"].asstr()[:]) if "paths" in file else [""] * n,
            split=list(file["split"].asstr()[:]) if "split" in file else [""] * n,
            hashes=list(file["hashes"].asstr()[:]) if "hashes" in file else [""] * n,
            attrs={k: _plain(v) for k, v in file.attrs.items()},
        )


def read_features(store: FeatureStore, rows: np.ndarray) -> np.ndarray:
    """Features of the given row indices (sorted, as h5py fancy indexing requires), as float32."""
    with h5py.File(store.path, "r") as file:
        order = np.argsort(rows)
        out = np.empty((len(rows), store.feature_dim), dtype=np.float32)
        out[order] = file["features"][np.asarray(rows)[order]]
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value
