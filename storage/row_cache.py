"""Feature rows by image content hash, for one set of extraction settings: what makes extraction
incremental and resumable.

Rows come from two places: the previous complete store (when it was made with the same settings)
and shard files that a run commits as it goes (`<store>.<key>.parts/shard-<content>.h5`, each written
atomically, by the flow's process or by Dask workers). After `kill -9` the committed shards survive,
so the next run extracts only what is missing; once a new store is complete the shards are removed.
A row is named by `row_key`: the image's content hash, and `hash#v` for its augmented view v.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np

from transfer_flow.storage.atomic import atomic_path
from transfer_flow.storage.errors import StoreError
from transfer_flow.storage.feature_store import FeatureStore, open_store, read_contents, read_features, read_skipped

SHARD_PATTERN = "shard-*.h5"


def row_key(content_hash: str, view: int) -> str:
    """How the cache names a row: the content hash for the image itself, `hash#v` for its view v."""
    return content_hash if view == 0 else f"{content_hash}#{view}"


class RowCache:
    """Index of cached rows (hash → file, row) and known-broken images (hash → reason)."""

    def __init__(self, parts_dir: Path, feature_dim: int):
        self.parts_dir = Path(parts_dir)
        self.feature_dim = feature_dim
        self.rows: dict[str, tuple[str, int]] = {}  # hash → (store or shard, row)
        self.skipped: dict[str, str] = {}
        self._stores: dict[str, FeatureStore] = {}  # the previous store, read through the store interface

    def load(self, previous_store: str | None) -> "RowCache":
        """Index the previous store (HDF5 or zarr, if given) and every committed shard; stale temporaries go."""
        if previous_store is not None:
            store = open_store(previous_store)
            if store.feature_dim == self.feature_dim:  # another width cannot be these settings' rows
                try:
                    contents = read_contents(store)  # the committed rows only
                    skipped = read_skipped(store).reasons_by_hash()
                except (StoreError, OSError, ValueError):
                    if not store.interrupted:
                        raise
                    contents = None  # a kill mid-append broke even those: they are extracted again
                if contents is not None:
                    for row, (digest, view) in enumerate(zip(contents.hashes, contents.view.tolist())):
                        if digest:
                            self.rows.setdefault(row_key(digest, view), (previous_store, row))
                    self.skipped.update(skipped)
                    self._stores[previous_store] = store
        for shard in self.shards():
            with h5py.File(shard, "r") as file:
                for row, digest in enumerate(file["hashes"].asstr()[:]):
                    self.rows.setdefault(digest, (str(shard), row))
                self.skipped.update(json.loads(file.attrs.get("skipped", "{}")))
        if self.parts_dir.is_dir():
            for stale in self.parts_dir.glob(".*.tmp"):  # left by a killed run; we hold the output lock
                shutil.rmtree(stale, ignore_errors=True)
        return self

    def shards(self) -> list[Path]:
        return sorted(self.parts_dir.glob(SHARD_PATTERN)) if self.parts_dir.is_dir() else []

    def commit_shard(self, hashes: Sequence[str], features: np.ndarray, skipped: dict[str, str]) -> Path:
        """Write one shard atomically and index it. Named for its content, so concurrent workers never clash
        and a retried shard replaces its own earlier copy."""
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256("\n".join([*hashes, "--", *sorted(skipped)]).encode()).hexdigest()[:16]
        target = self.parts_dir / f"shard-{name}.h5"
        with atomic_path(target, overwrite=True) as tmp:
            with h5py.File(tmp, "w") as file:
                file.create_dataset(
                    "features", data=np.asarray(features, dtype=np.float32).reshape(-1, self.feature_dim)
                )
                file.create_dataset("hashes", data=np.array(list(hashes), dtype=object), dtype=h5py.string_dtype())
                file.attrs["skipped"] = json.dumps(skipped)
        for row, digest in enumerate(hashes):
            self.rows.setdefault(digest, (str(target), row))
        self.skipped.update(skipped)
        return target

    def gather(self, hashes: Sequence[str], block_rows: int) -> Iterator[np.ndarray]:
        """Features for `hashes`, in that order, a block at a time (memory: one block)."""
        shard_files: dict[str, h5py.File] = {}

        def read(source: str, rows: np.ndarray) -> np.ndarray:
            if source in self._stores:
                return read_features(self._stores[source], rows)
            if source not in shard_files:
                shard_files[source] = h5py.File(source, "r")
            return shard_files[source]["features"][rows]  # increasing indices, as h5py requires

        try:
            for start in range(0, len(hashes), block_rows):
                block = hashes[start:start + block_rows]
                out = np.empty((len(block), self.feature_dim), dtype=np.float32)
                by_source: dict[str, list[tuple[int, int]]] = defaultdict(list)
                for position, digest in enumerate(block):
                    source, row = self.rows[digest]
                    by_source[source].append((row, position))
                for source, wanted in by_source.items():
                    rows = np.array(sorted({row for row, _ in wanted}))
                    values = read(source, rows)
                    lookup = {row: i for i, row in enumerate(rows)}
                    for row, position in wanted:
                        out[position] = values[lookup[row]]
                yield out
        finally:
            for handle in shard_files.values():
                handle.close()

    def clear(self) -> None:
        shutil.rmtree(self.parts_dir, ignore_errors=True)

    def clear_other_settings(self) -> list[tuple[Path, int]]:
        """Remove the shards that killed runs with other settings left beside the same store: a store under
        this cache's settings is now complete, so their rows belong to no store. Returns (folder, bytes) of each.
        """
        store_name = self.parts_dir.name.rsplit(".", 2)[0]  # `features.h5.<key>.parts` → `features.h5`
        removed = []
        for other in sorted(self.parts_dir.parent.glob(f"{store_name}.*.parts")):
            if other != self.parts_dir and other.is_dir():
                size = sum(f.stat().st_size for f in other.rglob("*") if f.is_file())
                shutil.rmtree(other, ignore_errors=True)
                removed.append((other, size))
        return removed
