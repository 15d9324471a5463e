"""Feature stores: rows of features with their labels, paths, split and content hashes, behind one interface.

This front opens, creates, appends to and reads a store; the format follows the store's name
(`store_format_of`: a path or URL ending in `.zarr` is a zarr v3 group, anything else one HDF5 file)
and each format is one module (formats.py lists them). Both hold the same arrays and attributes
(rows.py), so `open_store(...)` describes either identically and `read_features` always returns float32.

Writing: a store is written under a temporary name beside its target and renamed into place only when
complete, so a reader never sees half a store (places.py: local paths and fsspec URLs). One writer
appends batches with `create_store(...)`; several processes writing disjoint row ranges of one zarr
store use concurrent_zarr.py.

Growing: `appending_to_store(...)` adds rows to a complete local store in place, so a grown dataset costs its
new rows, not a copy of the old ones. Crash safety comes from never touching a committed row's features,
hashes or view, and from a journal: before the first byte changes, `.<name>.appending` records how many rows
were committed, and the store's `manifest_fingerprint` is blanked (no reader takes it for complete); the
attributes written last are the commit, and only then does the journal go. After a kill -9 in between the
store is `interrupted`: `open_store` reports the journal's count as `rows_committed`, and `read_contents` reads
only those rows. A kill mid-write can leave HDF5's own bookkeeping after them inconsistent (its heap of strings,
say), so an interrupted store is never written to again: the next extraction writes a new store from its
committed rows and the shards, and renames it over; if even those rows cannot be read, the journal shows the
store is ours to replace, and its rows are extracted again.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from transfer_flow.storage.atomic import write_json
from transfer_flow.storage.content_keys import content_key
from transfer_flow.storage.errors import StoreError, first_problem
from transfer_flow.storage.extraction_record import ExtractionRecord, read_record
from transfer_flow.storage.feature_store.formats import (
    STORE_FORMATS,
    StoreFormat,
    StoreFormatName,
    store_format_of,
)
from transfer_flow.storage.feature_store.places import LocalPlace, StorePath, place_of, refuse_existing
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
    "SkippedImages", "StoreFormatName", "StorePath", "append_journal", "appending_to_store", "create_store", "is_local",
    "open_store", "read_contents", "read_features", "read_skipped", "reading", "rows_per_chunk", "store_exists",
    "store_format_of",
]


class FeatureStore(BaseModel):
    """A complete feature store on disk: the box the training stage reads."""

    path: str
    n_rows: int
    feature_dim: int
    label_names: list[str]
    attrs: dict[str, Any] = Field(default_factory=dict)
    rows_committed: int | None = Field(
        default=None, description="Rows of the last complete write when an append was interrupted after them "
        "(the rows after these are leftovers); None: every row."
    )

    @property
    def committed(self) -> int:
        """How many rows, from the first, are intact and belong to the store."""
        return self.n_rows if self.rows_committed is None else self.rows_committed

    @property
    def interrupted(self) -> bool:
        """An append into this store did not finish: rows before `committed` are intact, the store is not."""
        return self.rows_committed is not None or self.attrs.get("manifest_fingerprint", "x") == ""

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
        except ValidationError as error:
            raise StoreError(f"{self.path} has an extraction record this version cannot read: "
                             f"{first_problem(error)}") from None
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
    """What `create_store` and `appending_to_store` yield: appends row batches at the end of the store."""

    def __init__(self, arrays: Any, n_rows: int = 0):
        self._arrays = arrays
        self._layout = arrays.layout
        self.n_rows = n_rows

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
    if isinstance(place, LocalPlace):
        append_journal(place.path).unlink(missing_ok=True)  # an interrupted append into the store just replaced


def append_journal(path: StorePath) -> Path:
    """The file that says an append into the local store at `path` is under way, and from which row."""
    path = Path(path)
    return path.parent / f".{path.name}.appending"


class StoreAppender(FeatureWriter):
    """What `appending_to_store` yields: appends after the committed rows, and may relabel those rows."""

    def relabel(self, labels: np.ndarray, split: Sequence[str]) -> None:
        """New labels and split of the committed rows (a class renamed, a small class's test image moved);
        their features, paths, hashes and views stay."""
        if len(labels) != len(split) or len(labels) > self.n_rows:
            raise StoreError(f"Expected labels and split of at most {self.n_rows} rows, got {len(labels)}, "
                             f"{len(split)}")
        labels = np.asarray(labels, np.int64)
        if len(labels) and (labels.min() < 0 or labels.max() >= self._layout.n_labels):
            raise StoreError(f"Expected labels in 0..{self._layout.n_labels - 1}, got {labels.min()}..{labels.max()}")
        self._arrays.write_columns(0, {"labels": labels, "split": [str(v) for v in split]})


@contextlib.contextmanager
def appending_to_store(path: StorePath, *, attrs: dict[str, Any]) -> Iterator[StoreAppender]:
    """Grow the complete local store at `path` in place; `attrs` replace its attributes on commit.

    On an error the store is put back as it was. After a kill the journal marks it interrupted: its committed
    rows are still read, but it is never appended to again, only rewritten (see the module doc).
    """
    store_format = store_format_of(path)
    place = place_of(path, store_format)
    store = open_store(path)
    if not isinstance(place, LocalPlace) or store.interrupted:
        raise StoreError(f"Expected a complete local store to append to, got {path}")
    journal = append_journal(place.path)
    write_json(journal, {"rows_committed": store.n_rows})  # before the first byte of the store changes
    arrays = store_format.backend().open_for_append(place.uri)
    try:
        arrays.set_attrs({"manifest_fingerprint": ""})  # not complete from here until the commit
        arrays.flush()
        writer = StoreAppender(arrays, store.n_rows)
        try:
            yield writer
        except BaseException:
            arrays.resize(store.n_rows)  # as it was; should this fail too, the journal stays and the next run
            arrays.set_attrs(store.attrs)  # rewrites the store from its committed rows
            arrays.flush()
            journal.unlink()
            raise
        arrays.flush()  # the rows are on disk before the attributes that commit them
        arrays.set_attrs(disk_attrs(attrs, writer.n_rows))
    finally:
        arrays.close()
    journal.unlink()


# --- Reading -------------------------------------------------------------------------------------------------


def is_local(path: StorePath) -> bool:
    """A path on this machine (not an object-store URL): where a store can grow in place."""
    return isinstance(place_of(path), LocalPlace)


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
        attrs = reader.attrs()
        return FeatureStore(path=place.uri, n_rows=n_rows, feature_dim=feature_dim,
                            label_names=reader.strings("label_names"), attrs=attrs,
                            rows_committed=_rows_committed(place, n_rows, attrs))


def _rows_committed(place: Any, n_rows: int, attrs: dict[str, Any]) -> int | None:
    """The journal's count while an append is under way or was interrupted; the count the last commit wrote
    when the store is marked incomplete without one; else every row."""
    if isinstance(place, LocalPlace):
        journal = append_journal(place.path)
        try:
            return min(n_rows, int(json.loads(journal.read_text())["rows_committed"]))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise StoreError(f"{journal} (an interrupted append's journal) is unreadable: {error}") from None
    if attrs.get("manifest_fingerprint", "x") == "" and "n_rows" in attrs:
        return min(n_rows, int(attrs["n_rows"]))
    return None


def read_contents(store: FeatureStore) -> StoreContents:
    """Every column but the features, of the store's committed rows (all of them unless an append was interrupted:
    the rows it left after them are not read, so what it left half-written is never touched)."""
    n = store.committed
    with reading(store.path) as reader:
        def strings(name: str) -> list[str]:
            return reader.strings(name, n) if reader.has(name) else [""] * n

        return StoreContents(labels=reader.labels(n), label_names=reader.strings("label_names"),
                             paths=strings("paths"), split=strings("split"), hashes=strings("hashes"),
                             view=reader.views(n), attrs=reader.attrs())


def read_skipped(store: FeatureStore) -> SkippedImages:
    """The images that are not rows of the store, with why. A store written before the skipped arrays
    existed kept them as JSON (hash -> reason) in its `skipped` attribute; their paths read as ""."""
    with reading(store.path) as reader:
        if reader.has(SKIPPED_COLUMNS[0]):
            return SkippedImages(*(reader.strings(name) for name in SKIPPED_COLUMNS))
    reasons = json.loads(store.attrs.get("skipped") or "{}")
    return SkippedImages([""] * len(reasons), list(reasons), list(reasons.values()))


def read_features(store: FeatureStore, rows: np.ndarray) -> np.ndarray:
    """Features of the given row indices (any order, repeats allowed), as float32. A row holding NaN or inf is
    refused (StoreError, naming its images): extraction never stores one, so the store was damaged or altered."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) == 0:
        return np.empty((0, store.feature_dim), dtype=np.float32)
    unique, inverse = np.unique(rows, return_inverse=True)
    with reading(store.path) as reader:
        values = np.asarray(reader.rows(unique), dtype=np.float32)
        if not np.isfinite(values).all():
            bad = unique[~np.isfinite(values).all(axis=1)]
            paths = reader.strings("paths") if reader.has("paths") else []
            named = ", ".join(paths[i] if i < len(paths) and paths[i] else f"row {i}" for i in bad[:3].tolist())
            raise StoreError(f"{store.path} holds NaN or inf features in {len(bad)} of the rows read ({named}"
                             f"{', ...' if len(bad) > 3 else ''}): the store was damaged or altered: extract its rows "
                             "anew (--refresh extract)")
    return values if len(unique) == len(rows) and (unique == rows).all() else values[inverse]
