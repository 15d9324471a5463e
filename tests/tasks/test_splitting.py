from collections import Counter

import pytest

from storage.errors import DatasetError, SettingsError
from storage.manifest import ImageRecord, Manifest
from tasks.splitting import split_manifest


def manifest(counts: dict[str, int], splits: dict[str, str] | None = None) -> Manifest:
    records = [ImageRecord(path=f"{label}/{i}.png", label=label, size=1, mtime_ns=0,
                           split=(splits or {}).get(f"{label}/{i}.png"))
               for label, n in counts.items() for i in range(n)]
    return Manifest(root="/data", class_names=sorted(counts), records=records, folder_splits=splits is not None)


def test_split_is_stratified_seeded_and_keeps_order():
    source = manifest({"a": 20, "b": 8})
    result = split_manifest(source, test_size=0.25, seed=3)
    assert [r.path for r in result.records] == [r.path for r in source.records]
    tested = Counter(r.label for r in result.records if r.split == "test")
    assert tested == {"a": 5, "b": 2}
    assert {r.split for r in result.records} == {"train", "test"}
    again = split_manifest(source, test_size=0.25, seed=3)
    assert [r.split for r in again.records] == [r.split for r in result.records]
    other = split_manifest(source, test_size=0.25, seed=4)
    assert [r.split for r in other.records] != [r.split for r in result.records]


def test_too_small_class_is_named_before_any_extraction():
    with pytest.raises(DatasetError, match=r"tiny \(2\)"):
        split_manifest(manifest({"big": 30, "tiny": 2}), test_size=0.25, seed=0)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_test_size_must_be_a_fraction(bad):
    with pytest.raises(SettingsError, match="--test-size"):
        split_manifest(manifest({"a": 10, "b": 10}), test_size=bad, seed=0)


def test_folder_splits_are_kept():
    splits = {"a/0.png": "train", "a/1.png": "train", "a/2.png": "test",
              "b/0.png": "train", "b/1.png": "train", "b/2.png": "val"}
    source = manifest({"a": 3, "b": 3}, splits)
    result = split_manifest(source, test_size=0.5, seed=0)
    assert [r.split for r in result.records] == [splits[r.path] for r in source.records]


def test_folder_splits_need_training_images_of_every_class():
    splits = {"a/0.png": "train", "a/1.png": "train", "b/0.png": "test"}
    with pytest.raises(DatasetError, match="train/ needs .* b"):
        split_manifest(manifest({"a": 2, "b": 1}, splits), test_size=0.25, seed=0)
