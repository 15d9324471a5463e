"""Class-activation heatmaps on real features: Lite0 with its ImageNet weights at 96 px (a 3x3 feature map), heads
trained by the project's own fits on coloured squares placed in one cell of a 3x3 grid."""
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support import WITHOUT_TENSORFLOW
from transfer_flow.storage.extraction_record import ExtractionRecord
from transfer_flow.storage.feature_store import read_contents, read_features
from transfer_flow.storage.model_bundle import BundleMetadata, load_head, save_bundle
from transfer_flow.storage.report_metrics import read_metrics
from transfer_flow.tasks import heatmaps
from transfer_flow.tasks.backbones import cpu_supports_bf16, get_backbone, resolve_weights
from transfer_flow.tasks.extraction import ExtractionSettings, FeatureExtractor, extract_features
from transfer_flow.tasks.hashing import hash_manifest
from transfer_flow.tasks.heads import HeadInputs, class_probabilities, get_head
from transfer_flow.tasks.heatmaps import (
    BundleExplainer,
    class_activation_maps,
    feature_map_model,
    grad_cam,
    linear_class_weights,
    overlay,
    pool_maps,
    report_heatmaps,
)
from transfer_flow.tasks.images import decode_image
from transfer_flow.tasks.listing import list_dataset
from transfer_flow.tasks.splitting import split_manifest
from transfer_flow.tasks.training import TrainingSettings, train_head

SIZE, CELL = 96, 32  # Lite0's total stride is 32: one map position per 32-pixel cell
COLOURS = {"red": (230, 20, 20), "green": (20, 200, 30), "blue": (20, 30, 230)}
PER_CLASS = 8


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    """A coloured square filling one cell of the 3x3 grid on a grey, noisy background; the colour is the class."""
    root = tmp_path_factory.mktemp("squares")
    rng = np.random.default_rng(0)
    paths, labels, cells = [], [], []
    for label, (name, colour) in enumerate(COLOURS.items()):
        for i in range(PER_CLASS):
            pixels = np.clip(120 + rng.normal(0, 12, (SIZE, SIZE, 3)), 0, 255)
            row, col = divmod(int(rng.integers(9)), 3)
            pixels[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL] = colour
            path = root / f"{name}_{i}.png"
            Image.fromarray(pixels.astype(np.uint8)).save(path)
            paths.append(str(path))
            labels.append(label)
            cells.append((row, col))
    return paths, np.array(labels), cells


@pytest.fixture(scope="module")
def extracted(squares):
    """The squares' features, by the extraction path the pipeline uses, and the images as decoded for it."""
    paths, labels, _ = squares
    spec = get_backbone("efficientnet_lite0")
    weights = resolve_weights(spec, "imagenet")
    settings = ExtractionSettings(backbone=spec.name, image_size=SIZE, pooling="avg", precision="float32",
                                  batch_size=len(paths))
    images = np.stack([decode_image(p, SIZE) for p in paths])
    record = ExtractionRecord(backbone=spec.name, weights=weights, image_size=SIZE, pooling="avg",
                              precision="float32", preprocessing=spec.preprocessing)
    return images, FeatureExtractor(settings, weights)(images), record


def trained_bundle(tmp_path, head, features, labels, record, map_shape=None):
    """The head fitted by its own registered fit on the rows given, saved as a bundle."""
    inputs = HeadInputs(rows=np.arange(len(labels)), labels=labels, is_val=np.zeros(len(labels), bool),
                        n_classes=int(labels.max()) + 1, read=lambda rows: features[rows], block_rows=8,
                        map_shape=map_shape)
    settings = TrainingSettings(head=head, c_grid=[1.0], cv_folds=2, epochs=40, patience=5, sgd_epochs=5)
    fitted, _ = get_head(head).fit(inputs, settings.resolved())  # what train_head hands a fit
    names = list(COLOURS)[:int(labels.max()) + 1]
    return save_bundle(tmp_path / head, fitted, BundleMetadata(extraction=record, feature_dim=features.shape[1],
                                                               class_names=names, head=head,
                                                               store_fingerprint="squares"), overwrite=True)


