"""Exports read back by the libraries their users hold: pandas and pyarrow, and numpy for .npy shards."""
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from transfer_flow.storage.errors import OutputExistsError, StoreError
from transfer_flow.storage.export import export_store, find_store
from transfer_flow.storage.feature_store import STORE_FORMATS, create_store, open_store

VIEWS = [0, 1, 2, 0, 0, 0, 0]  # rows 1 and 2: augmented views (--augment)


def write_store(path, n=7, dim=4):
    rng = np.random.default_rng(3)
    features = rng.normal(size=(n, dim)).astype(np.float32)
    labels = np.array([i % 3 for i in range(n)])
    paths = [f"c{label}/ïmg{i}.png" for i, label in enumerate(labels)]
    split = ["train" if i < n - 2 else "test" for i in range(n)]
    hashes = [f"h{i}" for i in range(n)]
    with create_store(path, feature_dim=dim, label_names=["ant", "bee", "cat"], attrs={"backbone": "vgg16"}) as w:
        w.append(features, labels, paths, split, hashes, views=VIEWS[:n])
    return features, labels, paths, split, hashes


@pytest.fixture(params=list(STORE_FORMATS))
def store(request, tmp_path):
    path = tmp_path / "run" / STORE_FORMATS[request.param].file_name
    path.parent.mkdir()
    return path, write_store(path)


def test_parquet_round_trips_rows_labels_and_paths(store, tmp_path):
    path, (features, labels, paths, split, hashes) = store
    result = export_store(open_store(path), tmp_path / "out", "parquet", shard_rows=3)
    assert (result.rows, result.shards) == (7, 3)
    frame = pd.read_parquet(tmp_path / "out")  # the folder of shards, as pandas reads a dataset
    assert frame["path"].tolist() == paths and frame["split"].tolist() == split and frame["hash"].tolist() == hashes
    assert frame["label"].tolist() == [["ant", "bee", "cat"][i] for i in labels]
    assert frame["label_index"].tolist() == labels.tolist() and frame["view"].tolist() == VIEWS
    np.testing.assert_array_equal(np.stack(frame["features"].to_numpy()), features)
    schema = pq.read_schema(tmp_path / "out" / "part_00000.parquet")
    column = schema.field("features").type
    assert pa.types.is_fixed_size_list(column) and (column.list_size, column.value_type) == (4, pa.float32())
    carried = json.loads(schema.metadata[b"transfer_flow"])
    assert carried["label_names"] == ["ant", "bee", "cat"] and carried["attrs"]["backbone"] == "vgg16"


def test_npy_shards_line_up_with_their_metadata(store, tmp_path):
    path, (features, labels, paths, split, hashes) = store
    export_store(open_store(path), tmp_path / "out", "npy", shard_rows=4)
    shards = sorted((tmp_path / "out" / "embeddings").glob("*.npy"))
    metadata = sorted((tmp_path / "out" / "metadata").glob("*.parquet"))
    assert [p.name for p in shards] == ["emb_00000.npy", "emb_00001.npy"]
    assert [p.name for p in metadata] == ["metadata_00000.parquet", "metadata_00001.parquet"]
    np.testing.assert_array_equal(np.concatenate([np.load(p) for p in shards]), features)
    frame = pd.concat([pd.read_parquet(p) for p in metadata], ignore_index=True)
    assert frame["path"].tolist() == paths and "features" not in frame
    assert [len(np.load(s)) for s in shards] == [len(pd.read_parquet(m)) for m in metadata]


def test_an_existing_export_is_not_overwritten_silently(store, tmp_path):
    path = store[0]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_store(open_store(path), tmp_path / "out", "parquet")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]
    export_store(open_store(path), tmp_path / "out", "parquet", overwrite=True)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["part_00000.parquet"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_run_folder_with_two_stores_needs_a_choice(tmp_path):
    write_store(tmp_path / "features.h5")
    write_store(tmp_path / "features.zarr")
    with pytest.raises(StoreError, match="--store"):
        find_store(tmp_path)
    assert find_store(tmp_path, "zarr").path.endswith("features.zarr")
    with pytest.raises(StoreError, match="holds no feature store"):
        (tmp_path / "empty").mkdir()
        find_store(tmp_path / "empty")
