import hashlib
from collections import Counter

import pytest

from transfer_flow.storage.errors import DatasetError, SettingsError
from transfer_flow.storage.manifest import ImageRecord, Manifest
from transfer_flow.tasks.splitting import MIN_TRAIN_PER_CLASS, split_manifest


def record(label: str, i: int, split: str | None = None, content: str | None = None) -> ImageRecord:
    digest = hashlib.blake2b((content or f"{label}/{i}").encode(), digest_size=16).hexdigest()
    return ImageRecord(path=f"{label}/{i}.png", label=label, size=1, mtime_ns=0, split=split, content_hash=digest)


def manifest(counts: dict[str, int], start: int = 0) -> Manifest:
    records = [record(label, i) for label, n in counts.items() for i in range(start, start + n)]
    return Manifest(root="/data", class_names=sorted(counts), records=records)


def splits(m: Manifest) -> dict[str, str]:
    return {r.path: r.split for r in m.records}


def test_split_is_stratified_in_expectation_seeded_and_keeps_order():
    source = manifest({"a": 400, "b": 120})
    result = split_manifest(source, test_size=0.25, seed=3)
    assert [r.path for r in result.records] == [r.path for r in source.records]
    tested = Counter(r.label for r in result.records if r.split == "test")
    assert 0.19 < tested["a"] / 400 < 0.31 and 0.15 < tested["b"] / 120 < 0.35
    assert splits(split_manifest(source, test_size=0.25, seed=3)) == splits(result)
    assert splits(split_manifest(source, test_size=0.25, seed=4)) != splits(result)


def test_growing_the_dataset_never_moves_an_existing_image():
    before = splits(split_manifest(manifest({"a": 60, "b": 40}), test_size=0.25, seed=0))
    grown = manifest({"a": 60, "b": 40})
    grown = grown.model_copy(update={"records": grown.records + manifest({"a": 30, "b": 30}, start=1000).records})
    after = splits(split_manifest(grown, test_size=0.25, seed=0))
    assert {path: after[path] for path in before} == before


def test_identical_files_land_on_the_same_side():
    records = [record("a", i, content="same bytes") for i in range(3)] + [record("a", i) for i in range(3, 40)]
    records += [record("b", i) for i in range(40)]
    result = split_manifest(Manifest(root="/d", class_names=["a", "b"], records=records), test_size=0.5, seed=1)
    assert len({r.split for r in result.records[:3]}) == 1


def test_small_classes_still_get_a_test_image_and_two_training_images():
    for seed in range(20):
        result = split_manifest(manifest({"a": 3, "b": 50}), test_size=0.1, seed=seed)
        sides = Counter(r.split for r in result.records if r.label == "a")
        assert sides["test"] >= 1 and sides["train"] >= MIN_TRAIN_PER_CLASS


def test_too_small_class_is_named_before_any_extraction():
    with pytest.raises(DatasetError, match=r"tiny \(2\)"):
        split_manifest(manifest({"big": 30, "tiny": 2}), test_size=0.25, seed=0)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_test_size_must_be_a_fraction(bad):
    with pytest.raises(SettingsError, match="--test-size"):
        split_manifest(manifest({"a": 10, "b": 10}), test_size=bad, seed=0)


def test_folder_splits_are_kept():
    given = {
        ("a", 0): "train",
        ("a", 1): "train",
        ("a", 2): "test",
        ("b", 0): "train",
        ("b", 1): "train",
        ("b", 2): "val",
    }
    records = [record(label, i, split) for (label, i), split in given.items()]
    source = Manifest(root="/d", class_names=["a", "b"], records=records, folder_splits=True)
    assert [r.split for r in split_manifest(source, test_size=0.5, seed=0).records] == list(given.values())


def test_folder_splits_need_training_images_of_every_class():
    records = [record("a", 0, "train"), record("a", 1, "train"), record("b", 0, "test")]
    with pytest.raises(DatasetError, match="train/ needs .* b"):
        split_manifest(Manifest(root="/d", class_names=["a", "b"], records=records, folder_splits=True),
                       test_size=0.25, seed=0)