def decision_scores(head, features, n_classes):
    scores = head.decision_function(features)
    return np.stack([-scores, scores], axis=1) if n_classes == 2 else scores


@pytest.mark.parametrize("head, classes", [("logreg", 3), ("sgd", 3), ("linear-svm", 2)])
def test_cam_of_a_linear_head_decomposes_its_decision_score_exactly(head, classes, squares, extracted, tmp_path):
    """The mean of the CAM over positions is the class's decision score minus its intercept, for every class, with
    the scores computed by the head itself on the features extraction stored (sgd: through its scaler)."""
    _, labels, _ = squares
    images, features, record = extracted
    keep = labels < classes
    bundle = trained_bundle(tmp_path, head, features[keep], labels[keep], record)
    explainer = BundleExplainer(bundle)
    assert explainer.method == "cam"
    head_model = load_head(bundle)
    weights, intercepts = linear_class_weights(head_model, classes)
    scores = decision_scores(head_model, features[keep], classes)
    for c in range(classes):
        explained = explainer.explain(images[keep], classes=[c] * int(keep.sum()))
        means = np.array([e.heatmap.mean() for e in explained])
        assert explained[0].heatmap.shape == (3, 3)
        # float32 maps: the rounding grows with the largest score (averaged sgd's reach ~2e3 here)
        np.testing.assert_allclose(means, scores[:, c] - intercepts[c], rtol=1e-4,
                                   atol=1e-4 + 1e-6 * np.abs(scores).max())
    # And the probabilities the explainer reports are the head's own on the stored features.
    predicted = explainer.explain(images[keep])
    np.testing.assert_allclose([e.probabilities for e in predicted], class_probabilities(head_model, features[keep]),
                               rtol=1e-4, atol=1e-6)
    # Not a uniform map: the scores differ from place to place.
    assert np.ptp(predicted[0].heatmap) > 1e-3 * np.abs(predicted[0].heatmap).max()


def near_the_square(heatmaps, cells) -> float:
    """The share of images, their square off the centre cell, whose hottest position is the square's cell or one
    next to it (by chance: 4 of 9 positions for a corner square, 6 of 9 for an edge one). A flat-coloured square
    fills its cell's receptive field evenly, so the evidence sits at its edges: next to the cell, not always in it."""
    hits = []
    for heat, (row, col) in zip(heatmaps, cells):
        if (row, col) != (1, 1):
            hot_row, hot_col = np.unravel_index(np.argmax(heat), heat.shape)
            hits.append(max(abs(int(hot_row) - row), abs(int(hot_col) - col)) <= 1)
    return float(np.mean(hits))


def test_cam_finds_the_square_the_class_is_about(squares, extracted, tmp_path):
    """Where the network looked, for the predicted class, is where the coloured square is."""
    _, labels, cells = squares
    images, features, record = extracted
    explainer = BundleExplainer(trained_bundle(tmp_path, "logreg", features, labels, record))
    assert near_the_square([e.heatmap for e in explainer.explain(images)], cells) >= 0.9


def test_cam_of_flattened_features_decomposes_the_score(squares, extracted):
    """Flattened maps: each position has its own weights; the mean of the CAM is still the score minus intercept."""
    from sklearn.linear_model import LogisticRegression

    _, labels, _ = squares
    images, _, record = extracted
    maps = np.asarray(built_map_model(record)(get_backbone(record.backbone).preprocess(images)))
    flat = pool_maps(maps, "flatten")
    head = LogisticRegression(max_iter=500).fit(flat, labels)
    weights, intercepts = linear_class_weights(head, 3)
    cams = class_activation_maps(maps, weights[labels], "flatten")
    scores = head.decision_function(flat)[np.arange(len(labels)), labels]
    np.testing.assert_allclose(cams.mean(axis=(1, 2)), scores - intercepts[labels], rtol=1e-4, atol=1e-4)


