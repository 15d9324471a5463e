import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from transfer_flow.storage.errors import BundleError, OutputExistsError
from transfer_flow.storage.model_bundle import (
    BACKBONE_DIR,
    HEAD_FILE,
    BundleMetadata,
    copy_bundled_backbone,
    load_bundle,
    load_head,
    save_bundle,
)

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


def test_a_carried_backbone_model_is_copied_only_as_recorded(tmp_path):
    """The files of a carried backbone model: exactly the allow-listed names, a plain file of the recorded size
    (checked before reading), and the copy's SHA-256 as recorded; anything else is refused in one line."""
    source = tmp_path / "converted"
    source.mkdir()
    (source / "model.xml").write_text("<net/>")
    (source / "model.bin").write_bytes(bytes(range(256)) * 4)
    bundle = save_bundle(tmp_path / "model", LogisticRegression().fit(X, Y), metadata(), backbone=source)
    assert load_bundle(tmp_path / "model").metadata.backbone_files == bundle.metadata.backbone_files
    out = tmp_path / "out"
    out.mkdir()
    copy_bundled_backbone(load_bundle(tmp_path / "model"), out)
    assert (out / "model.bin").read_bytes() == (source / "model.bin").read_bytes()
    carried = tmp_path / "model" / BACKBONE_DIR / "model.bin"
    os.remove(carried)
    os.symlink(source / "model.bin", carried)  # the same bytes, but not a file of the bundle's own
    with pytest.raises(BundleError, match="not a plain file"):
        copy_bundled_backbone(load_bundle(tmp_path / "model"), tmp_path / "out")
    meta = json.loads((tmp_path / "model" / "bundle.json").read_text())
    meta["backbone_files"]["../../outside.bin"] = meta["backbone_files"].pop("model.bin")
    (tmp_path / "model" / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="Expected the backbone files model.xml, model.bin"):
        load_bundle(tmp_path / "model")


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


# --- a bundle is untrusted input: hostile heads, with bundle.json's hash updated to match -------------------------


def _string(value: str) -> dict:
    return {"__class__": "str", "__module__": "builtins", "__loader__": "JsonNode", "content": json.dumps(value),
            "is_json": True}


def _call(module: str, name: str, *args) -> dict:
    """A skops node that calls module.name(*args) when loaded."""
    return {"__class__": name, "__module__": module, "__loader__": "ConstructorFromReduceNode",
            "content": {"__class__": "tuple", "__module__": "builtins", "__loader__": "TupleNode",
                        "content": list(args)}}


