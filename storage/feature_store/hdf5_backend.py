"""The HDF5 backend: one file, written by one writer at a time (HDF5 has no concurrent writers).

It keeps the classic layout (`features`, `labels`, `label_names`) that the classic recipe's training
step reads unchanged, plus one empty dimension-scale dataset per dimension (`image`, `feature`,
`class`) attached to the arrays' axes the way netCDF-4 marks a dimension that is not a variable, so
`xr.open_dataset(path, engine="h5netcdf")` names the axes; our reader and h5py readers never look at them.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

from transfer_flow.storage.feature_store.rows import (
    DIMENSIONS,
    ROW_COLUMNS,
    SKIPPED_COLUMNS,
    STRING_COLUMNS,
    Layout,
    Rows,
    SkippedImages,
    plain,
    rows_per_chunk,
)

# netCDF-4's NAME for a dimension scale that holds no values of its own (what netCDF-C and h5netcdf write).
NOT_A_VARIABLE = b"This is a netCDF dimension but not a netCDF variable."


class Writer:
    """The datasets of one HDF5 file being written."""

    def __init__(self, location: str, *, n_rows: int, feature_dim: int, label_names: Sequence[str], dtype: np.dtype,
                 existing: bool = False):
        if existing:  # an existing store, grown in place (see open_for_append)
            self._file = h5py.File(location, "r+")
            features = self._file["features"]
            self.layout = Layout(features.shape[1], np.dtype(features.dtype), len(self._file["label_names"]))
            return
        self._file = h5py.File(location, "w")
        self.layout = Layout(feature_dim, dtype, len(label_names))
        text = h5py.string_dtype()
        chunk = rows_per_chunk(feature_dim, dtype)
        create = self._file.create_dataset
        create("features", shape=(n_rows, feature_dim), maxshape=(None, feature_dim), dtype=dtype,
               chunks=(chunk, feature_dim))
        create("labels", shape=(n_rows,), maxshape=(None,), dtype="int64", chunks=(4096,))
        create("view", shape=(n_rows,), maxshape=(None,), dtype="int64", chunks=(4096,))
        for name in STRING_COLUMNS:
            create(name, shape=(n_rows,), maxshape=(None,), dtype=text, chunks=(4096,))
        create("label_names", data=np.array(list(label_names), dtype=object), dtype=text)
        for name in SKIPPED_COLUMNS:
            create(name, shape=(0,), maxshape=(None,), dtype=text, chunks=(1024,))
        self._name_dimensions({"image": n_rows, "feature": feature_dim, "class": len(label_names), "skipped": 0})

    def _name_dimensions(self, sizes: dict[str, int]) -> None:
        """One scale per dimension, attached to every array axis it names. Never written, so chunked
        storage allocates nothing for them; `image` and `skipped` grow (unlimited, like their arrays)."""
        for name, size in sizes.items():
            growing = name in ("image", "skipped")
            scale = self._file.create_dataset(name, shape=(size,), maxshape=(None,) if growing else (size,),
                                              dtype="f4", chunks=(4096,) if growing else None)
            scale.make_scale(NOT_A_VARIABLE + f"{size:10d}".encode())
        for array, dimensions in DIMENSIONS.items():
            for axis, name in enumerate(dimensions):
                self._file[array].dims[axis].attach_scale(self._file[name])

    def resize(self, n_rows: int) -> None:
        for name in (*ROW_COLUMNS, "image"):
            self._file[name].resize(n_rows, axis=0)

    def write(self, start: int, rows: Rows) -> None:
        for name, values in rows.columns().items():
            self._file[name][start:start + rows.n] = values

    def write_skipped(self, skipped: SkippedImages) -> None:
        for name, values in (*skipped.columns().items(), ("skipped", None)):
            self._file[name].resize(len(skipped.paths), axis=0)
            if values is not None:
                self._file[name][:] = values

    def write_columns(self, start: int, columns: dict[str, Any]) -> None:
        for name, values in columns.items():
            self._file[name][start:start + len(values)] = values

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        self._file.attrs.update(attrs)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


create = Writer


def open_for_append(location: str) -> Writer:
    return Writer(location, n_rows=0, feature_dim=0, label_names=(), dtype=np.dtype(np.float32), existing=True)


class Reader:
    label = "HDF5"
    errors: tuple[type[Exception], ...] = (OSError,)

    def __init__(self, location: str):
        self._file = h5py.File(location, "r")

    def has(self, name: str) -> bool:
        return name in self._file

    def shape(self) -> tuple[int, int]:
        return self._file["features"].shape

    def attrs(self) -> dict[str, Any]:
        return {key: plain(value) for key, value in self._file.attrs.items()}

    def strings(self, name: str, stop: int | None = None) -> list[str]:
        return list(self._file[name].asstr()[:stop])

    def labels(self, stop: int | None = None) -> np.ndarray:
        return self._file["labels"][:stop]

    def views(self, stop: int | None = None) -> np.ndarray:
        return self._file["view"][:stop] if "view" in self._file else np.zeros(self.shape()[0], np.int64)[:stop]

    def rows(self, increasing: np.ndarray) -> np.ndarray:
        features = self._file["features"]
        if len(increasing) and increasing[-1] - increasing[0] < 4 * len(increasing):
            # Dense enough: one slab read, then picked in memory. h5py's point selection costs ~0.1 ms a row
            # (a 200-row block of train rows: 30 ms against 1 ms), and memory stays within 4x of what was asked.
            start = int(increasing[0])
            return features[start:int(increasing[-1]) + 1][increasing - start]
        return features[increasing]  # h5py reads strictly increasing indices only

    def close(self) -> None:
        self._file.close()
