"""A feature store exported in the formats embedding tools share: parquet, or `.npy` shards with parquet metadata.

- `parquet`: `part_00000.parquet`, ... with one row per image: `path`, `label` (class name), `label_index`,
  `split`, `hash`, `view` (0: the image itself, 1..K its augmented views), and `features` as a fixed-size list of
  float32.
- `npy`: `embeddings/emb_00000.npy` (rows x dim, float32) beside `metadata/metadata_00000.parquet` (the
  same columns but `features`): clip-retrieval's layout, which embedding-reader reads.

Rows keep the store's order; shard N of one folder matches shard N of the other. Every parquet file
carries the class names and the store's attributes as JSON under the schema metadata key `transfer_flow`.
The export is written under a temporary name and renamed into place; an existing one is replaced only
with `overwrite`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel

from transfer_flow.storage.atomic import atomic_path
from transfer_flow.storage.errors import OutputExistsError, StoreError
from transfer_flow.storage.feature_store import (
    STORE_FORMATS,
    FeatureStore,
    open_store,
    read_contents,
    read_features,
)

ExportFormat = Literal["parquet", "npy"]
SCHEMA_KEY = b"transfer_flow"


class ExportResult(BaseModel):
    path: str
    format: ExportFormat
    rows: int
    shards: int


def find_store(path: Path, store_format: str | None = None) -> FeatureStore:
    """The store at `path`: a store itself, or a run's output folder holding one (`store_format` picks
    between two)."""
    path = Path(path)
    if not path.is_dir() or path.suffix == ".zarr":
        return open_store(path)
    formats = [STORE_FORMATS[store_format]] if store_format else list(STORE_FORMATS.values())
    found = [path / f.file_name for f in formats if (path / f.file_name).exists()]
    if not found:
        names = " or ".join(f.file_name for f in formats)
        raise StoreError(f"{path} holds no feature store ({names}); give a run's output folder or a store")
    if len(found) > 1:
        raise StoreError(f"{path} holds {' and '.join(p.name for p in found)}: choose one with --store")
    return open_store(found[0])


def export_store(store: FeatureStore, target: Path, export_format: ExportFormat, *, shard_rows: int = 100_000,
                 overwrite: bool = False) -> ExportResult:
    """Write every row of `store` to the folder `target` in `export_format` (module docstring)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise StoreError("Exporting needs pyarrow: pip install 'transfer-flow[export]'") from None
    if shard_rows < 1:
        raise StoreError(f"Expected at least 1 row per shard, got {shard_rows}")
    target = Path(target)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} already exists (pass --overwrite to replace it)")
    contents = read_contents(store)
    metadata = {"label_names": contents.label_names, "n_rows": store.n_rows, "feature_dim": store.feature_dim,
                "store": store.path, "attrs": contents.attrs}
    columns = {"path": contents.paths, "label": [contents.label_names[i] for i in contents.labels],
               "label_index": contents.labels, "split": contents.split, "hash": contents.hashes,
               "view": contents.view}
    starts = range(0, store.n_rows, shard_rows) if store.n_rows else [0]
    with atomic_path(target, overwrite=overwrite, is_dir=True) as work:
        for shard, start in enumerate(starts):
            stop = min(start + shard_rows, store.n_rows)
            features = read_features(store, np.arange(start, stop))
            table = pa.table({name: values[start:stop] for name, values in columns.items()})
            if export_format == "parquet":
                flat = pa.array(features.reshape(-1), type=pa.float32())
                table = table.append_column("features", pa.FixedSizeListArray.from_arrays(flat, store.feature_dim))
                _write_parquet(pq, table, metadata, work / f"part_{shard:05d}.parquet")
            else:
                (work / "embeddings").mkdir(exist_ok=True)
                (work / "metadata").mkdir(exist_ok=True)
                np.save(work / "embeddings" / f"emb_{shard:05d}.npy", features)
                _write_parquet(pq, table, metadata, work / "metadata" / f"metadata_{shard:05d}.parquet")
    return ExportResult(path=str(target), format=export_format, rows=store.n_rows, shards=len(starts))


def _write_parquet(pq, table, metadata: dict, path: Path) -> None:
    schema_metadata = {**(table.schema.metadata or {}), SCHEMA_KEY: json.dumps(metadata, default=str).encode()}
    pq.write_table(table.replace_schema_metadata(schema_metadata), path)
