"""One contract both feature-store backends pass (HDF5 file, zarr directory), then what only zarr promises."""
import json
import multiprocessing
import subprocess
import sys
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import dask.array
import fsspec
import h5py
import numpy as np
import pytest
import xarray as xr
import zarr

from transfer_flow.storage.errors import OutputExistsError, StoreError
from transfer_flow.storage.feature_store import (
    STORE_FORMATS,
    SkippedImages,
    create_store,
    open_store,
    read_contents,
    read_features,
    read_skipped,
    rows_per_chunk,
    store_format_of,
)
from transfer_flow.storage.feature_store.concurrent_zarr import (
    commit_store,
    discard_store,
    preallocate_zarr_store,
    write_rows,
)

SHARED = Path(__file__).resolve().parents[3] / "shared"
ATTRS = {"backbone": "vgg16", "image_size": 32, "pooling": "avg", "nested": {"a": 1}, "none": None,
         "flag": True, "scale": np.float32(0.1)}


def make_rows(n: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, dim)).astype(np.float32)
    labels = np.arange(n) % 2
    paths = [f"c{label}/img{i}-é.png" for i, label in enumerate(labels)]
    split = ["train" if i < n - 3 else "test" for i in range(n)]
    hashes = [f"h{i:04d}" for i in range(n)]
    return features, labels, paths, split, hashes


def write_store(path, n: int = 10, dim: int = 6, batches: int = 3, **kwargs):
    features, labels, paths, split, hashes = rows = make_rows(n, dim)
    with create_store(path, feature_dim=dim, label_names=["cat", "dog"], attrs=ATTRS, **kwargs) as writer:
        for part in np.array_split(np.arange(n), batches):
            writer.append(features[part], labels[part], [paths[i] for i in part], [split[i] for i in part],
                          [hashes[i] for i in part])
        assert writer.n_rows == n
    return rows


def raw_features(path: Path) -> dict:
    """The features array as each library sees it, bypassing our reader."""
    if path.suffix == ".zarr":
        group = zarr.open_group(path, mode="r")
        array = group["features"]
        return {"dtype": array.dtype, "chunks": array.chunks, "labels": group["labels"].dtype,
                "bytes": array.nbytes_stored()}
    with h5py.File(path) as file:
        array = file["features"]
        return {"dtype": array.dtype, "chunks": array.chunks, "labels": file["labels"].dtype,
                "bytes": array.id.get_storage_size()}


def write_foreign(path: Path) -> None:
    """Data of the right format that is not a feature store."""
    if path.suffix == ".zarr":
        zarr.open_group(path, mode="w").create_array("x", data=np.array([1, 2]))
    else:
        with h5py.File(path, "w") as file:
            file["x"] = [1, 2]


@pytest.fixture(params=list(STORE_FORMATS))
def backend(request) -> str:
    return request.param


@pytest.fixture
def store_path(tmp_path, backend) -> Path:
    return tmp_path / STORE_FORMATS[backend].file_name


