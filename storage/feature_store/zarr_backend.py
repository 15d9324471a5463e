"""The zarr v3 backend: a directory of chunk files, local or (through fsspec) on an object store
(`s3://bucket/x.zarr` with the `s3` extra installed; credentials as s3fs finds them in the environment).

Dask reads it directly: `dask.array.from_zarr(path, component="features")`. Every row array has the
same row chunking, so writers of disjoint ranges that start on a chunk boundary never touch the same
chunk file (see concurrent_zarr.py). Every array carries its `dimension_names` (rows.py `DIMENSIONS`) and
the group's metadata is consolidated whenever its attributes are set (the last step of every write), so
`xr.open_zarr(path)` opens it in one read of `zarr.json`.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from transfer_flow.storage.feature_store.rows import (
    DIMENSIONS,
    ROW_COLUMNS,
    SKIPPED_COLUMNS,
    STRING_COLUMNS,
    UNWRITTEN_LABEL,
    Layout,
    Rows,
    SkippedImages,
    rows_per_chunk,
)


class Writer:
    """The arrays of one zarr v3 group being written."""

    def __init__(self, group: Any):
        self._group = group
        self._arrays = {name: group[name] for name in ROW_COLUMNS}

    @classmethod
    def create(cls, location: str, *, n_rows: int, feature_dim: int, label_names: Sequence[str],
               dtype: np.dtype) -> Writer:
        import zarr

        group = zarr.open_group(location, mode="w", zarr_format=3)
        chunk = rows_per_chunk(feature_dim, dtype)
        group.create_array("features", shape=(n_rows, feature_dim), dtype=dtype, chunks=(chunk, feature_dim),
                           fill_value=0, dimension_names=DIMENSIONS["features"])
        group.create_array("labels", shape=(n_rows,), dtype="int64", chunks=(chunk,), fill_value=UNWRITTEN_LABEL,
                           dimension_names=DIMENSIONS["labels"])
        group.create_array("view", shape=(n_rows,), dtype="int64", chunks=(chunk,), fill_value=0,
                           dimension_names=DIMENSIONS["view"])
        for name in STRING_COLUMNS:
            group.create_array(name, shape=(n_rows,), dtype=str, chunks=(chunk,), fill_value="",
                               dimension_names=DIMENSIONS[name])
        names = group.create_array("label_names", shape=(len(label_names),), dtype=str,
                                   chunks=(max(1, len(label_names)),), fill_value="",
                                   dimension_names=DIMENSIONS["label_names"])
        names[:] = list(label_names)
        for name in SKIPPED_COLUMNS:
            group.create_array(name, shape=(0,), dtype=str, chunks=(1024,), fill_value="",
                               dimension_names=DIMENSIONS[name])
        return cls(group)

    @classmethod
    def open(cls, location: str) -> Writer:
        import zarr

        # Not the consolidated metadata: it describes the last commit, and a writer needs the arrays as they are.
        return cls(zarr.open_group(location, mode="r+", zarr_format=3, use_consolidated=False))

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

    def write_skipped(self, skipped: SkippedImages) -> None:
        for name, values in skipped.columns().items():
            self._group[name].resize((len(values),))
            self._group[name][:] = np.array(values, dtype=str)

    def write_columns(self, start: int, columns: dict[str, Any]) -> None:
        for name, values in columns.items():
            self._arrays[name][start:start + len(values)] = values

    def flush(self) -> None:
        pass  # every chunk and metadata file is written whole (zarr's local store writes then renames)

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        import zarr

        self._group.attrs.update(attrs)
        with warnings.catch_warnings():
            # zarr warns that consolidated metadata is not yet in the v3 spec; xarray and zarr both read it.
            warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
            zarr.consolidate_metadata(self._group.store)

    def close(self) -> None:
        pass


create = Writer.create
open_for_append = Writer.open


class Reader:
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

    def strings(self, name: str, stop: int | None = None) -> list[str]:
        return self._group[name][:stop].tolist()

    def labels(self, stop: int | None = None) -> np.ndarray:
        return self._group["labels"][:stop]

    def views(self, stop: int | None = None) -> np.ndarray:
        return self._group["view"][:stop] if "view" in self._group else np.zeros(self.shape()[0], np.int64)[:stop]

    def rows(self, increasing: np.ndarray) -> np.ndarray:
        return self._group["features"].oindex[increasing]

    def close(self) -> None:
        pass
