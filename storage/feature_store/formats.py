"""The store formats: one registry entry per format, read by the settings, the CLI, the output layout and
the front that opens a store. Adding a format is one entry here plus its backend module.

A backend module provides `create(location, *, n_rows, feature_dim, label_names, dtype)` returning a
writer (resize, write, set_attrs, close, layout) and a `Reader` class (has, shape, attrs, strings,
labels, rows, close; `label` and `errors` for messages), both over the same arrays (see rows.py).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from types import ModuleType
from typing import Literal


@dataclasses.dataclass(frozen=True)
class StoreFormat:
    name: str  # what --store and the settings call it
    file_name: str  # the store's name in a run's output folder
    backend_module: str  # the module holding create() and Reader
    suffix: str | None  # a store path ending so is in this format (None: any path no other format claims)
    is_dir: bool  # a directory on disk, else one file
    remote: bool  # may live at an fsspec URL (s3://...)
    description: str = ""

    def backend(self) -> ModuleType:
        """The backend module, imported on first use (zarr is slow to import and often unused)."""
        return importlib.import_module(self.backend_module)


STORE_FORMATS: dict[str, StoreFormat] = {f.name: f for f in (
    StoreFormat("hdf5", "features.h5", "transfer_flow.storage.feature_store.hdf5_backend", suffix=None,
                is_dir=False, remote=False, description="one HDF5 file, the classic layout"),
    StoreFormat("zarr", "features.zarr", "transfer_flow.storage.feature_store.zarr_backend", suffix=".zarr",
                is_dir=True, remote=True, description="a zarr v3 directory; also on object stores"),
)}
DEFAULT_STORE_FORMAT = "hdf5"

# The registry's names as a type for pydantic settings (their choices, validation and UI form).
StoreFormatName = Literal[tuple(STORE_FORMATS)]  # type: ignore[valid-type]


def store_format_of(path: str | os.PathLike) -> StoreFormat:
    """The format a store path names: the one whose suffix it ends with, else the default."""
    text = os.fspath(path).rstrip("/")
    for candidate in STORE_FORMATS.values():
        if candidate.suffix and text.endswith(candidate.suffix):
            return candidate
    return STORE_FORMATS[DEFAULT_STORE_FORMAT]