class TestFeatureStoreContract:
    """Everything a caller may rely on, whichever backend the store's name picks."""

    def test_name_picks_the_backend(self, store_path, backend):
        assert store_format_of(store_path).name == backend

    def test_round_trip_keeps_rows_dtypes_chunks_and_attrs(self, store_path):
        features, labels, paths, split, hashes = write_store(store_path, n=10, dim=6, batches=3)
        store = open_store(store_path)
        assert (store.path, store.n_rows, store.feature_dim, store.label_names) == (
            str(store_path),
            10,
            6,
            ["cat", "dog"],
        )
        assert store.attrs["backbone"] == "vgg16" and store.attrs["image_size"] == 32
        assert store.attrs["nested"] == '{"a": 1}' and store.attrs["none"] == "" and store.attrs["flag"] is True
        assert store.attrs["n_rows"] == 10 and store.attrs["transfer_flow_version"] and store.attrs["created"]
        contents = read_contents(store)
        assert (contents.paths, contents.split, contents.hashes) == (paths, split, hashes)
        assert contents.label_names == ["cat", "dog"] and contents.attrs == store.attrs
        np.testing.assert_array_equal(contents.labels, labels)
        assert contents.labels.dtype == np.int64
        got = read_features(store, np.array([7, 2, 5, 2]))  # any order, repeats allowed
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, features[[7, 2, 5, 2]])
        np.testing.assert_array_equal(read_features(store, np.arange(10)), features)
        assert read_features(store, np.array([], dtype=int)).shape == (0, 6)
        raw = raw_features(store_path)
        assert (raw["dtype"], raw["chunks"], raw["labels"]) == (np.float32, (rows_per_chunk(6), 6), np.int64)

    def test_failed_write_leaves_nothing_under_the_final_name(self, store_path, tmp_path):
        with pytest.raises(RuntimeError):
            with create_store(store_path, feature_dim=4, label_names=["a", "b"], attrs={}) as writer:
                writer.append(np.zeros((2, 4), np.float32), np.array([0, 1]), ["a/1", "b/1"], ["train", "train"])
                raise RuntimeError("crash mid-write")
        assert not store_path.exists()
        assert list(tmp_path.iterdir()) == []  # the temporary is cleaned up too

    def test_store_is_not_visible_until_complete(self, store_path, tmp_path):
        with create_store(store_path, feature_dim=4, label_names=["a", "b"], attrs={}) as writer:
            writer.append(np.zeros((1, 4), np.float32), np.array([0]), ["a/1"], ["train"])
            assert not store_path.exists()
            with pytest.raises(StoreError, match="does not exist"):
                open_store(store_path)
        assert [p.name for p in tmp_path.iterdir()] == [store_path.name]
        assert open_store(store_path).n_rows == 1

    def test_existing_store_is_refused_without_overwrite_and_replaced_with_it(self, store_path):
        write_store(store_path, n=10)
        with pytest.raises(OutputExistsError, match="--overwrite"):
            write_store(store_path, n=4)
        assert open_store(store_path).n_rows == 10
        write_store(store_path, n=4, overwrite=True)
        assert open_store(store_path).n_rows == 4
        assert [p.name for p in store_path.parent.iterdir()] == [store_path.name]

    @pytest.mark.parametrize("features, labels, paths, message", [
        (np.zeros((2, 2)), np.array([0]), ["a/1", "a/2"], "equal row counts"),
        (np.zeros((2, 3)), np.array([0, 0]), ["a/1", "a/2"], r"shape \(rows, 2\)"),
        (np.zeros((2, 2)), np.array([0, 1]), ["a/1", "a/2"], r"labels in 0..0, got 0..1"),
        (np.zeros((2, 2)), np.array([0.0, 0.0]), ["a/1", "a/2"], "integer labels"),
    ])
    def test_malformed_rows_are_refused(self, store_path, features, labels, paths, message):
        with pytest.raises(StoreError, match=message):
            with create_store(store_path, feature_dim=2, label_names=["a"], attrs={}) as writer:
                writer.append(features, labels, paths, ["train"] * len(paths))
        assert not store_path.exists()

    def test_open_store_rejects_missing_and_foreign_data(self, store_path, tmp_path):
        with pytest.raises(StoreError, match="does not exist"):
            open_store(store_path)
        write_foreign(store_path)
        with pytest.raises(StoreError, match="no 'features'"):
            open_store(store_path)
        text = tmp_path / f"text{store_path.suffix}"
        text.write_text("not a store")
        with pytest.raises(StoreError, match="is not a readable"):
            open_store(text)

    def test_float16_storage_halves_feature_bytes_and_reads_back_as_float32(self, tmp_path, backend):
        dim = 1024  # float32 chunks of 256 rows, float16 of 512: 1024 rows fill both exactly
        suffix = Path(STORE_FORMATS[backend].file_name).suffix
        full, half = tmp_path / f"full{suffix}", tmp_path / f"half{suffix}"
        features = write_store(full, n=1024, dim=dim, batches=3)[0]
        write_store(half, n=1024, dim=dim, batches=3, dtype="float16")
        assert raw_features(half)["dtype"] == np.float16
        assert raw_features(half)["chunks"] == (rows_per_chunk(dim, np.float16), dim) == (512, dim)
        ratio = raw_features(half)["bytes"] / raw_features(full)["bytes"]
        assert 0.45 < ratio < 0.55
        got = read_features(open_store(half), np.arange(1024))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, features.astype(np.float16).astype(np.float32))
        np.testing.assert_allclose(got, features, rtol=2 ** -11, atol=2 ** -24)

    def test_feature_dtypes_other_than_float32_and_float16_are_refused(self, store_path):
        with pytest.raises(StoreError, match="Expected a feature dtype"):
            with create_store(store_path, feature_dim=2, label_names=["a"], attrs={}, dtype="int8"):
                pass
        assert not store_path.exists()


