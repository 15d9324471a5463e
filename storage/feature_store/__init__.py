"""Feature stores: rows of features with their labels, paths, split and content hashes, behind one interface.

This front opens, creates, appends to and reads a store; the format follows the store's name
(`store_format_of`: a path or URL ending in `.zarr` is a zarr v3 group, anything else one HDF5 file)
and each format is one module (formats.py lists them). Both hold the same arrays and attributes
(rows.py), so `open_store(...)` describes either identically and `read_features` always returns float32.

Writing: a store is written under a temporary name beside its target and renamed into place only when
complete, so a reader never sees half a store (places.py: local paths and fsspec URLs). One writer
appends batches with `create_store(...)`; several processes writing disjoint row ranges of one zarr
store use concurrent_zarr.py.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from transfer_flow.storage.content_keys import content_key
from transfer_flow.storage.errors import StoreError
from transfer_flow.storage.extraction_record import ExtractionRecord, read_record
from transfer_flow.storage.feature_store.formats import (
    STORE_FORMATS,
    StoreFormat,
    StoreFormatName,
    store_format_of,
)
from transfer_flow.storage.feature_store.places import StorePath, place_of, refuse_existing
from transfer_flow.storage.feature_store.rows import (
    FEATURE_DTYPES,
    SKIPPED_COLUMNS,
    FeatureDtype,
    SkippedImages,
    disk_attrs,
    parse_feature_dtype,
    parse_rows,
    rows_per_chunk,
)

__all__ = [
    "FEATURE_DTYPES", "FeatureDtype", "STORE_FORMATS", "FeatureStore", "FeatureWriter", "StoreContents", "StoreFormat",
    "SkippedImages", "StoreFormatName", "StorePath", "create_store", "open_store", "read_contents", "read_features",
    "read_skipped",
    "reading", "rows_per_chunk", "store_exists", "store_format_of",
]


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

    @property
    def extraction(self) -> ExtractionRecord | None:
        """How the rows were made; None for a store that carries no such record (not written by extraction)."""
        if "backbone" not in self.attrs:
            return None
        try:
            return read_record(self.attrs)
        except ValueError as error:
            raise StoreError(f"{self.path} has an incomplete extraction record: {error}") from None


class StoreContents(BaseModel, arbitrary_types_allowed=True):
    """Arrays read back from a store (features loaded only when asked)."""

    labels: np.ndarray
    label_names: list[str]
    paths: list[str]
    split: list[str]
    hashes: list[str]
    view: np.ndarray = Field(description="0: the image itself; 1..K: its augmented views (train rows only).")
    attrs: dict[str, Any]


@contextlib.contextmanager
def reading(path: StorePath, store_format: StoreFormat | None = None) -> Iterator[Any]:
    """A reader of the store at `path` in `store_format` (default: by its name; temporaries end in .tmp)."""
    store_format = store_format or store_format_of(path)
    reader_type = store_format.backend().Reader
    place = place_of(path, store_format)
    try:
        reader = reader_type(place.uri)
        try:
            yield reader
        finally:
            reader.close()
    except StoreError:
        raise
    except reader_type.errors as error:
        raise StoreError(f"{path} is not a readable {reader_type.label} feature store: {error}") from error


# --- Writing -------------------------------------------------------------------------------------------------


class FeatureWriter:
    """What `create_store` yields: appends row batches at the end of the store being written."""

    def __init__(self, arrays: Any):
        self._arrays = arrays
        self._layout = arrays.layout
        self.n_rows = 0

    def append(self, features: np.ndarray, labels: np.ndarray, paths: Sequence[str], split: Sequence[str],
               hashes: Sequence[str] | None = None, views: Sequence[int] | None = None) -> None:
        rows = parse_rows(features, labels, paths, split, hashes, self._layout, views)
        if rows.n == 0:
            return
        self._arrays.resize(self.n_rows + rows.n)
        self._arrays.write(self.n_rows, rows)
        self.n_rows += rows.n

    def record_skipped(self, skipped: SkippedImages) -> None:
        """The images that are not rows, with why (written once, replacing any recorded before)."""
        self._arrays.write_skipped(skipped)


@contextlib.contextmanager
def create_store(path: StorePath, *, feature_dim: int, label_names: Sequence[str], attrs: dict[str, Any],
                 dtype: str = "float32", overwrite: bool = False) -> Iterator[FeatureWriter]:
    """Open a writer; on clean exit the store is renamed to `path`, on error nothing appears there.

    The format follows the name (`store_format_of`). One writer; see concurrent_zarr.py for several.
    """
    store_format = store_format_of(path)
    dtype = parse_feature_dtype(dtype)
    place = place_of(path, store_format)
    refuse_existing(place, overwrite)
    with place.writing(overwrite=overwrite, is_dir=store_format.is_dir) as tmp:
        arrays = store_format.backend().create(str(tmp), n_rows=0, feature_dim=feature_dim, label_names=label_names,
                                               dtype=dtype)
        try:
            writer = FeatureWriter(arrays)
            yield writer
            arrays.set_attrs(disk_attrs(attrs, writer.n_rows))
        finally:
            arrays.close()


# --- Reading -------------------------------------------------------------------------------------------------


def store_exists(path: StorePath) -> bool:
    """Whether anything (a store or not) is at `path`, local or remote."""
    return place_of(path).exists()


def open_store(path: StorePath) -> FeatureStore:
    """Describe an existing store (no feature data is read)."""
    place = place_of(path)
    if not place.exists():
        raise StoreError(f"Feature store {path} does not exist")
    with reading(path) as reader:
        for name in ("features", "labels", "label_names"):
            if not reader.has(name):
                raise StoreError(f"{path} is not a feature store: it has no '{name}' dataset")
        n_rows, feature_dim = reader.shape()
        return FeatureStore(path=place.uri, n_rows=n_rows, feature_dim=feature_dim,
                            label_names=reader.strings("label_names"), attrs=reader.attrs())


def read_contents(store: FeatureStore) -> StoreContents:
    with reading(store.path) as reader:
        n = reader.shape()[0]

        def strings(name: str) -> list[str]:
            return reader.strings(name) if reader.has(name) else [""] * n

        return StoreContents(labels=reader.labels(), label_names=reader.strings("label_names"),
                             paths=strings("paths"), split=strings("split"), hashes=strings("hashes"),
                             view=reader.views(), attrs=reader.attrs())


def read_skipped(store: FeatureStore) -> SkippedImages:
    """The images that are not rows of the store, with why. A store written before the skipped arrays
    existed kept them as JSON (hash -> reason) in its `skipped` attribute; their paths read as ""."""
    with reading(store.path) as reader:
        if reader.has(SKIPPED_COLUMNS[0]):
            return SkippedImages(*(reader.strings(name) for name in SKIPPED_COLUMNS))
    reasons = json.loads(store.attrs.get("skipped") or "{}")
    return SkippedImages([""] * len(reasons), list(reasons), list(reasons.values()))


def read_features(store: FeatureStore, rows: np.ndarray) -> np.ndarray:
    """Features of the given row indices (any order, repeats allowed), as float32."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) == 0:
        return np.empty((0, store.feature_dim), dtype=np.float32)
    unique, inverse = np.unique(rows, return_inverse=True)
    with reading(store.path) as reader:
        values = np.asarray(reader.rows(unique), dtype=np.float32)
    return values if len(unique) == len(rows) and (unique == rows).all() else values[inverse]