def _tampered_bundle(folder, replace_tol) -> None:
    """A real logreg bundle whose `tol` parameter becomes `replace_tol`, re-hashed the way an attacker would."""
    save_bundle(folder, LogisticRegression().fit(X, Y), metadata())
    head_file = folder / HEAD_FILE
    with zipfile.ZipFile(head_file) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    schema = json.loads(entries["schema.json"])
    schema["content"]["content"]["tol"] = replace_tol
    entries["schema.json"] = json.dumps(schema).encode()
    with zipfile.ZipFile(head_file, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    meta = json.loads((folder / "bundle.json").read_text())
    meta["head_sha256"] = hashlib.sha256(head_file.read_bytes()).hexdigest()
    (folder / "bundle.json").write_text(json.dumps(meta))


def _write_marker(marker) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')"


class _Payload:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


HOSTILE = {
    "eval": lambda marker, tmp: _call("builtins", "eval", _string(_write_marker(marker))),
    "exec": lambda marker, tmp: _call("builtins", "exec", _string(_write_marker(marker))),
    "os.system": lambda marker, tmp: _call("os", "system", _string(f"touch {marker}")),
    "numpy.load": lambda marker, tmp: _call("numpy", "load", _string(_pickled(tmp, marker)),
                                            {"__class__": "str", "__module__": "builtins", "__loader__": "JsonNode",
                                             "content": "null", "is_json": True},
                                            {"__class__": "str", "__module__": "builtins", "__loader__": "JsonNode",
                                             "content": "true", "is_json": True}),
    # Deep inside ordinary containers: the check must walk the whole tree, not the top level.
    "nested __reduce__": lambda marker, tmp: {
        "__class__": "list", "__module__": "builtins", "__loader__": "ListNode",
        "content": [{"__class__": "tuple", "__module__": "builtins", "__loader__": "TupleNode",
                     "content": [_string("harmless"), _call("builtins", "exec", _string(_write_marker(marker)))]}]},
    "a function by reference": lambda marker, tmp: {"__class__": "getattr", "__module__": "builtins",
                                                    "__loader__": "FunctionNode"},
}


def _pickled(tmp, marker) -> str:
    path = tmp / "payload.pkl"
    path.write_bytes(pickle.dumps(_Payload(f"touch {marker}")))
    return str(path)


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_a_tampered_head_is_refused_and_runs_nothing(tmp_path, attack):
    marker = tmp_path / "ran"
    _tampered_bundle(tmp_path / "model", HOSTILE[attack](marker, tmp_path))
    with pytest.raises(BundleError, match="refusing to load it") as refused:
        load_head(load_bundle(tmp_path / "model"))
    assert not marker.exists()
    assert "builtins." in str(refused.value) or "os." in str(refused.value) or "numpy." in str(refused.value)


def test_a_truncated_head_is_one_clear_error(tmp_path):
    save_bundle(tmp_path / "model", LogisticRegression().fit(X, Y), metadata())
    head_file = tmp_path / "model" / HEAD_FILE
    head_file.write_bytes(head_file.read_bytes()[:100])
    meta = json.loads((tmp_path / "model" / "bundle.json").read_text())
    meta["head_sha256"] = hashlib.sha256(head_file.read_bytes()).hexdigest()
    (tmp_path / "model" / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="truncated or not a skops file"):
        load_head(load_bundle(tmp_path / "model"))


def test_every_scikit_learn_head_we_train_loads_under_the_allow_list(tmp_path):
    from transfer_flow.tasks.heads import HEADS, HeadInputs
    from transfer_flow.tasks.training import TrainingSettings

    settings = TrainingSettings(c_grid=[1.0], cv_folds=2)
    rng = np.random.default_rng(0)
    for n_classes, dtype in ((2, np.float32), (3, np.float64)):
        features = rng.normal(size=(24, 4)).astype(dtype)
        labels = np.arange(24) % n_classes
        no_val = np.zeros(24, bool)
        data = HeadInputs(rows=np.arange(24), labels=labels, is_val=no_val, n_classes=n_classes,
                          read=lambda rows: features[rows], block_rows=8)
        heads = [spec.fit(data, settings)[0] for spec in HEADS.values() if spec.head_format == "skops"]
        assert len(heads) == 3  # logreg, linear-svm, sgd
        for i, head in enumerate(heads):
            folder = tmp_path / f"{n_classes}-{i}"
            save_bundle(folder, head, metadata())
            np.testing.assert_array_equal(load_head(load_bundle(folder)).predict(features), head.predict(features))


def _keras_bundle(folder):
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    return save_bundle(folder, model, metadata())


def _rehash(folder, head_file) -> None:
    meta = json.loads((folder / "bundle.json").read_text())
    meta["head_sha256"] = hashlib.sha256(head_file.read_bytes()).hexdigest()
    (folder / "bundle.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", ["flipped bytes", "truncated"])
def test_a_damaged_keras_head_is_refused_without_crashing(tmp_path, damage):
    """Flipped bytes once made Keras segfault after printing its refusal; a truncated file said 'File not found'."""
    bundle = _keras_bundle(tmp_path / "model")
    head_file = Path(bundle.path) / "head.keras"
    data = bytearray(head_file.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        weights = data.find(b"model.weights.h5")  # inside the first member's bytes, past its local header
        for i in range(weights + 200, weights + 2200, 7):
            data[i] ^= 0xFF
    head_file.write_bytes(bytes(data))
    _rehash(tmp_path / "model", head_file)
    with pytest.raises(BundleError, match="truncated or not a .keras file" if damage == "truncated" else "damaged"):
        load_head(load_bundle(tmp_path / "model"))