def test_attrs_are_identical_across_backends(tmp_path):
    write_store(tmp_path / "a.h5")
    write_store(tmp_path / "a.zarr")
    h5, zr = open_store(tmp_path / "a.h5"), open_store(tmp_path / "a.zarr")
    drop_created = lambda attrs: {k: v for k, v in attrs.items() if k != "created"}  # noqa: E731
    assert drop_created(h5.attrs) == drop_created(zr.attrs)
    assert {k: type(v) for k, v in h5.attrs.items()} == {k: type(v) for k, v in zr.attrs.items()}
    assert h5.fingerprint() == zr.fingerprint()
    assert read_contents(h5).model_dump(exclude={"labels", "view", "attrs"}) == read_contents(zr).model_dump(
        exclude={"labels", "view", "attrs"}
    )
    np.testing.assert_array_equal(read_contents(h5).view, read_contents(zr).view)


XARRAY_OPEN = {"zarr": xr.open_zarr, "hdf5": lambda path: xr.open_dataset(path, engine="h5netcdf")}


@pytest.mark.filterwarnings("error")  # "missing dimension_names", phony_dim_*, unconsolidated metadata: all fail
@pytest.mark.parametrize("backend", list(STORE_FORMATS))
def test_xarray_opens_a_store_with_named_dimensions(tmp_path, backend):
    path = tmp_path / STORE_FORMATS[backend].file_name
    features, labels, paths, split, hashes = write_store(path, n=7, dim=5)
    with XARRAY_OPEN[backend](path) as dataset:
        assert dict(dataset.sizes) == {"image": 7, "feature": 5, "class": 2, "skipped": 0}
        assert dataset["features"].dims == ("image", "feature")
        assert {name: dataset[name].dims for name in ("labels", "paths", "split", "hashes", "label_names")} == {
            "labels": ("image",), "paths": ("image",), "split": ("image",), "hashes": ("image",),
            "label_names": ("class",)}
        np.testing.assert_array_equal(dataset["features"].values, features)
        np.testing.assert_array_equal(dataset["labels"].values, labels)
        assert dataset["paths"].values.tolist() == paths and dataset["split"].values.tolist() == split
        assert dataset["label_names"].values.tolist() == ["cat", "dog"]
        assert dataset.attrs["backbone"] == "vgg16"
        # What a user does next: the class name of each image, by dimension name.
        named = dataset["label_names"].isel({"class": dataset["labels"]})
        assert named.dims == ("image",) and named.values.tolist() == ["cat", "dog"] * 3 + ["cat"]


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("backend", list(STORE_FORMATS))
def test_skipped_images_are_arrays_a_table_reader_sees(tmp_path, backend):
    path = tmp_path / STORE_FORMATS[backend].file_name
    skipped = SkippedImages(["red/empty.jpg", "blue/é.png"], ["h1", "h2"], ["empty file", "not an image: PNG"])
    features, labels, paths, split, hashes = make_rows(4, 3)
    with create_store(path, feature_dim=3, label_names=["cat", "dog"], attrs=ATTRS) as writer:
        writer.append(features, labels, paths, split, hashes)
        writer.record_skipped(skipped)
    assert read_skipped(open_store(path)) == skipped
    with XARRAY_OPEN[backend](path) as dataset:
        table = dataset[["skipped_paths", "skipped_reasons"]].to_dataframe()
        assert table["skipped_paths"].tolist() == skipped.paths
        assert table["skipped_reasons"].tolist() == skipped.reasons
        assert dataset.sizes["image"] == 4


