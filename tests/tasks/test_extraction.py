import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support import write_colour_images
from transfer_flow.storage.errors import OutputExistsError
from transfer_flow.storage.feature_store import read_contents, read_features, read_skipped
from transfer_flow.tasks.extraction import ExtractionSettings, extract_features
from transfer_flow.tasks.hashing import hash_manifest
from transfer_flow.tasks.listing import list_dataset
from transfer_flow.tasks.splitting import split_manifest

SETTINGS = dict(backbone="mobilenet_v2", weights="none", image_size=32, pooling="avg")


def prepared(root: Path):
    manifest, _ = hash_manifest(list_dataset(root, seed=0))
    return split_manifest(manifest, test_size=0.25, seed=0)


def rows_by_hash(store):
    contents = read_contents(store)
    features = read_features(store, np.arange(store.n_rows))
    return {h: f for h, f in zip(contents.hashes, features)}


def rows_by_path(store):
    return dict(zip(read_contents(store).paths, read_features(store, np.arange(store.n_rows))))


@pytest.fixture(scope="module")
def messy_manifest(messy_dataset):
    return prepared(messy_dataset)


@pytest.fixture
def colours(tmp_path) -> Path:
    root = tmp_path / "data"
    for k, (name, colour) in enumerate({"red": (220, 30, 30), "blue": (30, 40, 220)}.items()):
        write_colour_images(root / name, colour, 10, seed=k)
    return root


def test_broken_images_are_skipped_with_reasons_and_every_other_image_is_a_row(tmp_path, messy_manifest):
    result = extract_features(messy_manifest, tmp_path / "f.h5", ExtractionSettings(**SETTINGS, batch_size=8))
    skipped = {s.path: s.reason for s in result.images_skipped}
    assert set(skipped) == {"red/empty.jpg", "green/truncated.jpg", "blue/not_really.png"}
    assert "empty" in skipped["red/empty.jpg"]
    assert result.images_extracted + len(skipped) == len(messy_manifest.records)
    # The store lists them as arrays (path, hash, reason), as a table reader sees them.
    recorded = read_skipped(result.store)
    assert dict(zip(recorded.paths, recorded.reasons)) == skipped and "skipped" not in result.store.attrs
    assert recorded.hashes == [next(r.content_hash for r in messy_manifest.records if r.path == p)
                               for p in recorded.paths]
    contents = read_contents(result.store)
    listed = {r.path: r for r in messy_manifest.records}
    assert set(contents.paths) == set(listed) - set(skipped)
    for path, label, split, digest in zip(contents.paths, contents.labels, contents.split, contents.hashes):
        assert contents.label_names[label] == listed[path].label and split == listed[path].split
        assert digest == listed[path].content_hash
    # Rows keep the manifest's shuffled order.
    assert contents.paths == [r.path for r in messy_manifest.records if r.path not in skipped]
    record = result.store.extraction
    assert record.backbone == "mobilenet_v2" and record.weights.source == "random" and record.weights.file is None
    assert np.isfinite(read_features(result.store, np.arange(result.store.n_rows))).all()


@pytest.fixture(scope="module")
def saved_weights(tmp_path_factory):
    """Fixed (random) weights in a file: the same numbers for every build, loaded through --weights PATH."""
    from transfer_flow.tasks.backbones import get_backbone

    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2.weights.h5"
    get_backbone("mobilenet_v2").build_base((32, 32, 3), None).save_weights(path)
    return path


def test_features_do_not_depend_on_batch_padding(tmp_path, messy_manifest, saved_weights):
    settings = {**SETTINGS, "weights": str(saved_weights)}
    # 5 does not divide the row count, so the last batch is padded; batch 1 pads every image.
    a = extract_features(messy_manifest, tmp_path / "a.h5", ExtractionSettings(**settings, batch_size=5))
    b = extract_features(messy_manifest, tmp_path / "b.h5", ExtractionSettings(**settings, batch_size=1))
    assert a.weights.source == "path"
    rows = np.arange(a.store.n_rows)
    assert read_contents(a.store).paths == read_contents(b.store).paths
    fa, fb = read_features(a.store, rows), read_features(b.store, rows)
    assert np.abs(fa).max() > 0
    np.testing.assert_allclose(fa, fb, rtol=1e-4, atol=1e-5)


def test_a_foreign_file_is_not_overwritten(tmp_path, messy_manifest):
    (tmp_path / "f.h5").write_bytes(b"user data")
    with pytest.raises(OutputExistsError):
        extract_features(messy_manifest, tmp_path / "f.h5", ExtractionSettings(**SETTINGS))
    assert (tmp_path / "f.h5").read_bytes() == b"user data"


