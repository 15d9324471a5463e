"""Every head by name: trains on tiny separable features, predicts, survives a bundle round trip."""
import json

import numpy as np
import pytest

from tests.support import STORE_ATTRS, make_separable_store
from transfer_flow.storage.errors import BundleError
from transfer_flow.storage.feature_store import create_store, open_store, read_contents, read_features
from transfer_flow.storage.model_bundle import KERAS_HEAD_FILE, load_bundle, load_head
from transfer_flow.tasks.evaluation import evaluate_bundle
from transfer_flow.tasks.heads import HEADS, HeadName, class_probabilities
from transfer_flow.tasks.training import TrainingSettings, train_head, training_key

ATTRS = STORE_ATTRS
make_store = make_separable_store

TINY = {"logreg": {}, "linear-svm": {"c_grid": [0.01, 1.0]}, "sgd": {"sgd_epochs": 5, "sgd_block_rows": 7},
        "dense": {"epochs": 40, "patience": 5}}


@pytest.mark.parametrize("head", sorted(TINY))
def test_head_trains_predicts_and_round_trips(head, tmp_path):
    store = make_store(tmp_path / "f.h5")
    settings = TrainingSettings(head=head, **TINY[head])
    training = train_head(store, tmp_path / "model", settings)
    meta = training.bundle.metadata
    assert meta.head == head and meta.head_format == HEADS[head].head_format
    assert (tmp_path / "model" / ("head.keras" if head == "dense" else "head.skops")).is_file()
    assert 0 <= training.cv_score <= 1 and training.best_params
    result = evaluate_bundle(training.bundle, store, n_train=training.n_train)
    assert result.accuracy >= 0.9  # well-separated clusters

    reloaded = load_bundle(tmp_path / "model")
    assert reloaded.metadata == meta
    features = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
    before, after = load_head(training.bundle), load_head(reloaded)
    np.testing.assert_array_equal(before.predict(features), after.predict(features))
    probabilities = class_probabilities(after, features)
    assert probabilities.shape == (5, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
    assert (np.argmax(probabilities, axis=1) == after.predict(features)).all()

    again = train_head(store, tmp_path / "model", settings)
    assert again.cached and again.bundle.metadata.head_sha256 == meta.head_sha256


def test_every_registered_head_is_a_choice_and_is_exercised_here():
    from typing import get_args

    from transfer_flow.flows.settings import PipelineSettings

    assert list(get_args(HeadName)) == list(HEADS)
    assert get_args(PipelineSettings.model_fields["head"].annotation) == get_args(HeadName)
    # gap: test_gap_head_pools_the_stored_map_and_round_trips; finetune (it trains on images): test_finetune.py
    assert set(TINY) | {"gap", "finetune"} == set(HEADS)
    assert all(spec.description and spec.head_format in ("skops", "keras", "keras-model") for spec in HEADS.values())


def test_stage_key_names_the_head_and_only_its_own_settings(tmp_path):
    store = make_store(tmp_path / "f.h5")
    keys = {head: training_key(store, TrainingSettings(head=head)) for head in TINY}
    assert len(set(keys.values())) == len(keys)
    assert training_key(store, TrainingSettings(epochs=3)) == keys["logreg"]  # a dense setting
    assert training_key(store, TrainingSettings(head="dense", epochs=3)) != keys["dense"]
    assert training_key(store, TrainingSettings(c_grid=[1.0])) != keys["logreg"]


def test_dense_head_records_curves_and_a_swapped_keras_file_is_refused(tmp_path):
    store = make_store(tmp_path / "f.h5")
    training = train_head(store, tmp_path / "model", TrainingSettings(head="dense", **TINY["dense"]))
    assert {"loss", "val_loss", "accuracy", "val_accuracy"} <= set(training.history)
    assert training.best_params["epochs"] <= len(training.history["loss"])
    recorded = json.loads((tmp_path / "model" / "bundle.json").read_text())
    assert recorded["training_summary"]["history"]["loss"] == training.history["loss"]
    other = train_head(make_store(tmp_path / "g.h5", seed=3), tmp_path / "other",
                       TrainingSettings(head="dense", **TINY["dense"], seed=7))
    (tmp_path / "model" / KERAS_HEAD_FILE).write_bytes((tmp_path / "other" / KERAS_HEAD_FILE).read_bytes())
    with pytest.raises(BundleError, match="hash"):
        load_head(load_bundle(tmp_path / "model"))
    assert load_head(other.bundle).predict(np.zeros((1, 8), np.float32)).shape == (1,)


@pytest.fixture
def store_reads(monkeypatch) -> list[int]:
    """The number of rows of each read of the store that training makes, in order."""
    import transfer_flow.tasks.training as training_module

    reads = []
    real = training_module.read_features

    def spy(store, rows):
        reads.append(len(rows))
        return real(store, rows)

    monkeypatch.setattr(training_module, "read_features", spy)
    return reads


def test_sgd_reads_the_store_in_blocks(tmp_path, store_reads):
    store = make_store(tmp_path / "f.h5")
    train_head(store, tmp_path / "model", TrainingSettings(head="sgd", sgd_epochs=2, sgd_block_rows=10))
    assert store_reads and max(store_reads) <= 10  # never the 45 train rows at once


def test_sgd_makes_fewer_passes_over_many_rows_and_stays_accurate(tmp_path, store_reads):
    store = make_store(tmp_path / "f.h5", n_per_class=45_000)  # 101,250 train rows: 2 passes make ~200k updates
    block = 50_000
    training = train_head(store, tmp_path / "model", TrainingSettings(head="sgd", sgd_block_rows=block))
    blocks = -(-101_250 // block)
    assert len(store_reads) == blocks * (1 + 2 + 1)  # the scaler's pass, 2 passes of SGD, the train accuracy
    assert training.best_params["epochs"] == 2 and training.bundle.metadata.head_params["epochs"] == 2
    contents = read_contents(store)
    test = np.flatnonzero(np.asarray(contents.split) == "test")
    assert (load_head(training.bundle).predict(read_features(store, test)) == contents.labels[test]).mean() >= 0.99

    few = train_head(make_store(tmp_path / "g.h5"), tmp_path / "few", TrainingSettings(head="sgd"))
    assert few.best_params["epochs"] == 10  # 45 rows: the most passes
    asked = train_head(store, tmp_path / "asked", TrainingSettings(head="sgd", sgd_epochs=3, sgd_block_rows=block))
    assert asked.best_params["epochs"] == 3


def test_bundle_against_a_store_of_another_backbone_with_the_same_width_is_refused(tmp_path):

    training = train_head(make_store(tmp_path / "f.h5"), tmp_path / "model", TrainingSettings(c_grid=[1.0]))
    with create_store(tmp_path / "g.h5", feature_dim=8, label_names=["cat", "dog", "owl"],
                      attrs={**ATTRS, "backbone": "resnet50"}) as writer:
        writer.append(np.zeros((4, 8), np.float32), np.array([0, 1, 2, 0]), list("abcd"), ["test"] * 4)
    with pytest.raises(BundleError, match="backbone vgg16, the store .* has backbone resnet50"):
        evaluate_bundle(training.bundle, open_store(tmp_path / "g.h5"), n_train=0)


# vgg16 at 64 px: a 2x2x512 map, stored flattened by --pooling flatten.
MAP_ATTRS = {**ATTRS, "image_size": 64, "pooling": "flatten"}


def test_gap_head_pools_the_stored_map_and_round_trips(tmp_path):
    store = make_store(tmp_path / "f.h5", dim=2 * 2 * 512, attrs=MAP_ATTRS)
    training = train_head(store, tmp_path / "model", TrainingSettings(head="gap", **TINY["dense"]))
    assert training.bundle.metadata.head_format == "keras" and training.history["loss"]
    head = load_head(load_bundle(tmp_path / "model"))
    assert [layer.name for layer in head.model.layers][1:3] == ["map", "gap"]
    assert evaluate_bundle(training.bundle, store, n_train=training.n_train).accuracy >= 0.9
    features = np.random.default_rng(2).normal(size=(3, 2048)).astype(np.float32)
    np.testing.assert_array_equal(load_head(training.bundle).predict(features), head.predict(features))


def test_gap_head_reads_inception_v3s_valid_padded_map(tmp_path):
    from transfer_flow.tasks.training import feature_map_shape

    # InceptionV3 at its smallest input, 75 px: a 1x1 map, where ceil(75 / 32) would expect 3x3.
    attrs = {**MAP_ATTRS, "backbone": "inception_v3", "image_size": 75}
    assert feature_map_shape(make_store(tmp_path / "f.h5", dim=2048, attrs=attrs), "gap") == (1, 1, 2048)


def test_gap_head_refuses_pooled_features(tmp_path):
    from transfer_flow.storage.errors import SettingsError

    with pytest.raises(SettingsError, match="--pooling flatten"):
        train_head(make_store(tmp_path / "f.h5"), tmp_path / "model", TrainingSettings(head="gap"))


def test_gap_with_pooled_settings_fails_before_any_work(tmp_path, capsys):
    from transfer_flow.flows.cli import EXIT_USER_ERROR, main
    from transfer_flow.flows.settings import CompareSettings, PipelineSettings

    with pytest.raises(ValueError, match="--pooling flatten"):
        PipelineSettings(dataset=str(tmp_path), output=str(tmp_path / "out"), head="gap")
    with pytest.raises(ValueError, match="--pooling flatten"):
        CompareSettings(dataset=str(tmp_path), output=str(tmp_path / "out"), heads=["logreg", "gap"])
    PipelineSettings(dataset=str(tmp_path), output=str(tmp_path / "out"), head="gap", pooling="flatten")
    assert main(["run", str(tmp_path), "-o", str(tmp_path / "out"), "--head", "gap"]) == EXIT_USER_ERROR
    assert "transfer-flow: error: the gap head needs --pooling flatten" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_search_that_stops_at_max_iter_says_so_once_not_once_per_candidate(tmp_path, capfd, caplog):
    import logging

    store = make_store(tmp_path / "f.h5", n_per_class=30, dim=16)
    with caplog.at_level(logging.WARNING):
        train_head(store, tmp_path / "model", TrainingSettings(head="linear-svm", max_iter=1, c_grid=[1.0, 100.0]))
    assert "ConvergenceWarning" not in capfd.readouterr().err  # printed by each search worker, before
    [line] = [r.getMessage() for r in caplog.records if "max_iter" in r.getMessage()]
    assert "stopped at max_iter=1 before converging" in line


def test_scores_of_a_one_vs_rest_head_with_large_margins_rank_like_its_predictions():
    # sgd's predict_proba normalises one-vs-rest sigmoids: past a margin of ~20 (float32) several classes
    # saturate at 1.0, tie, and argmax took the first of them: 0.808 instead of 0.896 on the digits demo.
    from sklearn.linear_model import SGDClassifier

    features = np.array([[1, 0], [0, 1], [-1, -1]], dtype=np.float32)
    head = SGDClassifier(loss="log_loss", random_state=0).fit(features, [0, 1, 2])
    # Margins like those of the digits demo's test rows: class 1 wins, but classes 0 and 1 both saturate.
    head.coef_ = np.array([[40.0, 0], [50.0, 0], [-5.0, 0]])
    head.intercept_ = np.zeros(3)
    assert head.predict(features[:1]) == [1] and head.predict_proba(features[:1]).argmax() == 0  # the trap
    scores = class_probabilities(head, features)
    np.testing.assert_allclose(scores.sum(axis=1), 1)
    assert (scores.argmax(axis=1) == head.predict(features)).all()