def test_skipped_images_of_a_store_written_before_the_arrays_read_from_its_attribute(tmp_path):
    with h5py.File(tmp_path / "old.h5", "w") as file:
        file["features"] = np.ones((1, 2), dtype=np.float32)
        file["labels"] = np.array([0])
        file["label_names"] = np.array(["cat"], dtype=object)
        file.attrs["skipped"] = json.dumps({"h9": "truncated JPEG"})
    assert read_skipped(open_store(tmp_path / "old.h5")) == SkippedImages([""], ["h9"], ["truncated JPEG"])


@pytest.mark.filterwarnings("error")
def test_a_store_filled_by_concurrent_writers_opens_in_xarray(tmp_path):
    features, labels, paths, split, hashes = make_rows(6, 3)
    tmp = preallocate_zarr_store(tmp_path / "c.zarr", n_rows=6, feature_dim=3, label_names=["cat", "dog"], attrs={})
    write_rows(tmp, 0, features, labels, paths, split, hashes)
    commit_store(tmp, tmp_path / "c.zarr")
    with xr.open_zarr(tmp_path / "c.zarr") as dataset:
        np.testing.assert_array_equal(dataset["features"].values, features)
        assert "created" in dataset.attrs  # set at commit, and seen: the consolidated metadata is current


def test_stores_without_dimension_names_still_open(tmp_path):
    """The classic layout as written before dimensions were named: plain datasets, no scales."""
    with h5py.File(tmp_path / "old.h5", "w") as file:
        file["features"] = np.ones((3, 2), dtype=np.float32)
        file["labels"] = np.array([0, 1, 0])
        file["label_names"] = np.array(["cat", "dog"], dtype=object)
    old = zarr.open_group(tmp_path / "old.zarr", mode="w", zarr_format=3)
    old.create_array("features", data=np.ones((3, 2), dtype=np.float32))
    old.create_array("labels", data=np.array([0, 1, 0]))
    old.create_array("label_names", shape=(2,), dtype=str)[:] = ["cat", "dog"]
    for path in (tmp_path / "old.h5", tmp_path / "old.zarr"):
        store = open_store(path)
        assert (store.n_rows, store.feature_dim, store.label_names) == (3, 2, ["cat", "dog"])
        assert read_contents(store).paths == ["", "", ""]
        np.testing.assert_array_equal(read_features(store, np.array([2, 0])), np.ones((2, 2)))


def test_classic_h5py_reader_sees_only_the_classic_arrays_it_asks_for(tmp_path):
    features, labels = write_store(tmp_path / "f.h5", n=5)[:2]
    with h5py.File(tmp_path / "f.h5", "r") as file:  # the classic recipe's reader: arrays by name
        np.testing.assert_array_equal(file["features"][:], features)
        np.testing.assert_array_equal(file["labels"][:], labels)
        assert [name.decode() for name in file["label_names"][:]] == ["cat", "dog"]
        assert [scale.name for scale in file["features"].dims[0].values()] == ["/image"]


def test_chunks_stay_near_one_mebibyte_for_wide_features():
    assert rows_per_chunk(25088) * 25088 * 4 <= 1 << 20
    assert rows_per_chunk(10**7) == 1


