"""The finetune head's mechanics on a tiny real dataset: random-init ResNet50 at 32 px, 2 classes.

What it must do: train a whole network (phase 1 on the stored features, phase 2 on the images), change only
the backbone's top `unfreeze` layers and never a BatchNormalization statistic, save it as one .keras file that
loads safely and predicts, evaluate on the test images, and train nothing on a warm rerun."""
from pathlib import Path

import numpy as np
import pytest

from tests.support import write_colour_images
from transfer_flow.storage.errors import BundleError
from transfer_flow.storage.model_bundle import KERAS_MODEL_FILE, load_bundle, load_head
from transfer_flow.tasks.backbones import (
    backbone_layers,
    build_feature_model,
    get_backbone,
    resolve_weights,
)
from transfer_flow.tasks.evaluation import evaluate_bundle
from transfer_flow.tasks.extraction import ExtractionSettings, extract_features
from transfer_flow.tasks.hashing import hash_manifest
from transfer_flow.tasks.heads import HEADS
from transfer_flow.tasks.listing import list_dataset
from transfer_flow.tasks.prediction import image_probabilities, predict_images
from transfer_flow.tasks.splitting import split_manifest
from transfer_flow.tasks.training import TrainingSettings, train_head, training_key

SIZE = 32
# Random-init ResNet50 features still separate colours at 32 px; MobileNetV2's and Lite0's shrink to ~1e-13 there.
BACKBONE = "resnet50"
UNFREEZE = 12  # of its 174 layers: conv5_block3 (convolutions, batch norms, activations)
SETTINGS = TrainingSettings(head="finetune", epochs=3, learning_rate=1e-3, unfreeze=UNFREEZE, dense_batch_size=8,
                            patience=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("two-colours")
    write_colour_images(root / "red", (220, 30, 30), 12, seed=1)
    write_colour_images(root / "blue", (30, 40, 220), 12, seed=2)
    return root


@pytest.fixture(scope="module")
def store(dataset, tmp_path_factory):
    manifest, _ = hash_manifest(list_dataset(dataset, seed=0), None)
    manifest = split_manifest(manifest, test_size=0.25, seed=0)
    extraction = ExtractionSettings(backbone=BACKBONE, weights="none", image_size=SIZE, batch_size=8)
    return extract_features(manifest, tmp_path_factory.mktemp("store") / "features.h5", extraction).store


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune") / "model"
    return train_head(store, folder, SETTINGS), folder


def test_finetune_is_a_registered_whole_model_head():
    spec = HEADS["finetune"]
    assert spec.head_format == "keras-model" and spec.reads_images
    assert {"unfreeze", "epochs", "learning_rate", "flip"} <= set(spec.settings)
    assert TrainingSettings(head="finetune").resolved().learning_rate < TrainingSettings(head="dense").resolved(
    ).learning_rate  # fine-tuning steps are smaller than a head's


def test_bundle_holds_the_whole_network_which_round_trips_and_predicts(trained, store, dataset):
    training, folder = trained
    meta = training.bundle.metadata
    assert meta.head == "finetune" and meta.head_format == "keras-model" and meta.whole_model
    assert (folder / KERAS_MODEL_FILE).is_file() and not (folder / "head.keras").exists()
    assert meta.training_summary["best_params"]["unfreeze"] == UNFREEZE
    history = training.history
    first_tuned = int(history["fine_tuning_from_epoch"][0])
    assert len(history["loss"]) == len(history["val_loss"]) >= first_tuned > 1  # both phases' curves

    reloaded = load_bundle(folder)
    assert reloaded.metadata == meta
    model = load_head(reloaded).model
    assert model.input_shape == (None, SIZE, SIZE, 3) and model.output_shape == (None, 2)

    result = evaluate_bundle(reloaded, store, n_train=training.n_train)
    assert result.n_test == 6 and result.accuracy >= 5 / 6
    test_paths = [m.path for m in result.misclassified]  # evaluation read the test images themselves
    assert all(path.startswith(("red/", "blue/")) for path in test_paths)

    paths = sorted(str(p) for p in dataset.rglob("*.*"))
    rows = predict_images(reloaded, paths, top_k=2)
    assert [r.path for r in rows] == paths and not any(r.error for r in rows)
    assert all(r.labels[0] in ("red", "blue") and abs(sum(r.confidences) - 1) < 1e-4 for r in rows)
    probabilities = image_probabilities(reloaded, dataset, [str(Path(p).relative_to(dataset)) for p in paths])
    assert [r.labels[0] for r in rows] == [meta.class_names[i] for i in probabilities.argmax(axis=1)]


def test_only_the_top_layers_changed_and_batch_norm_stayed_in_inference_mode(trained):
    training, folder = trained
    assert training.bundle.metadata.training_summary["best_params"]["fine_tune_epochs"] >= 1, \
        "fine-tuning kept no epoch: nothing to compare"
    model = load_head(load_bundle(folder)).model
    [tuned] = [layer for layer in model.layers if layer.name == f"{BACKBONE}_avg"]
    spec = get_backbone(BACKBONE)
    start = build_feature_model(spec, image_size=SIZE, pooling="avg", precision="float32",
                                weights=resolve_weights(spec, "none"))  # the same seeded random init
    before, after = backbone_layers(start), backbone_layers(tuned)
    assert [layer.name for layer in before] == [layer.name for layer in after]
    changed = {layer.name for layer, old in zip(after, before)
               if any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(layer.weights, old.weights))}
    frozen, top = after[:-UNFREEZE], after[-UNFREEZE:]
    assert not changed & {layer.name for layer in frozen}
    batch_norms = [layer for layer in after if type(layer).__name__ == "BatchNormalization"]
    assert batch_norms and not changed & {layer.name for layer in batch_norms}  # moving statistics too
    assert all(not layer.trainable for layer in batch_norms)
    convolutions = {layer.name for layer in top if layer.weights and type(layer).__name__ != "BatchNormalization"}
    assert convolutions and convolutions <= changed


