"""Leftovers of killed runs with other settings, and what `predict` is handed: empty folders, links outside."""
from __future__ import annotations

import os

import pytest

from tests.support import FAST
from transfer_flow.storage.errors import DatasetError
from transfer_flow.tasks.extraction import ExtractionSettings, extract_features
from transfer_flow.tasks.hashing import hash_manifest
from transfer_flow.tasks.listing import list_dataset
from transfer_flow.tasks.prediction import list_images
from transfer_flow.tasks.splitting import split_manifest


def test_shards_a_killed_run_left_with_other_settings_are_removed(colour_dataset, tmp_path):
    store = tmp_path / "features.h5"
    other = tmp_path / "features.h5.0123456789abcdef.parts"  # a killed run's, with a key that no longer matches
    other.mkdir()
    (other / "shard-0000.h5").write_bytes(b"\0" * 4096)
    other_format = tmp_path / "features.zarr.0123456789abcdef.parts"  # another store's: not ours to judge
    other_format.mkdir()
    manifest, _ = hash_manifest(list_dataset(colour_dataset), None)
    manifest = split_manifest(manifest, test_size=0.25, seed=0)
    settings = ExtractionSettings(backbone=FAST["backbone"], weights=FAST["weights"], image_size=FAST["image_size"],
                                  batch_size=FAST["batch_size"])
    result = extract_features(manifest, store, settings)
    assert result.store.n_rows == len(manifest.records)
    assert not other.exists() and other_format.exists()
    assert not list(tmp_path.glob("features.h5.*.parts"))


def test_predict_refuses_a_folder_without_images(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match="No images to label under"):
        list_images([tmp_path / "empty"])


def test_predict_follows_links_only_inside_the_folder_given(colour_dataset, tmp_path):
    inbox = tmp_path / "inbox"
    (inbox / "day1").mkdir(parents=True)
    image = next((colour_dataset / "red").glob("*.png"))
    (inbox / "day1" / "a.png").write_bytes(image.read_bytes())
    (inbox / "secret.png").symlink_to(image)  # a file outside
    (inbox / "elsewhere").symlink_to(colour_dataset / "blue", target_is_directory=True)  # a folder outside
    (inbox / "again").symlink_to(inbox / "day1", target_is_directory=True)  # inside: followed, once
    (inbox / "day1" / "loop").symlink_to(inbox, target_is_directory=True)  # a loop: must end
    found = list_images([inbox])
    assert [os.path.realpath(p) for p in found] == [os.path.realpath(inbox / "day1" / "a.png")]