@pytest.mark.parametrize("path, backend", [
    ("x.zarr", "zarr"), ("runs/x.zarr/", "zarr"), ("s3://bucket/x.zarr", "zarr"), ("x.h5", "hdf5"), ("x", "hdf5"),
    ("x.zarr.h5", "hdf5"),
])
def test_backend_is_chosen_by_the_name(path, backend):
    assert store_format_of(path).name == backend


def test_remote_hdf5_is_refused():
    with pytest.raises(StoreError, match="Expected a local path for an HDF5"):
        open_store("memory://bucket/features.h5")


# --- zarr only -------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("error")
def test_dask_reads_a_zarr_store(tmp_path):
    features = write_store(tmp_path / "f.zarr", n=600, dim=1024)[0]
    lazy = dask.array.from_zarr(str(tmp_path / "f.zarr"), component="features")
    assert lazy.chunks[0] == (256, 256, 88)
    np.testing.assert_array_equal(lazy.compute(), features)


def test_file_and_fsspec_urls_reach_the_zarr_backend(tmp_path):
    rows = write_store(f"file://{tmp_path}/local.zarr", n=5)
    assert open_store(tmp_path / "local.zarr").n_rows == 5
    url = f"memory://transfer-flow-test-{uuid.uuid4().hex}/f.zarr"  # an fsspec filesystem in this process
    try:
        write_store(url, n=7)
        store = open_store(url)
        assert store.path == url and store.n_rows == 7
        np.testing.assert_array_equal(read_features(store, np.arange(5)), rows[0][:5])
        with pytest.raises(OutputExistsError):
            write_store(url, n=3)
        write_store(url, n=3, overwrite=True)
        assert open_store(url).n_rows == 3
        assert [p.rsplit("/", 1)[1] for p in fsspec.filesystem("memory").ls(url.rsplit("/", 1)[0], detail=False)] == [
            "f.zarr"
        ]
    finally:
        fsspec.filesystem("memory").rm(url.rsplit("/", 1)[0], recursive=True)


def test_processes_writing_disjoint_aligned_ranges_lose_nothing(tmp_path):
    dim, chunk = 4096, 64  # 64-row chunks: many chunks for little data
    n = 20 * chunk + 17  # the last range ends mid-chunk
    features, labels, paths, split, hashes = make_rows(n, dim, seed=3)
    target = tmp_path / "f.zarr"
    tmp = preallocate_zarr_store(target, n_rows=n, feature_dim=dim, label_names=["cat", "dog"], attrs=ATTRS)
    assert rows_per_chunk(dim) == chunk and not target.exists()
    starts = list(range(0, n, chunk))
    order = starts[::2] + starts[1::2]  # neighbours go to different workers at about the same time
    with ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("spawn")) as pool:
        for ready in [pool.submit(rows_per_chunk, dim) for _ in range(6)]:
            ready.result()  # workers started, storage imported: their writes overlap
        done = [pool.submit(write_rows, tmp, s, features[s:s + chunk], labels[s:s + chunk], paths[s:s + chunk],
                            split[s:s + chunk], hashes[s:s + chunk]) for s in order]
        for future in done:
            future.result()
    store = commit_store(tmp, target)
    assert [p.name for p in tmp_path.iterdir()] == ["f.zarr"]
    assert store.n_rows == n and store.attrs["n_rows"] == n and store.attrs["nested"] == '{"a": 1}'
    contents = read_contents(store)
    np.testing.assert_array_equal(read_features(store, np.arange(n)), features)
    np.testing.assert_array_equal(contents.labels, labels)
    assert (contents.paths, contents.split, contents.hashes) == (paths, split, hashes)