def test_warm_rerun_touches_nothing(tmp_path, colours):
    manifest = prepared(colours)
    first = extract_features(manifest, tmp_path / "f.h5", ExtractionSettings(**SETTINGS))
    before = os.stat(tmp_path / "f.h5")
    again = extract_features(prepared(colours), tmp_path / "f.h5", ExtractionSettings(**SETTINGS))
    assert (again.cached, again.images_extracted, again.images_reused) == (True, 0, first.images_extracted)
    after = os.stat(tmp_path / "f.h5")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not even rewritten


def test_added_modified_and_deleted_images_give_exact_counts(tmp_path, colours):
    settings = ExtractionSettings(**SETTINGS)
    first = extract_features(prepared(colours), tmp_path / "f.h5", settings)
    old = rows_by_hash(first.store)
    write_colour_images(colours / "green", (30, 200, 40), 4, seed=9)  # +4 images, a new class
    (colours / "red" / "img_000.jpg").unlink()  # -1
    Image.new("RGB", (40, 40), (250, 0, 0)).save(colours / "red" / "img_001.png")  # changed bytes
    manifest = prepared(colours)
    second = extract_features(manifest, tmp_path / "f.h5", settings)
    assert (second.images_extracted, second.images_reused) == (5, 20 - 2)
    assert second.store.n_rows == len(manifest.records) == 23
    new = rows_by_hash(second.store)
    assert set(new) == {r.content_hash for r in manifest.records}
    for digest in set(old) & set(new):  # reused rows keep their values
        np.testing.assert_array_equal(old[digest], new[digest])
    assert read_contents(second.store).label_names == ["blue", "green", "red"]


def test_other_settings_never_share_rows(tmp_path, colours):
    extract_features(prepared(colours), tmp_path / "f.h5", ExtractionSettings(**SETTINGS))
    other = extract_features(prepared(colours), tmp_path / "f.h5", ExtractionSettings(**{**SETTINGS, "pooling": "max"}))
    assert (other.images_extracted, other.images_reused) == (20, 0)
    assert other.store.extraction.pooling == "max"


def test_refresh_recomputes_every_row(tmp_path, colours):
    extract_features(prepared(colours), tmp_path / "f.h5", ExtractionSettings(**SETTINGS))
    again = extract_features(prepared(colours), tmp_path / "f.h5", ExtractionSettings(**SETTINGS), refresh=True)
    assert (again.cached, again.images_extracted, again.images_reused) == (False, 20, 0)


KILLABLE_RUN = textwrap.dedent("""
    import sys
    from pathlib import Path
    from transfer_flow.tasks.extraction import ExtractionSettings, extract_features
    from transfer_flow.tasks.hashing import hash_manifest
    from transfer_flow.tasks.listing import list_dataset
    from transfer_flow.tasks.splitting import split_manifest

    manifest, _ = hash_manifest(list_dataset(Path(sys.argv[1]), seed=0))
    manifest = split_manifest(manifest, test_size=0.25, seed=0)
    settings = ExtractionSettings(backbone="mobilenet_v2", weights="none", image_size=32, pooling="avg", batch_size=2)
    extract_features(manifest, Path(sys.argv[2]), settings, shard_images=4, decode_threads=1, prefetch_batches=1)
""")


def test_a_killed_run_resumes_to_the_store_a_clean_run_makes(tmp_path):
    data = tmp_path / "data"
    for k, (name, colour) in enumerate({"red": (220, 30, 30), "blue": (30, 40, 220)}.items()):
        write_colour_images(data / name, colour, 60, seed=k)
    store = tmp_path / "out" / "f.h5"
    store.parent.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), str(Path(__file__).parent.parent)]),
    }
    process = subprocess.Popen([sys.executable, "-c", KILLABLE_RUN, str(data), str(store)], env=env)
    parts = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        found = list(store.parent.glob("f.h5.*.parts/shard-*.h5"))
        if len(found) >= 3:
            parts = found[0].parent
            break
        time.sleep(0.05)
    assert parts is not None, "the run finished or stalled before committing 3 shards"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not store.exists()  # never half-written under its final name
    committed = sum(1 for _ in parts.glob("shard-*.h5"))

    manifest = prepared(data)
    settings = ExtractionSettings(**SETTINGS, batch_size=2)
    resumed = extract_features(manifest, store, settings)
    assert resumed.images_reused >= 4 * committed
    assert resumed.images_extracted + resumed.images_reused == 120
    assert not parts.exists()  # shards are dropped once the store is complete
    clean = extract_features(manifest, tmp_path / "clean.h5", settings)
    assert read_contents(resumed.store).paths == read_contents(clean.store).paths
    a, b = rows_by_hash(resumed.store), rows_by_hash(clean.store)
    assert a.keys() == b.keys()
    for digest in a:
        np.testing.assert_allclose(a[digest], b[digest], rtol=1e-4, atol=1e-5)


