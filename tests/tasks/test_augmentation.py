"""`--augment K`: K views of every training image as extra rows, deterministic, cached, never of test images."""
import os
from collections import Counter

import numpy as np
import pytest

from tests.support import write_colour_images
from tests.tasks.test_extraction import SETTINGS, prepared
from transfer_flow.storage.feature_store import read_contents, read_features
from transfer_flow.tasks.augmentation import augmented_view
from transfer_flow.tasks.backbones import get_backbone, resolve_weights
from transfer_flow.tasks.extraction import ExtractionSettings, extract_features, extraction_key


@pytest.fixture
def colours(tmp_path):
    root = tmp_path / "data"
    for k, (name, colour) in enumerate({"red": (220, 30, 30), "blue": (30, 40, 220)}.items()):
        write_colour_images(root / name, colour, 8, seed=k)
    return root


def rows_by_key(store):
    contents = read_contents(store)
    features = read_features(store, np.arange(store.n_rows))
    return {(h, int(v)): f for h, v, f in zip(contents.hashes, contents.view, features)}


def test_a_view_is_fixed_by_content_view_and_seed():
    image = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    first = augmented_view(image, "abc", 1, seed=42)
    assert first.shape == image.shape and first.dtype == np.uint8
    np.testing.assert_array_equal(first, augmented_view(image, "abc", 1, seed=42))
    assert not np.array_equal(first, image)
    for other in (augmented_view(image, "abc", 2, seed=42), augmented_view(image, "abd", 1, seed=42),
                  augmented_view(image, "abc", 1, seed=43)):
        assert not np.array_equal(first, other)
    assert augmented_view(image, "abc", 0, seed=42) is image


@pytest.mark.parametrize("suffix", ["h5", "zarr"])
def test_augment_stores_k_views_of_each_training_image_and_none_of_test_images(tmp_path, colours, suffix):
    manifest = prepared(colours)
    result = extract_features(manifest, tmp_path / f"f.{suffix}", ExtractionSettings(**SETTINGS, augment=4))
    contents = read_contents(result.store)
    split_of = {r.content_hash: r.split for r in manifest.records}
    views = Counter((h, s) for h, s in zip(contents.hashes, contents.split))
    n_train = sum(r.split == "train" for r in manifest.records)
    n_test = sum(r.split == "test" for r in manifest.records)
    assert n_test > 0 and result.store.n_rows == n_train * 5 + n_test
    for (digest, split), n in views.items():
        assert split == split_of[digest] and n == (5 if split == "train" else 1)
    assert sorted(v for h, v in zip(contents.hashes, contents.view) if split_of[h] == "train")[::n_train] == [
        0, 1, 2, 3, 4]
    assert set(contents.view[np.asarray(contents.split) == "test"].tolist()) == {0}
    rows = rows_by_key(result.store)
    some_train = next(r.content_hash for r in manifest.records if r.split == "train")
    assert not np.array_equal(rows[(some_train, 0)], rows[(some_train, 1)])  # a view is another image
    record = result.store.extraction
    assert record.augment == 4 and "rotation" in record.augment_recipe and "seed=42" in record.augment_recipe
    assert (result.images_extracted, result.images_reused) == (len(manifest.records), 0)


def test_views_are_cached_and_reused_and_a_grown_dataset_extracts_views_only_of_new_images(tmp_path, colours):
    settings = ExtractionSettings(**SETTINGS, augment=2)
    extract_features(prepared(colours), tmp_path / "f.h5", settings)
    before = os.stat(tmp_path / "f.h5")
    again = extract_features(prepared(colours), tmp_path / "f.h5", settings)
    assert (again.cached, again.images_extracted) == (True, 0)
    after = os.stat(tmp_path / "f.h5")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    write_colour_images(colours / "green", (30, 200, 40), 4, seed=9)
    manifest = prepared(colours)
    grown = extract_features(manifest, tmp_path / "f.h5", settings)
    assert (grown.images_extracted, grown.images_reused) == (4, 16)
    old, new = rows_by_key(again.store), rows_by_key(grown.store)
    for key in old:  # every row of the first run, views included, kept its values
        np.testing.assert_array_equal(old[key], new[key])

    # The same views from scratch: deterministic, not just cached.
    fresh = rows_by_key(extract_features(manifest, tmp_path / "g.h5", settings).store)
    assert fresh.keys() == new.keys()
    for key in fresh:
        np.testing.assert_allclose(fresh[key], new[key], rtol=1e-5, atol=1e-5)


def test_more_views_reuse_the_views_made_and_the_recipe_is_in_the_key(tmp_path, colours):
    two = extract_features(prepared(colours), tmp_path / "f.h5", ExtractionSettings(**SETTINGS, augment=2))
    three = extract_features(prepared(colours), tmp_path / "f.h5", ExtractionSettings(**SETTINGS, augment=3))
    assert not three.cached and three.store.extraction.augment == 3
    old, new = rows_by_key(two.store), rows_by_key(three.store)
    assert set(old) < set(new) and {v for _, v in new} == {0, 1, 2, 3}
    for key in old:
        np.testing.assert_array_equal(old[key], new[key])

    weights = resolve_weights(get_backbone("mobilenet_v2"), "none")
    keys = {extraction_key(ExtractionSettings(**SETTINGS, **extra), weights)
            for extra in ({}, {"augment": 2}, {"augment": 2, "seed": 7})}
    assert len(keys) == 3
    assert extraction_key(ExtractionSettings(**SETTINGS, seed=7), weights) == extraction_key(
        ExtractionSettings(**SETTINGS), weights)  # without views the seed decides nothing