def test_unaligned_or_out_of_range_rows_are_refused(tmp_path):
    tmp = preallocate_zarr_store(tmp_path / "f.zarr", n_rows=200, feature_dim=4096, label_names=["a"], attrs={})
    rows = make_rows(10, 4096)
    with pytest.raises(ValueError, match="Expected start aligned to 64-row chunks, got 10"):
        write_rows(tmp, 10, rows[0], np.zeros(10, int), *rows[2:])
    with pytest.raises(ValueError, match=r"Expected rows within 0..200, got 192..202"):
        write_rows(tmp, 192, rows[0], np.zeros(10, int), *rows[2:])


def test_commit_refuses_unwritten_rows_and_an_existing_store(tmp_path):
    target = tmp_path / "f.zarr"
    tmp = preallocate_zarr_store(target, n_rows=100, feature_dim=4096, label_names=["cat", "dog"], attrs={})
    features, labels, paths, split, hashes = make_rows(64, 4096)
    write_rows(tmp, 0, features, labels, paths, split, hashes)
    with pytest.raises(StoreError, match="36 rows .* never written .first: row 64"):
        commit_store(tmp, target)
    assert not target.exists()
    write_store(target, n=3)
    write_rows(tmp, 64, features[:36], labels[:36], paths[:36], split[:36], hashes[:36])
    with pytest.raises(OutputExistsError):
        commit_store(tmp, target)
    assert commit_store(tmp, target, overwrite=True).n_rows == 100
    with pytest.raises(OutputExistsError):
        preallocate_zarr_store(target, n_rows=1, feature_dim=2, label_names=["a"], attrs={})
    other = preallocate_zarr_store(tmp_path / "g.zarr", n_rows=1, feature_dim=2, label_names=["a"], attrs={})
    with pytest.raises(ValueError, match="Expected a temporary store"):
        discard_store(target)
    discard_store(other)
    assert [p.name for p in tmp_path.iterdir()] == ["f.zarr"]


def test_hdf5_has_no_concurrent_writers(tmp_path):
    with pytest.raises(StoreError, match="single writer"):
        preallocate_zarr_store(tmp_path / "f.h5", n_rows=1, feature_dim=2, label_names=["a"], attrs={})


# --- HDF5 only ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not (SHARED / "baseline" / "seed_pipeline.py").is_file(), reason="../shared/baseline is not beside this checkout"
)
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


@pytest.mark.parametrize("suffix", ["h5", "zarr"])
def test_view_column_round_trips_and_a_store_without_one_reads_as_view_0(tmp_path, suffix):
    path = tmp_path / f"v.{suffix}"
    features, labels, paths, split, hashes = make_rows(4, 3)
    with create_store(path, feature_dim=3, label_names=["cat", "dog"], attrs=ATTRS) as writer:
        writer.append(features, labels, paths, split, hashes, views=[0, 1, 2, 0])
    np.testing.assert_array_equal(read_contents(open_store(path)).view, [0, 1, 2, 0])
    with pytest.raises(StoreError, match="view"):
        with create_store(tmp_path / f"w.{suffix}", feature_dim=3, label_names=["cat"], attrs=ATTRS) as writer:
            writer.append(features[:1], labels[:1] * 0, paths[:1], split[:1], hashes[:1], views=[-1])
    if suffix == "h5":  # written before the view column existed
        with h5py.File(path, "a") as file:
            del file["view"]
        np.testing.assert_array_equal(read_contents(open_store(path)).view, [0, 0, 0, 0])


def test_an_extraction_record_naming_a_dtype_we_never_write_is_one_line_naming_the_store(tmp_path):
    from tests.support import STORE_ATTRS, make_separable_store
    from transfer_flow.storage.errors import StoreError

    store = make_separable_store(tmp_path / "f.h5", attrs={**STORE_ATTRS, "feature_dtype": "int8"})
    with pytest.raises(StoreError) as refused:
        open_store(store.path).extraction
    assert store.path in str(refused.value) and "feature_dtype" in str(refused.value) and "\n" not in str(refused.value)
