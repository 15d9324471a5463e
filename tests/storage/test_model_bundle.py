import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from transfer_flow.storage.errors import BundleError, OutputExistsError
from transfer_flow.storage.model_bundle import HEAD_FILE, BundleMetadata, load_bundle, load_head, save_bundle

X = np.array([[0.0, 1.0], [1.0, 0.0], [0.1, 0.9], [0.9, 0.2]])
Y = np.array([0, 1, 0, 1])


def metadata():
    return BundleMetadata(backbone="vgg16", weights_source="random", image_size=32, pooling="avg",
                          precision="float32", preprocessing="caffe", feature_dim=2, class_names=["a", "b"],
                          head="logreg", head_params={"C": 1.0}, store_fingerprint="abc")


def test_round_trip_predicts_the_same(tmp_path):
    head = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, Y)
    saved = save_bundle(tmp_path / "model", head, metadata())
    loaded = load_bundle(tmp_path / "model")
    assert loaded.metadata == saved.metadata
    assert loaded.metadata.library_versions["scikit-learn"]
    np.testing.assert_array_equal(load_head(loaded).predict(X), head.predict(X))


def test_altered_head_is_refused(tmp_path):
    save_bundle(tmp_path / "model", LogisticRegression().fit(X, Y), metadata())
    head_file = tmp_path / "model" / HEAD_FILE
    head_file.write_bytes(head_file.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="does not match the hash"):
        load_head(load_bundle(tmp_path / "model"))


def test_missing_metadata_is_a_clear_error(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(BundleError, match="bundle.json is missing"):
        load_bundle(tmp_path / "model")


def test_existing_bundle_needs_overwrite(tmp_path):
    save_bundle(tmp_path / "model", LogisticRegression().fit(X, Y), metadata())
    with pytest.raises(OutputExistsError):
        save_bundle(tmp_path / "model", LogisticRegression().fit(X, Y), metadata())
    replaced = save_bundle(tmp_path / "model", LogisticRegression(C=2.0).fit(X, Y), metadata(), overwrite=True)
    assert load_head(replaced).C == 2.0