def grow(root: Path, count: int = 3) -> None:
    """`count` new images in an existing class (a sub-folder of it: same class, new paths)."""
    write_colour_images(root / "red" / "more", (200, 40, 40), count, seed=7)


@pytest.mark.parametrize("name", ["f.h5", "f.zarr"])
def test_a_grown_dataset_appends_its_new_rows_and_rewrites_none(tmp_path, colours, name):
    settings = ExtractionSettings(**SETTINGS)
    first = extract_features(prepared(colours), tmp_path / name, settings)
    before = read_contents(first.store)
    old = read_features(first.store, np.arange(first.store.n_rows))
    inode = os.stat(tmp_path / name).st_ino
    grow(colours)
    manifest = prepared(colours)
    second = extract_features(manifest, tmp_path / name, settings)
    assert (second.images_extracted, second.images_reused) == (3, 20)
    assert os.stat(tmp_path / name).st_ino == inode  # grown in place, not written anew and renamed over
    after = read_contents(second.store)
    n = first.store.n_rows
    assert after.paths[:n] == before.paths and after.hashes[:n] == before.hashes  # old rows stay where they were
    assert sorted(after.paths[n:]) == sorted(r.path for r in manifest.records if r.path.startswith("red/more/"))
    np.testing.assert_array_equal(read_features(second.store, np.arange(n)), old)
    listed = {r.path: r for r in manifest.records}
    assert [after.label_names[i] for i in after.labels] == [listed[p].label for p in after.paths]
    assert after.split == [listed[p].split for p in after.paths]
    assert second.store.attrs["manifest_fingerprint"] == manifest.fingerprint() and not second.store.interrupted
    assert not list(tmp_path.glob(".*appending")) and not list(tmp_path.glob("*.parts"))
    again = extract_features(prepared(colours), tmp_path / name, settings)
    assert again.cached  # the grown store is complete for the grown manifest


KILLED_APPEND = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from transfer_flow.storage import feature_store
    from transfer_flow.tasks.extraction import ExtractionSettings, extract_features
    from transfer_flow.tasks.hashing import hash_manifest
    from transfer_flow.tasks.listing import list_dataset
    from transfer_flow.tasks.splitting import split_manifest

    real = feature_store.StoreAppender.append
    def append_then_die(self, *args, **kwargs):
        real(self, *args, **kwargs)  # rows written, not committed
        self._arrays.flush() if sys.argv[3] == "flushed" else None
        os.kill(os.getpid(), signal.SIGKILL)
    feature_store.StoreAppender.append = append_then_die
    manifest, _ = hash_manifest(list_dataset(Path(sys.argv[1]), seed=0))
    manifest = split_manifest(manifest, test_size=0.25, seed=0)
    settings = ExtractionSettings(backbone="mobilenet_v2", weights="none", image_size=32, pooling="avg")
    extract_features(manifest, Path(sys.argv[2]), settings)
""")


@pytest.mark.parametrize("name,when", [("f.h5", "flushed"), ("f.h5", "unflushed"), ("f.zarr", "written")])
def test_an_append_killed_midway_is_resumed_to_the_grown_store(tmp_path, colours, name, when):
    settings = ExtractionSettings(**SETTINGS)
    store = tmp_path / name
    first = extract_features(prepared(colours), store, settings)
    old = rows_by_hash(first.store)
    grow(colours)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    killed = subprocess.run([sys.executable, "-c", KILLED_APPEND, str(colours), str(store), when], env=env)
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / f".{name}.appending").exists()  # the journal says an append was under way

    manifest = prepared(colours)
    plan_store = extract_features.__globals__["_existing_store"](store)
    assert plan_store.interrupted and plan_store.committed == 20  # never taken for a complete store
    resumed = extract_features(manifest, store, settings)
    assert resumed.images_extracted + resumed.images_reused == 23  # the new rows came from committed shards
    assert resumed.images_extracted in ((0, 20) if when == "unflushed" else (0,))  # (HDF5: the old ones may not)
    contents = read_contents(resumed.store)
    assert sorted(contents.paths) == sorted(r.path for r in manifest.records)
    assert resumed.store.n_rows == 23 and not resumed.store.interrupted
    new = rows_by_hash(resumed.store)
    for digest in old:
        np.testing.assert_allclose(new[digest], old[digest], rtol=1e-4, atol=1e-5)
    assert not (tmp_path / f".{name}.appending").exists() and not list(tmp_path.glob("*.parts"))


def test_a_store_an_interrupted_append_left_unreadable_is_rebuilt(tmp_path, colours):
    settings = ExtractionSettings(**SETTINGS)
    extract_features(prepared(colours), tmp_path / "f.h5", settings)
    (tmp_path / "f.h5").write_bytes(b"\0" * 4096)  # what a kill mid-write could leave of HDF5's metadata
    (tmp_path / ".f.h5.appending").write_text('{"rows_committed": 20}')
    rebuilt = extract_features(prepared(colours), tmp_path / "f.h5", settings)
    assert (rebuilt.images_extracted, rebuilt.store.n_rows) == (20, 20)
    assert not (tmp_path / ".f.h5.appending").exists()
    (tmp_path / "f.h5").write_bytes(b"\0" * 4096)  # without a journal it is not ours to replace
    with pytest.raises(OutputExistsError):
        extract_features(prepared(colours), tmp_path / "f.h5", settings)


WARM_RERUN = textwrap.dedent("""
    import sys
    from pathlib import Path
    from transfer_flow.tasks.extraction import ExtractionSettings, assemble_store, plan_extraction
    from transfer_flow.tasks.hashing import hash_manifest
    from transfer_flow.tasks.listing import list_dataset
    from transfer_flow.tasks.splitting import split_manifest

    manifest, _ = hash_manifest(list_dataset(Path(sys.argv[1]), seed=0))
    manifest = split_manifest(manifest, test_size=0.25, seed=0)
    settings = ExtractionSettings(backbone="mobilenet_v2", weights="none", image_size=32, pooling="avg")
    plan = plan_extraction(manifest, Path(sys.argv[2]), settings)
    result = assemble_store(manifest, Path(sys.argv[2]), plan)
    print(len(plan.todo), result.cached, sorted(m for m in ("tensorflow", "keras") if m in sys.modules))
