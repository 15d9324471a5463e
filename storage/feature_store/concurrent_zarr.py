"""Several processes writing disjoint row ranges of one zarr store, without locks (HDF5 has a single writer).

`preallocate_zarr_store` once, `write_rows` from each worker at starts aligned to the row chunk (every
array shares that row chunking, so two ranges never write the same chunk file), then `commit_store`
once, which refuses a store with rows never written. Used by bench/feature_store.py; extraction
itself writes through one `create_store`.
"""
from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence
from typing import Any

import numpy as np

from transfer_flow.storage.errors import StoreError
from transfer_flow.storage.feature_store import FeatureStore, StorePath, open_store, reading
from transfer_flow.storage.feature_store.formats import STORE_FORMATS, store_format_of
from transfer_flow.storage.feature_store.places import place_of, refuse_existing
from transfer_flow.storage.feature_store.rows import UNWRITTEN_LABEL, disk_attrs, now, parse_feature_dtype, parse_rows
from transfer_flow.storage.feature_store.zarr_backend import Writer

ZARR = STORE_FORMATS["zarr"]


def preallocate_zarr_store(path: StorePath, *, n_rows: int, feature_dim: int, label_names: Sequence[str],
                           attrs: dict[str, Any], dtype: str = "float32", overwrite: bool = False) -> str:
    """Create a full-size zarr store under a temporary name beside `path` and return that name.

    Workers then fill disjoint row ranges with `write_rows` (any process, no locks), and one caller
    renames the store into place with `commit_store` (or removes it with `discard_store`).
    """
    if store_format_of(path) != ZARR:
        raise StoreError(f"Expected a .zarr store for concurrent writes (HDF5 has a single writer), got {path}")
    dtype = parse_feature_dtype(dtype)
    place = place_of(path)
    refuse_existing(place, overwrite)
    tmp = place.temp(overwrite=overwrite)
    try:
        writer = Writer.create(tmp, n_rows=n_rows, feature_dim=feature_dim, label_names=label_names, dtype=dtype)
        writer.set_attrs(disk_attrs(attrs, n_rows))
    except BaseException:
        place.discard(tmp)
        raise
    return tmp


def write_rows(tmp_path: str, start: int, features: np.ndarray, labels: np.ndarray, paths: Sequence[str],
               split: Sequence[str], hashes: Sequence[str] | None = None, views: Sequence[int] | None = None) -> None:
    """Write rows `start`, `start + 1`, ... of a preallocated store. Safe beside other processes writing
    other ranges, as long as every range starts on a row-chunk boundary (checked)."""
    writer = Writer.open(tmp_path)
    rows = parse_rows(features, labels, paths, split, hashes, writer.layout, views)
    if start % writer.chunk_rows:
        raise ValueError(f"Expected start aligned to {writer.chunk_rows}-row chunks, got {start}")
    if start < 0 or start + rows.n > writer.n_rows:
        raise ValueError(f"Expected rows within 0..{writer.n_rows}, got {start}..{start + rows.n}")
    writer.write(start, rows)


def commit_store(tmp_path: str, path: StorePath, *, overwrite: bool = False) -> FeatureStore:
    """Rename a filled preallocated store to `path`; refused if any row was never written."""
    place = place_of(path)
    refuse_existing(place, overwrite)
    with reading(tmp_path, ZARR) as reader:
        unwritten = np.flatnonzero(reader.labels() == UNWRITTEN_LABEL)
    if len(unwritten):
        raise StoreError(f"{len(unwritten)} rows of {tmp_path} were never written (first: row {unwritten[0]}); "
                         "write them or discard_store it")
    Writer.open(tmp_path).set_attrs({"created": now()})
    place.commit(tmp_path, overwrite=overwrite)
    return open_store(path)


def discard_store(tmp_path: str) -> None:
    """Remove a preallocated store that will not be committed."""
    name = posixpath.basename(os.fspath(tmp_path).rstrip("/"))
    if not (name.startswith(".") and name.endswith(".tmp")):
        raise ValueError(f"Expected a temporary store from preallocate_zarr_store, got {tmp_path}")
    place_of(tmp_path, ZARR).discard(os.fspath(tmp_path))
