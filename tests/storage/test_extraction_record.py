"""The extraction record crosses storage typed: what a store or a bundle says about how its rows were made."""
import json

import h5py
import numpy as np
import pytest

from transfer_flow.storage.errors import StoreError
from transfer_flow.storage.extraction_record import ExtractionRecord, WeightsRecord, read_record, record_attrs
from transfer_flow.storage.feature_store import STORE_FORMATS, create_store, open_store
from transfer_flow.storage.model_bundle import METADATA_FILE, BundleMetadata, load_bundle, save_bundle

RECORD = ExtractionRecord(backbone="efficientnet_lite0", weights=WeightsRecord(source="path", file="/w/my: lite.h5"),
                          image_size=224, pooling="avg", precision="mixed_float16", preprocessing="lite",
                          resize="bilinear", feature_dtype="float16")


def write(path, attrs):
    with create_store(path, feature_dim=2, label_names=["a"], attrs=attrs) as writer:
        writer.append(np.zeros((1, 2), np.float32), np.zeros(1, np.int64), ["a/x.png"], ["train"])
    return open_store(path)


@pytest.mark.parametrize("store_format", list(STORE_FORMATS))
def test_a_store_gives_back_the_record_it_was_written_with(tmp_path, store_format):
    store = write(tmp_path / STORE_FORMATS[store_format].file_name, {**record_attrs(RECORD), "dataset_root": "/d"})
    assert store.extraction == RECORD  # a ": " inside a file name survives: nothing is parsed back


def test_the_record_is_plain_attributes_on_disk(tmp_path):
    write(tmp_path / "f.h5", record_attrs(RECORD))
    with h5py.File(tmp_path / "f.h5") as file:
        assert file.attrs["weights_source"] == "path" and file.attrs["weights_file"] == "/w/my: lite.h5"
        assert file.attrs["image_size"] == 224


@pytest.mark.parametrize("store_format", list(STORE_FORMATS))
def test_a_store_written_by_the_previous_version_still_opens_into_the_record(tmp_path, store_format):
    previous = {"backbone": "vgg16", "weights_source": "keras-cache: /k/vgg16.h5", "image_size": 32, "pooling": "avg",
                "precision": "float32", "preprocessing": "caffe", "resize": "bilinear"}  # no feature_dtype yet
    store = write(tmp_path / STORE_FORMATS[store_format].file_name, previous)
    assert store.extraction.weights == WeightsRecord(source="keras-cache", file="/k/vgg16.h5")
    assert (store.extraction.image_size, store.extraction.feature_dtype) == (32, "float32")
    assert read_record({**previous, "weights_source": "random"}).weights == WeightsRecord(source="random")


def test_a_store_without_a_record_says_so_and_an_incomplete_one_is_an_error(tmp_path):
    assert write(tmp_path / "none.h5", {}).extraction is None
    with pytest.raises(StoreError, match="incomplete extraction record"):
        write(tmp_path / "part.h5", {"backbone": "vgg16"}).extraction  # noqa: B018


def metadata(**extraction) -> BundleMetadata:
    return BundleMetadata(extraction=RECORD.model_copy(update=extraction), feature_dim=2, class_names=["a", "b"],
                          head="logreg", store_fingerprint="s")


def fitted():
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression().fit(np.array([[0.0, 1.0], [1.0, 0.0]]), [0, 1])


def test_a_bundle_keeps_the_record_under_the_same_keys_as_a_store(tmp_path):
    saved = save_bundle(tmp_path / "model", fitted(), metadata())
    on_disk = json.loads((tmp_path / "model" / METADATA_FILE).read_text())
    assert on_disk["extraction"] == record_attrs(RECORD)
    assert load_bundle(tmp_path / "model").metadata.extraction == saved.metadata.extraction == RECORD


def test_a_bundle_written_by_the_previous_version_still_loads_into_the_record(tmp_path):
    save_bundle(tmp_path / "model", fitted(), metadata())
    path = tmp_path / "model" / METADATA_FILE
    previous = json.loads(path.read_text())
    del previous["extraction"]
    previous.update(backbone="vgg16", weights_source="path: /w/vgg16.weights.h5", image_size=32, pooling="avg",
                    precision="float32", preprocessing="caffe", feature_dtype="float16")
    path.write_text(json.dumps(previous))
    record = load_bundle(tmp_path / "model").metadata.extraction
    assert record.weights == WeightsRecord(source="path", file="/w/vgg16.weights.h5")
    assert (record.backbone, record.image_size, record.feature_dtype) == ("vgg16", 32, "float16")