""")


def test_a_rerun_with_nothing_to_extract_imports_no_tensorflow(tmp_path, colours):
    extract_features(prepared(colours), tmp_path / "f.h5", ExtractionSettings(**SETTINGS))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", WARM_RERUN, str(colours), str(tmp_path / "f.h5")], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "0 True []"  # nothing to do, store kept, no TensorFlow, no Keras


def test_images_whose_features_a_float16_store_cannot_hold_are_skipped_with_why(tmp_path, compiled_models):
    """VGG16's biases start at zero, so its features scale with its last kernel: scaled until the features of
    some images pass float16's largest value. Those images are skipped with the reason, every other one is a
    row holding its features, and a float32 store holds them all."""
    import keras

    from transfer_flow.tasks.backbones import get_backbone

    # Grey at VGG's mean pixel is near zero once preprocessed, red is not: their features' peaks lie far apart.
    for k, (name, colour) in enumerate({"grey": (124, 117, 104), "red": (220, 30, 30)}.items()):
        write_colour_images(tmp_path / "data" / name, colour, 10, seed=k)
    manifest = prepared(tmp_path / "data")
    keras.utils.set_random_seed(0)
    model = get_backbone("vgg16").build_base((32, 32, 3), None)
    model.save_weights(tmp_path / "plain.weights.h5")
    settings = dict(backbone="vgg16", image_size=32, pooling="avg", precision="float32", batch_size=8)
    plain = rows_by_path(extract_features(manifest, tmp_path / "plain.h5", ExtractionSettings(
        **settings, weights=str(tmp_path / "plain.weights.h5"))).store)
    peaks = sorted(float(np.abs(row).max()) for row in plain.values())
    gaps = np.diff(np.log(peaks))
    assert gaps.max() > 0.5, peaks  # two images' peaks far enough apart to put float16's limit between them
    limit = float(np.sqrt(peaks[gaps.argmax()] * peaks[gaps.argmax() + 1]))
    scale = float(np.finfo(np.float16).max) / limit
    kernel, bias = model.get_layer("block5_conv3").get_weights()
    assert not bias.any()
    model.get_layer("block5_conv3").set_weights([kernel * scale, bias])
    model.save_weights(tmp_path / "scaled.weights.h5")
    scaled = dict(settings, weights=str(tmp_path / "scaled.weights.h5"))

    result = extract_features(manifest, tmp_path / "half.h5", ExtractionSettings(**scaled, feature_dtype="float16"))
    skipped = {s.path: s.reason for s in result.images_skipped}
    assert set(skipped) == {path for path, row in plain.items() if np.abs(row).max() > limit}
    assert 0 < len(skipped) < len(manifest.records)
    assert all("beyond float16's range" in reason and "--feature-dtype float32" in reason
               for reason in skipped.values())
    assert dict(zip(read_skipped(result.store).paths, read_skipped(result.store).reasons)) == skipped
    kept = rows_by_path(result.store)
    assert set(kept) == set(plain) - set(skipped)
    for path, row in kept.items():
        np.testing.assert_allclose(row, plain[path] * scale, rtol=2e-3, atol=1e-2)

    whole = extract_features(manifest, tmp_path / "single.h5", ExtractionSettings(**scaled))
    assert not whole.images_skipped and set(rows_by_path(whole.store)) == set(plain)
