import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from storage.errors import OutputExistsError, StoreError
from storage.feature_store import create_store, open_store, read_contents, read_features, rows_per_chunk

SHARED = Path(__file__).resolve().parents[3] / "shared"
ATTRS = {"backbone": "vgg16", "image_size": 32, "pooling": "avg", "nested": {"a": 1}}


def write_store(path: Path, n: int = 10, dim: int = 6, batches: int = 3, **kwargs):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(n, dim)).astype(np.float32)
    labels = np.arange(n) % 2
    paths = [f"c{label}/img{i}.png" for i, label in enumerate(labels)]
    split = ["train" if i < n - 3 else "test" for i in range(n)]
    with create_store(path, feature_dim=dim, label_names=["cat", "dog"], attrs=ATTRS, **kwargs) as writer:
        for part in np.array_split(np.arange(n), batches):
            writer.append(features[part], labels[part], [paths[i] for i in part], [split[i] for i in part])
    return features, labels, paths, split


def test_round_trip_keeps_rows_dtypes_chunks_and_attrs(tmp_path):
    path = tmp_path / "features.h5"
    features, labels, paths, split = write_store(path, n=10, dim=6, batches=3)
    store = open_store(path)
    assert (store.n_rows, store.feature_dim, store.label_names) == (10, 6, ["cat", "dog"])
    assert store.attrs["backbone"] == "vgg16" and store.attrs["image_size"] == 32
    assert store.attrs["nested"] == '{"a": 1}'
    assert store.attrs["n_rows"] == 10 and store.attrs["transfer_flow_version"]
    contents = read_contents(store)
    assert contents.paths == paths and contents.split == split
    np.testing.assert_array_equal(contents.labels, labels)
    np.testing.assert_array_equal(read_features(store, np.array([7, 2, 5])), features[[7, 2, 5]])
    with h5py.File(path) as file:
        assert file["features"].dtype == np.float32
        assert file["features"].chunks == (rows_per_chunk(6), 6)
        assert file["labels"].dtype.kind == "i"


def test_chunks_stay_near_one_mebibyte_for_wide_features():
    assert rows_per_chunk(25088) * 25088 * 4 <= 1 << 20
    assert rows_per_chunk(10**7) == 1


def test_failed_write_leaves_nothing_under_the_final_name(tmp_path):
    path = tmp_path / "features.h5"
    with pytest.raises(RuntimeError):
        with create_store(path, feature_dim=4, label_names=["a", "b"], attrs={}) as writer:
            writer.append(np.zeros((2, 4), np.float32), np.array([0, 1]), ["a/1", "b/1"], ["train", "train"])
            raise RuntimeError("crash mid-write")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary is cleaned up too


def test_store_is_not_visible_until_complete(tmp_path):
    path = tmp_path / "features.h5"
    with create_store(path, feature_dim=4, label_names=["a", "b"], attrs={}) as writer:
        writer.append(np.zeros((1, 4), np.float32), np.array([0]), ["a/1"], ["train"])
        assert not path.exists()
    assert path.exists()


def test_existing_store_is_refused_without_overwrite_and_replaced_with_it(tmp_path):
    path = tmp_path / "features.h5"
    write_store(path, n=10)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_store(path, n=4)
    assert open_store(path).n_rows == 10
    write_store(path, n=4, overwrite=True)
    assert open_store(path).n_rows == 4


def test_mismatched_row_counts_are_refused(tmp_path):
    with pytest.raises(StoreError, match="equal row counts"):
        with create_store(tmp_path / "f.h5", feature_dim=2, label_names=["a"], attrs={}) as writer:
            writer.append(np.zeros((2, 2), np.float32), np.array([0]), ["a/1", "a/2"], ["train", "train"])


def test_open_store_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nope.h5")
    with h5py.File(tmp_path / "other.h5", "w") as file:
        file["x"] = [1, 2]
    with pytest.raises(StoreError, match="no 'features'"):
        open_store(tmp_path / "other.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(StoreError, match="not a readable HDF5"):
        open_store(tmp_path / "text.h5")


@pytest.mark.skipif(not (SHARED / "baseline" / "seed_pipeline.py").is_file(), reason="../shared/baseline is not beside this checkout")
def test_classic_recipe_training_step_reads_our_store(tmp_path):
    rng = np.random.default_rng(1)
    n, dim = 60, 5
    labels = np.arange(n) % 2
    features = (rng.normal(size=(n, dim)) + labels[:, None] * 4).astype(np.float32)  # separable
    with create_store(tmp_path / "features.h5", feature_dim=dim, label_names=["cat", "dog"], attrs=ATTRS) as writer:
        writer.append(features, labels, [f"x/{i}" for i in range(n)], ["train"] * n)
    done = subprocess.run([sys.executable, str(SHARED / "baseline" / "seed_pipeline.py"), "train",
                           str(tmp_path / "features.h5")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "cat" in done.stdout and "dog" in done.stdout
    assert float(done.stdout.strip().splitlines()[-1].split(":")[1]) == 1.0
