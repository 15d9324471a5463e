"""Split: assign every record of a Manifest to train or test (folder layout first, else seeded and stratified)."""
from __future__ import annotations

from collections import Counter

from sklearn.model_selection import train_test_split

from storage.errors import DatasetError, SettingsError
from storage.manifest import Manifest

MIN_TRAIN_PER_CLASS = 2  # cross-validation over C needs two folds' worth of each class


def split_manifest(manifest: Manifest, *, test_size: float, seed: int) -> Manifest:
    """Return the manifest with `split` set on every record; fails before any extraction if a class is too small."""
    if not 0.0 < test_size < 1.0:
        raise SettingsError(f"Expected --test-size between 0 and 1 (exclusive), got {test_size}")
    if manifest.folder_splits:
        _check_folder_splits(manifest)
        return manifest
    counts = Counter(r.label for r in manifest.records)
    too_small = {label: n for label, n in sorted(counts.items()) if n - max(1, round(n * test_size)) < MIN_TRAIN_PER_CLASS}
    if too_small:
        listed = ", ".join(f"{label} ({n})" for label, n in too_small.items())
        raise DatasetError(f"Classes too small for a {test_size:.0%} test split (each needs at least "
                           f"{MIN_TRAIN_PER_CLASS} training images and 1 test image): {listed}")
    labels = [r.label for r in manifest.records]
    try:
        train_idx, test_idx = train_test_split(range(len(labels)), test_size=test_size, stratify=labels,
                                               random_state=seed)
    except ValueError as error:  # e.g. fewer test rows than classes
        raise DatasetError(f"Cannot split {len(labels)} images over {len(counts)} classes with "
                           f"--test-size {test_size}: {error}") from error
    assignment = {i: "train" for i in train_idx} | {i: "test" for i in test_idx}
    records = [r.model_copy(update={"split": assignment[i]}) for i, r in enumerate(manifest.records)]
    return manifest.model_copy(update={"records": records})


def _check_folder_splits(manifest: Manifest) -> None:
    per_split = Counter((r.split, r.label) for r in manifest.records)
    missing_train = [c for c in manifest.class_names if per_split[("train", c)] < MIN_TRAIN_PER_CLASS]
    if missing_train:
        raise DatasetError(f"train/ needs at least {MIN_TRAIN_PER_CLASS} images of every class; too few for: "
                           + ", ".join(missing_train))
    if not any(r.split == "test" for r in manifest.records):
        raise DatasetError("test/ holds no images: put test images there or remove train/ and test/ for a random split")