def built_map_model(record):
    """The backbone stopped before pooling, as the explainers use it (built once for the module)."""
    return feature_map_model(record.backbone, record.image_size, record.precision,
                             resolve_weights(get_backbone(record.backbone), "imagenet"))


@pytest.mark.slow  # Keras training on real features
def test_grad_cam_of_the_dense_head_is_a_map_of_the_feature_grid_and_not_flat(squares, extracted, tmp_path):
    import keras

    _, labels, cells = squares
    images, features, record = extracted
    bundle = trained_bundle(tmp_path, "dense", features, labels, record)
    explainer = BundleExplainer(bundle)
    assert explainer.method == "grad-cam"
    explained = explainer.explain(images)
    heat = np.stack([e.heatmap for e in explained])
    assert heat.shape == (len(images), 3, 3) and (heat >= 0).all()
    assert (np.ptp(heat, axis=(1, 2)) > 0).mean() >= 0.9  # Grad-CAM is the ReLU of a sum: rare images may be all 0
    np.testing.assert_allclose([e.probabilities for e in explained], class_probabilities(load_head(bundle), features),
                               rtol=1e-3, atol=1e-5)
    assert near_the_square(heat, cells) >= 0.75
    # The same as Grad-CAM through backbone and head as one model (the backbone's pass kept out of the tape here).
    map_model, last = built_map_model(record), explainer.head_on_maps.layers[-1]
    body = keras.Model(explainer.head_on_maps.inputs, last.input)
    classes = keras.layers.Dense(last.units, activation="softmax")  # one flat model ending in softmax, as
    whole = keras.Model(map_model.inputs, classes(body(map_model.output)))  # a fine-tuned model would
    classes.set_weights(last.get_weights())
    by_whole = grad_cam(whole, get_backbone(record.backbone).preprocess(images[:6]),
                        [e.heat_class for e in explained[:6]], map_layer="feature_map")
    np.testing.assert_allclose(by_whole, heat[:6], rtol=1e-3, atol=1e-3 * heat[:6].max())


@pytest.mark.parametrize("head, pooling", [("logreg", "max"),
                                           pytest.param("gap", "flatten", marks=pytest.mark.slow)])
def test_heads_without_an_exact_cam_get_grad_cam_on_the_features_they_were_trained_on(head, pooling, squares,
                                                                                     extracted, tmp_path):
    """A linear head on max-pooled features, and gap (which pools the flattened map itself)."""
    _, labels, cells = squares
    images, _, record = extracted
    maps = np.asarray(built_map_model(record)(get_backbone(record.backbone).preprocess(images)))
    features = pool_maps(maps, pooling)
    record = record.model_copy(update={"pooling": pooling})
    bundle = trained_bundle(tmp_path, head, features, labels, record, map_shape=maps.shape[1:])
    explainer = BundleExplainer(bundle)
    explained = explainer.explain(images)
    assert explainer.method == "grad-cam"
    np.testing.assert_allclose([e.probabilities for e in explained], class_probabilities(load_head(bundle), features),
                               rtol=1e-3, atol=1e-5)
    heat = np.stack([e.heatmap for e in explained])
    assert heat.shape == (len(images), 3, 3) and (heat >= 0).all() and (np.ptp(heat, axis=(1, 2)) > 0).mean() >= 0.9


def test_grad_cam_takes_any_keras_model_whose_map_layer_is_named(squares, extracted):
    """A whole model (backbone and classifier in one, as a fine-tuned model is) gets Grad-CAM by its map layer."""
    import keras

    images, _, record = extracted
    map_model = built_map_model(record)
    pooled = keras.layers.GlobalAveragePooling2D()(map_model.output)
    whole = keras.Model(map_model.inputs, keras.layers.Dense(3, activation="softmax", name="classes")(pooled))
    heat = grad_cam(whole, get_backbone(record.backbone).preprocess(images[:4]), [0, 1, 2, 0],
                    map_layer="feature_map")
    assert heat.shape == (4, 3, 3) and (heat >= 0).all() and np.isfinite(heat).all()