def test_warm_rerun_trains_nothing_and_the_key_covers_the_settings(trained, store):
    training, folder = trained
    again = train_head(store, folder, SETTINGS)
    assert again.cached and again.bundle.metadata.head_sha256 == training.bundle.metadata.head_sha256
    assert again.history == training.history
    key = training_key(store, SETTINGS)
    for change in ({"unfreeze": 3}, {"learning_rate": 1e-4}, {"epochs": 4}, {"flip": True}):
        assert training_key(store, SETTINGS.model_copy(update=change)) != key, change


def test_a_damaged_model_file_is_refused(trained, tmp_path):
    import shutil

    _, folder = trained
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    payload = bytearray((copy / KERAS_MODEL_FILE).read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    (copy / KERAS_MODEL_FILE).write_bytes(bytes(payload))
    with pytest.raises(BundleError, match="does not match the hash"):
        load_head(load_bundle(copy))


def test_a_fine_tuned_champion_is_scored_on_the_challengers_test_images(trained, store, tmp_path):
    from transfer_flow.storage.registry import ModelRegistry, PromotionPolicy
    from transfer_flow.tasks.promotion import decide, row_identities, why_not_comparable

    training, folder = trained
    probe = train_head(store, tmp_path / "logreg", TrainingSettings(head="logreg"))
    # A fine-tuned network reads images: any challenger with the same classes can be scored on the same rows.
    assert why_not_comparable(training.bundle.metadata, probe.bundle.metadata) is None
    registry = ModelRegistry(str(tmp_path / "registry"))
    policy = PromotionPolicy(metric="accuracy")
    train_rows = row_identities(store, ("train", "val"))
    champion, _ = registry.register(folder, None, dataset="d", run_output="o", metrics={"accuracy": 0.5,
                                    "macro_f1": 0.5}, n_test=6, train_rows=train_rows)
    assert decide(registry, champion, store, policy).promoted
    challenger, _ = registry.register(tmp_path / "logreg", None, dataset="d", run_output="o",
                                      metrics={"accuracy": 0.5, "macro_f1": 0.5}, n_test=6, train_rows=train_rows)
    decision = decide(registry, challenger, store, policy)
    assert decision.basis == "same-test-rows" and decision.n_rows == 6
    fine_tuned = evaluate_bundle(training.bundle, store, n_train=training.n_train).accuracy
    assert decision.champion_score == pytest.approx(fine_tuned)


def test_on_the_default_backbone_only_the_top_layers_train_with_no_batch_statistics_or_dropout():
    import keras

    from transfer_flow.tasks.heads.finetune import set_trainable_top

    spec = get_backbone("efficientnet_lite0")
    model = build_feature_model(spec, image_size=SIZE, pooling="avg", precision="float32",
                                weights=resolve_weights(spec, "none"))
    top = set_trainable_top(model, spec.finetune_layers)
    layers = backbone_layers(model)
    assert len(top) == spec.finetune_layers < len(layers) and top == layers[-spec.finetune_layers:]
    assert all(not layer.trainable for layer in layers[:-spec.finetune_layers])
    assert any(layer.trainable for layer in top)
    assert all(not layer.trainable for layer in layers if isinstance(layer, keras.layers.BatchNormalization))
    images = np.random.default_rng(0).uniform(-1, 1, size=(4, SIZE, SIZE, 3)).astype(np.float32)
    # Training mode computes exactly what extraction computes: frozen BN statistics, stochastic depth off.
    np.testing.assert_array_equal(np.asarray(model(images, training=True)), np.asarray(model(images, training=False)))


def test_a_fine_tuned_network_gets_grad_cam_from_its_own_trained_backbone(trained, dataset):
    from transfer_flow.tasks.heatmaps import BundleExplainer
    from transfer_flow.tasks.images import decoded_batches

    training, folder = trained
    bundle = load_bundle(folder)
    paths = sorted(dataset.rglob("*.*"))[::4]  # both classes, JPEG and PNG
    images = np.stack(next(decoded_batches(paths, SIZE, len(paths))))
    explainer = BundleExplainer(bundle)
    assert explainer.method == "grad-cam"
    explained = explainer.explain(images)
    # The scores are the network's own (its trained backbone, not the store's weights: the top layers moved), each
    # map is of the predicted class, over the backbone's last feature grid (1 x 1 for ResNet50 at 32 px).
    whole = image_probabilities(bundle, dataset, [str(p.relative_to(dataset)) for p in paths])
    np.testing.assert_allclose(np.stack([e.probabilities for e in explained]), whole, rtol=1e-4, atol=1e-5)
    assert [e.heat_class for e in explained] == whole.argmax(axis=1).tolist()
    grid = tuple(explainer.map_model.output.shape[1:3])
    assert all(e.heatmap.shape == grid and np.isfinite(e.heatmap).all() and (e.heatmap >= 0).all() for e in explained)
