import numpy as np
import pytest

from tests.support import STORE_ATTRS, make_separable_store
from transfer_flow.storage.errors import BundleError, DatasetError
from transfer_flow.storage.feature_store import create_store, open_store
from transfer_flow.storage.model_bundle import load_head
from transfer_flow.tasks.evaluation import evaluate_bundle
from transfer_flow.tasks.training import TrainingSettings, train_head

ATTRS = STORE_ATTRS
make_store = make_separable_store


def test_logreg_grid_learns_separable_features_and_reports_per_class(tmp_path):
    store = make_store(tmp_path / "f.h5")
    training = train_head(store, tmp_path / "model", TrainingSettings())
    assert training.n_train == 45
    assert training.best_params["C"] in TrainingSettings().c_grid
    assert training.bundle.metadata.class_names == ["cat", "dog", "owl"]
    assert training.bundle.metadata.feature_dim == 8
    result = evaluate_bundle(training.bundle, store, n_train=training.n_train)
    assert result.n_test == 15 and result.accuracy > 0.9
    assert set(result.per_class) == {"cat", "dog", "owl"}
    assert sum(map(sum, result.confusion)) == 15
    assert sum(result.per_class[name]["support"] for name in result.class_names) == 15
    assert "owl" in result.classification_report


def test_val_rows_choose_c_and_join_the_final_fit(tmp_path):
    store = make_store(tmp_path / "f.h5", split_of=lambda i: ["train", "train", "val", "test"][i % 4])
    training = train_head(store, tmp_path / "model", TrainingSettings(c_grid=[0.01, 1.0]))
    assert training.n_train == 45  # train + val
    assert load_head(training.bundle).predict(np.zeros((1, 8), np.float32)).shape == (1,)


def test_class_left_without_training_rows_is_a_clear_error(tmp_path):
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    split = ["train", "train", "train", "test", "train", "test", "test", "test"]  # dog: one training row
    with create_store(tmp_path / "f.h5", feature_dim=2, label_names=["cat", "dog"], attrs=ATTRS) as writer:
        writer.append(np.eye(8, 2, dtype=np.float32), labels, [str(i) for i in range(8)], split)
    with pytest.raises(DatasetError, match="fewer than 2 training images: dog"):
        train_head(open_store(tmp_path / "f.h5"), tmp_path / "model", TrainingSettings())
    assert not (tmp_path / "model").exists()


def test_bundle_against_a_store_of_another_width_is_refused(tmp_path):
    store = make_store(tmp_path / "f.h5")
    training = train_head(store, tmp_path / "model", TrainingSettings(c_grid=[1.0]))
    other = make_store(tmp_path / "g.h5", dim=5)
    with pytest.raises(BundleError, match="expects 8-d features"):
        evaluate_bundle(training.bundle, other, n_train=0)