def test_overlay_is_the_image_where_cold_and_coloured_where_hot():
    image = np.full((64, 64, 3), 128, np.uint8)
    heat = np.array([[0.0, 0.0], [0.0, 1.0]])
    drawn = overlay(image, heat)
    assert drawn.shape == (64, 64, 3) and drawn.dtype == np.uint8
    np.testing.assert_array_equal(drawn[0, 0], image[0, 0])  # no heat: the pixel as it was
    assert np.abs(drawn[-1, -1].astype(int) - 128).max() > 40  # full heat: visibly coloured
    assert overlay(image, -heat).tolist() == image.tolist()  # no positive evidence anywhere: the image alone
    assert overlay(image, heat, side=32).shape == (32, 32, 3)


# --- CAM on an OpenVINO store: the maps from its cached converted model, at the store's precision ---------------

OPENVINO_PRECISIONS = ["float32", *(["bfloat16"] if cpu_supports_bf16() else []), "int8"]


@pytest.fixture(scope="module")
def openvino_runs(squares, compiled_models, tmp_path_factory):
    """The squares as a class-folder dataset, extracted on OpenVINO at each precision through the pipeline's own
    path (plan, decode, runtime, store), and a logreg bundle trained on each store's rows."""
    paths, labels, _ = squares
    root = tmp_path_factory.mktemp("square-classes")
    for path, label in zip(paths, labels):
        (root / list(COLOURS)[label]).mkdir(exist_ok=True)
        shutil.copy(path, root / list(COLOURS)[label] / Path(path).name)
    manifest = split_manifest(hash_manifest(list_dataset(root, seed=0))[0], test_size=0.25, seed=0)
    runs = {}
    for precision in OPENVINO_PRECISIONS:
        settings = ExtractionSettings(backbone="efficientnet_lite0", image_size=SIZE, pooling="avg",
                                      runtime="openvino", precision=precision, batch_size=8)
        store = extract_features(manifest, root.parent / f"{precision}.h5", settings).store
        bundle = train_head(store, root.parent / f"{precision}-model",
                            TrainingSettings(head="logreg", c_grid=[1.0], cv_folds=2)).bundle
        runs[precision] = store, bundle
    return runs


def stored_rows(store):
    """The store's features as stored, and its images decoded as extraction decoded them."""
    contents = read_contents(store)
    root = Path(store.attrs["dataset_root"])
    images = np.stack([decode_image(str(root / path), SIZE) for path in contents.paths])
    return read_features(store, np.arange(store.n_rows)), images


@pytest.mark.parametrize("precision", OPENVINO_PRECISIONS)
def test_cam_on_an_openvino_store_decomposes_the_scores_of_its_stored_features(precision, openvino_runs):
    """The maps come from the store's own runtime and precision (its cached model): their CAM's mean is the decision
    score the head gives the STORED row, minus the intercept, and the probabilities are the head's on those rows."""
    store, bundle = openvino_runs[precision]
    assert store.attrs["runtime"] == "openvino" and store.attrs["precision"] == precision
    explainer = BundleExplainer(bundle)
    assert explainer.method == "cam" and explainer.runtime_maps is not None
    features, images = stored_rows(store)
    head = load_head(bundle)
    scores = decision_scores(head, features, 3)
    _, intercepts = linear_class_weights(head, 3)
    for c in range(3):
        explained = explainer.explain(images, classes=[c] * len(images))
        assert explained[0].heatmap.shape == (3, 3)
        np.testing.assert_allclose([e.heatmap.mean() for e in explained], scores[:, c] - intercepts[c],
                                   rtol=1e-4, atol=1e-4 * np.abs(scores).max())
    np.testing.assert_allclose([e.probabilities for e in explainer.explain(images)],
                               class_probabilities(head, features), rtol=1e-4, atol=1e-6)


