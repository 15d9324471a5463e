"""When champion and challenger can be scored on the same rows, and which rows those are."""
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from transfer_flow.storage.feature_store import create_store, open_store
from transfer_flow.storage.model_bundle import BundleMetadata, save_bundle
from transfer_flow.storage.registry import VersionEntry
from transfer_flow.tasks.promotion import _identities, compare, row_identities, why_not_comparable

CLASSES = ["a", "b"]


def metadata(**changes) -> BundleMetadata:
    base = dict(backbone="efficientnet_lite0", weights_source="keras-cache: /k/lite0.weights.h5", image_size=224,
                pooling="avg", precision="float32", preprocessing="lite", feature_dim=2, class_names=CLASSES,
                head="logreg", store_fingerprint="s")
    return BundleMetadata(**{**base, **changes})


@pytest.mark.parametrize("changes, reason", [
    ({}, None),
    ({"weights_source": "offline-package: /site-packages/lite0.pth"}, None),  # the same ImageNet weights
    ({"weights_source": "download"}, None),
    ({"weights_source": "random"}, "random-init"),
    ({"weights_source": "path: /mine.weights.h5"}, "pretrained weights differ"),
    ({"backbone": "vgg16"}, "backbone"),
    ({"image_size": 160}, "image_size"),
    ({"pooling": "max"}, "pooling"),
    ({"precision": "bfloat16"}, "precision"),
    ({"class_names": ["a", "c"]}, "classes differ"),
])
def test_champion_is_scored_on_the_challenger_features_only_when_they_mean_the_same(changes, reason):
    found = why_not_comparable(metadata(), metadata(**changes))
    assert (found is None) if reason is None else (reason in found)


def test_rows_are_identified_by_content_hash_when_the_store_has_one():
    contents = SimpleNamespace(paths=["a/1.png", "b/2.png"], hashes=["abc", ""], split=["train", "test"])
    assert _identities(contents) == ["sha:abc", "path:b/2.png"]
    assert _identities(SimpleNamespace(paths=["a/1.png"], split=["test"])) == ["path:a/1.png"]


@pytest.fixture
def two_class_run(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 10)
    features = (labels[:, None] * 5.0 + rng.normal(size=(20, 2))).astype(np.float32)
    split = ["test" if i % 2 else "train" for i in range(20)]  # 10 test rows
    paths = [f"{CLASSES[y]}/{i}.png" for i, y in enumerate(labels)]
    with create_store(tmp_path / "features.h5", feature_dim=2, label_names=CLASSES, attrs={}) as writer:
        writer.append(features, labels, paths, split)
    bundle = save_bundle(tmp_path / "model", LogisticRegression().fit(features, labels), metadata())
    entry = VersionEntry(version="v0002", registered="", dataset="", run_output="", backbone="efficientnet_lite0",
                         weights_source=bundle.metadata.extraction.weights.describe(), feature_dim=2,
                         class_names=CLASSES,
                         head_sha256=bundle.metadata.head_sha256, model_fingerprint="m", store_fingerprint="s",
                         metrics={"accuracy": 0.5, "macro_f1": 0.5}, n_test=10)
    return open_store(tmp_path / "features.h5"), bundle, entry, paths, split


def test_rows_the_champion_was_trained_on_are_left_out_for_both(two_class_run):
    store, bundle, entry, paths, split = two_class_run
    test_paths = [p for p, s in zip(paths, split) if s == "test"]
    assert row_identities(store, ("test",)) == [f"path:{p}" for p in test_paths]
    seen_by_champion = {f"path:{p}" for p in test_paths[:4]}
    scores = compare(entry, bundle, store, entry.model_copy(update={"version": "v0001"}), bundle, seen_by_champion,
                     "accuracy")
    assert scores.basis == "same-test-rows" and scores.n_rows == 6
    assert "4 of this run's 10 test rows left out" in scores.note
    assert scores.challenger == scores.champion == 1.0


def test_a_champion_trained_on_every_test_row_falls_back_to_recorded_metrics(two_class_run):
    store, bundle, entry, paths, split = two_class_run
    everything = {f"path:{p}" for p in paths}
    champion = entry.model_copy(update={"version": "v0001", "metrics": {"accuracy": 0.75, "macro_f1": 0.7}})
    scores = compare(entry, bundle, store, champion, bundle, everything, "macro_f1")
    assert scores.basis == "recorded-metrics" and (scores.challenger, scores.champion) == (0.5, 0.7)
    assert "trained on every test row" in scores.note
