"""A bundle's extraction record rebuilds the extractor its training features came from."""
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from transfer_flow.storage.errors import BundleError, WeightsUnavailableError
from transfer_flow.storage.extraction_record import ExtractionRecord, WeightsRecord
from transfer_flow.storage.model_bundle import BundleMetadata, save_bundle
from transfer_flow.tasks.backbones import get_backbone
from transfer_flow.tasks.prediction import bundle_extractor


def bundle_with(tmp_path, weights: WeightsRecord):
    record = ExtractionRecord(backbone="mobilenet_v2", weights=weights, image_size=32, pooling="avg",
                              precision="float32", preprocessing=get_backbone("mobilenet_v2").preprocessing,
                              feature_dtype="float16")
    head = LogisticRegression().fit(np.array([[0.0, 1.0], [1.0, 0.0]]), [0, 1])
    return save_bundle(tmp_path / "model", head, BundleMetadata(extraction=record, feature_dim=1280,
                                                                class_names=["a", "b"], head="logreg",
                                                                store_fingerprint="s"), overwrite=True)


def test_the_extractor_gets_the_recorded_weights_and_settings(tmp_path):
    weights = tmp_path / "my: mobilenet.weights.h5"  # ": " in a file name is kept as it is
    weights.write_bytes(b"")
    extractor = bundle_extractor(bundle_with(tmp_path, WeightsRecord(source="path", file=str(weights))))
    assert (extractor.weights.source, extractor.weights.file) == ("path", str(weights))
    assert (extractor.image_size, extractor.settings.feature_dtype, extractor.feature_dim) == (32, "float16", 1280)


def test_weights_missing_here_or_of_an_unknown_kind_are_clear_errors(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="not on this machine"):
        bundle_extractor(bundle_with(tmp_path, WeightsRecord(source="path", file=str(tmp_path / "gone.h5"))))
    with pytest.raises(BundleError, match="records weights 'torrent: x.h5'"):
        bundle_extractor(bundle_with(tmp_path, WeightsRecord(source="torrent", file="x.h5")))