def test_cam_from_the_openvino_model_is_the_tensorflow_models_cam(openvino_runs, squares, tmp_path, monkeypatch):
    """float32: the same maps whichever runtime computes them. Without a cached model (an empty cache), the
    explainer builds TensorFlow's map model instead, and gives the same heatmaps."""
    _, _, cells = squares
    store, bundle = openvino_runs["float32"]
    _, images = stored_rows(store)
    by_openvino = BundleExplainer(bundle)
    monkeypatch.setattr(heatmaps, "_RUNTIME_MAPS", {})  # as in a new process whose cache is empty
    monkeypatch.setenv("TRANSFER_FLOW_COMPILED_MODELS", str(tmp_path))
    by_tensorflow = BundleExplainer(bundle)
    assert by_openvino.runtime_maps is not None and by_tensorflow.runtime_maps is None
    assert list(tmp_path.iterdir()) == []  # the fallback converts nothing
    heat = np.stack([e.heatmap for e in by_openvino.explain(images)])
    np.testing.assert_allclose(heat, np.stack([e.heatmap for e in by_tensorflow.explain(images)]),
                               rtol=1e-3, atol=1e-4 * np.abs(heat).max())




@pytest.mark.slow  # a subprocess
def test_a_report_on_an_openvino_store_draws_its_heatmaps_without_tensorflow(openvino_runs, tmp_path):
    """The report stage (evaluation, heatmaps, report files) with TensorFlow unimportable: CAM heatmaps, one per
    gallery image, the same as in this process."""
    store, bundle = openvino_runs["bfloat16" if "bfloat16" in openvino_runs else "float32"]
    program = WITHOUT_TENSORFLOW + textwrap.dedent("""
        import pickle
        from pathlib import Path
        from transfer_flow.storage.feature_store import open_store
        from transfer_flow.storage.model_bundle import load_bundle
        from transfer_flow.storage.report import write_report
        from transfer_flow.storage.report_metrics import ReportMetrics
        from transfer_flow.tasks.evaluation import evaluate_bundle
        from transfer_flow.tasks.heatmaps import report_heatmaps

        store, bundle, out = open_store(sys.argv[1]), load_bundle(Path(sys.argv[2])), Path(sys.argv[3])
        result = evaluate_bundle(bundle, store, n_train=0)
        meta = bundle.metadata
        metrics = ReportMetrics(
            accuracy=result.accuracy, macro_f1=result.macro_f1, n_train=result.n_train, n_test=result.n_test,
            head=meta.head, backbone=meta.extraction.backbone, weights_source="-",
            image_size=meta.extraction.image_size, pooling=meta.extraction.pooling,
            precision=meta.extraction.precision, feature_dim=meta.feature_dim, store=str(store.path),
            class_names=result.class_names, per_class=result.per_class, confusion=result.confusion,
            misclassified=result.misclassified, correct_examples=result.correct_examples)
        metrics, overlays = report_heatmaps(bundle, Path(store.attrs["dataset_root"]), metrics)
        write_report(out / "report", metrics, result.classification_report, overwrite=True, heatmaps=overlays)
        (out / "overlays.pickle").write_bytes(pickle.dumps((metrics.heatmap_method, overlays)))
        print("tensorflow" in sys.modules, "keras" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", program, str(store.path), str(bundle.path), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False", "False"]
    method, overlays = pickle.loads((tmp_path / "overlays.pickle").read_bytes())
    metrics = read_metrics(tmp_path / "report")
    gallery = [*metrics.misclassified, *metrics.correct_examples]
    assert method == "cam" and gallery and len(overlays) == len(gallery)
    assert all(item.heatmap in overlays for item in gallery)
    _, here = report_heatmaps(bundle, Path(store.attrs["dataset_root"]), metrics)
    assert here.keys() == overlays.keys()
    for name, pixels in overlays.items():  # the same maps, drawn the same (PNG-exact after uint8 rounding)
        assert np.abs(pixels.astype(int) - here[name].astype(int)).max() <= 1, name
