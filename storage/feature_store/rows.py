"""What every backend stores, and the inputs they take, parsed once: row batches, feature dtypes, attributes.

Both backends hold the same arrays: `features` (rows x dim, float32 or float16, chunks of
`rows_per_chunk` rows), `labels` (int64), `view` (int64: 0 the image itself, 1..K its augmented views),
`label_names`, `paths`, `split`, `hashes` (strings), the images that could not be rows (`skipped_paths`,
`skipped_hashes`, `skipped_reasons`, one entry per skipped image), and the same attributes (scalars as they
are, anything nested as JSON text). A store written before `view` existed reads as all view 0; one written
before the skipped arrays keeps its skipped images as JSON in the `skipped` attribute (hash -> reason).

Every array names its dimensions (`DIMENSIONS`: zarr `dimension_names`, HDF5 dimension scales), so
xarray, dask and netCDF readers see `image`, `feature` and `class` rather than anonymous axes. Stores
written before carry no names and read the same through our readers, which look arrays up by name.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Sequence
from typing import Any, get_args

import numpy as np

from transfer_flow.storage.content_keys import package_version
from transfer_flow.storage.errors import StoreError
from transfer_flow.storage.extraction_record import FeatureDtype

TARGET_CHUNK_BYTES = 1 << 20  # ~1 MiB row chunks: h5py's advice for chunk size, whatever the feature width
FEATURE_DTYPES = get_args(FeatureDtype)
STRING_COLUMNS = ("paths", "split", "hashes")
ROW_COLUMNS = ("features", "labels", "view", *STRING_COLUMNS)  # one entry per row, all grown and written together
SKIPPED_COLUMNS = ("skipped_paths", "skipped_hashes", "skipped_reasons")  # one entry per image that is not a row
# The dimensions of each array, as xarray will name them; a column added per row is on ("image",).
DIMENSIONS: dict[str, tuple[str, ...]] = {
    "features": ("image", "feature"), **{name: ("image",) for name in ("labels", "view", *STRING_COLUMNS)},
    "label_names": ("class",), **{name: ("skipped",) for name in SKIPPED_COLUMNS},
}
UNWRITTEN_LABEL = -1  # fill value of zarr `labels`: a preallocated row nobody wrote is visible as such


def rows_per_chunk(feature_dim: int, dtype: np.dtype = np.dtype(np.float32)) -> int:
    return max(1, TARGET_CHUNK_BYTES // (feature_dim * np.dtype(dtype).itemsize))


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
class SkippedImages:
    """The images of a store that are not rows, each with why: aligned lists."""

    paths: list[str]
    hashes: list[str]
    reasons: list[str]

    def __post_init__(self) -> None:
        if not len(self.paths) == len(self.hashes) == len(self.reasons):
            raise StoreError(f"Expected as many skipped paths, hashes and reasons, got {len(self.paths)}, "
                             f"{len(self.hashes)}, {len(self.reasons)}")

    def columns(self) -> dict[str, list[str]]:
        return dict(zip(SKIPPED_COLUMNS, (self.paths, self.hashes, self.reasons)))

    def reasons_by_hash(self) -> dict[str, str]:
        return dict(zip(self.hashes, self.reasons))


@dataclasses.dataclass(frozen=True)
class Rows:
    """One batch of rows, checked: equal lengths, the store's width, labels that name a class."""

    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    split: list[str]
    hashes: list[str]
    view: np.ndarray

    @property
    def n(self) -> int:
        return len(self.features)

    def columns(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ROW_COLUMNS}


def parse_rows(features: np.ndarray, labels: np.ndarray, paths: Sequence[str], split: Sequence[str],
               hashes: Sequence[str] | None, layout: Layout, views: Sequence[int] | None = None) -> Rows:
    """Check a batch; features come back in the store's dtype, rounded by numpy (round to nearest even):
    HDF5's own float32 -> float16 conversion was seen to turn -0.9999962 into -0.5 in a chunked write."""
    features = np.asarray(features)
    labels = np.asarray(labels)
    n = len(features)
    hashes = [""] * n if hashes is None else hashes
    views = np.zeros(n, np.int64) if views is None else np.asarray(views)
    if not (n == len(labels) == len(paths) == len(split) == len(hashes) == len(views)):
        raise StoreError(f"Expected equal row counts, got {n} features, {len(labels)} labels, "
                         f"{len(paths)} paths, {len(split)} split values, {len(hashes)} hashes, {len(views)} views")
    if n and (views.dtype.kind not in "iu" or views.min() < 0):
        raise StoreError(f"Expected view indices >= 0 (0: the image itself), got {views.dtype} {views.min()}")
    if features.ndim != 2 or features.shape[1] != layout.feature_dim:
        raise StoreError(f"Expected features of shape (rows, {layout.feature_dim}), got {features.shape}")
    if n and labels.dtype.kind not in "iu":
        raise StoreError(f"Expected integer labels, got dtype {labels.dtype}")
    if n and (labels.min() < 0 or labels.max() >= layout.n_labels):
        raise StoreError(f"Expected labels in 0..{layout.n_labels - 1}, got {labels.min()}..{labels.max()}")
    return Rows(features.astype(layout.dtype, copy=False), labels.astype(np.int64), [str(p) for p in paths],
                [str(s) for s in split], [str(h) for h in hashes], views.astype(np.int64))


def disk_attrs(attrs: dict[str, Any], n_rows: int) -> dict[str, Any]:
    """Attributes as both backends store them: JSON-able scalars; anything nested kept as JSON text."""
    values = {key: plain(_attr_value(value)) for key, value in attrs.items()}
    return {**values, "created": now(), "transfer_flow_version": package_version(), "n_rows": n_rows}


def _attr_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (str, int, float, bool, np.integer, np.floating, np.bool_)):
        return value
    return json.dumps(value, default=str)


def plain(value: Any) -> Any:
    """A numpy scalar or bytes attribute as the Python value it stands for."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
