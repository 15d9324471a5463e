"""Class-activation heatmaps: where in an image the network found its evidence for a class.

Two methods, chosen by the head:

- **CAM** (Zhou et al., 2016), exact, for the linear heads (logreg, linear-svm, sgd) on avg-pooled or
  flattened features. A linear head scores class c as w_c · f + b_c, and an avg-pooled feature vector f is
  the mean over positions of the last feature map A, so w_c · f = mean over (x, y) of w_c · A(x, y): the map
  M_c(x, y) = w_c · A(x, y) decomposes the score exactly, and its mean over positions is the score minus the
  intercept. sgd's StandardScaler is folded into the weights (w / scale, the mean into the intercept), so the
  decomposition holds in the raw feature space too. No gradients are needed.
- **Grad-CAM** (Selvaraju et al., 2017) for everything else: the Keras heads (dense, gap), linear heads on
  max-pooled features, and any whole Keras model whose last feature-map layer is known (a fine-tuned model:
  pass it to `grad_cam` with that layer's name). Channel weights are the gradient of the class's pre-softmax
  score averaged over positions; the map is the ReLU of the weighted channels.

Either way one forward pass (plus one backward pass for Grad-CAM) per image gives both the prediction and
the map. The image is the one the network saw: decoded and resized as for extraction.

CAM's maps come from the runtime that made the rows where it can give them (OpenVINO: its cached converted
model with the pooling's input as a second output, at the rows' precision, with no TensorFlow import; keras-jax:
its model with that second output), so the maps are what the stored features were pooled from; otherwise, and
for Grad-CAM (gradients), from Keras' map model (build_feature_map_model) on the backend of the runtime that made
the rows: JAX for keras-jax (gradients by jax.grad, no TensorFlow needed), TensorFlow for the others (its
GradientTape).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from transfer_flow.storage.errors import BundleError
from transfer_flow.storage.model_bundle import ModelBundle, load_head
from transfer_flow.storage.report import heatmap_file
from transfer_flow.storage.report_metrics import ReportMetrics
from transfer_flow.tasks.backbones import (
    FEATURE_MAP_LAYER,
    Pooling,
    Precision,
    ResolvedWeights,
    build_feature_map_model,
    get_backbone,
    pooling_layer_name,
)
from transfer_flow.tasks.extraction import FeatureExtractor, unstorable_rows
from transfer_flow.tasks.heads import class_probabilities
from transfer_flow.tasks.images import decoded_batches
from transfer_flow.tasks.prediction import bundle_extractor, bundle_runtime
from transfer_flow.tasks.runtimes import get_runtime
from transfer_flow.tasks.runtimes.keras_backend import keras_backend, require_tensorflow_keras

HeatmapMethod = Literal["cam", "grad-cam"]
OVERLAY_ALPHA = 0.5  # at full heat, half the colour map and half the image: the image stays readable
REPORT_SIDE = 128  # overlays in the report: ~70 of them are embedded in report.html (about 2 MB at 128 px)
COLOUR_MAP = "jet"  # the convention of the CAM and Grad-CAM papers: red is where the evidence is


def pool_maps(maps: np.ndarray, pooling: Pooling) -> np.ndarray:
    """(n, height, width, channels) maps → (n, d) features, as the backbone's pooling layers compute them."""
    if pooling == "avg":
        return maps.mean(axis=(1, 2))
    if pooling == "max":
        return maps.max(axis=(1, 2))
    return maps.reshape(len(maps), -1)  # Keras' Flatten on channels-last: row-major height × width × channels


def linear_class_weights(head, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_classes, d) weights and (n_classes,) intercepts of a linear head in the raw feature space: class c's
    decision score is features @ weights[c] + intercepts[c] (for two classes: the positive class's score, and its
    negation for the other). A StandardScaler in front (sgd) is folded in, so the scores are the head's own."""
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    scaler = None
    if isinstance(head, Pipeline) and len(head.steps) == 2 and isinstance(head.steps[0][1], StandardScaler):
        scaler, head = head.steps[0][1], head.steps[1][1]
    if not isinstance(head, LogisticRegression | LinearSVC | SGDClassifier):
        raise BundleError(f"Expected a linear head (logistic regression, linear SVM, SGD), got {type(head).__name__}")
    weights = np.asarray(head.coef_, dtype=np.float64)
    intercepts = np.broadcast_to(np.asarray(head.intercept_, dtype=np.float64), (len(weights),)).copy()
    if scaler is not None:  # w · (f - mean) / scale + b  =  (w / scale) · f + (b - (w / scale) · mean)
        scale = np.asarray(scaler.scale_ if scaler.scale_ is not None else 1.0, dtype=np.float64)
        mean = np.asarray(scaler.mean_ if scaler.mean_ is not None else 0.0, dtype=np.float64)
        weights = weights / scale
        intercepts = intercepts - weights @ np.broadcast_to(mean, weights.shape[1:])
    if len(weights) == 1 and n_classes == 2:  # one margin for the positive class
        weights, intercepts = np.concatenate([-weights, weights]), np.concatenate([-intercepts, intercepts])
    return weights, intercepts


def class_activation_maps(maps: np.ndarray, class_weights: np.ndarray, pooling: Pooling) -> np.ndarray:
    """Exact CAM: (n, height, width, channels) maps and each image's (n, d) class weights → (n, height, width)
    maps whose mean over positions is that class's decision score minus its intercept."""
    maps = np.asarray(maps, dtype=np.float64)
    if pooling == "avg":
        return np.einsum("nhwc,nc->nhw", maps, class_weights)
    if pooling == "flatten":  # each position's own weights; × positions so the mean (not the sum) is the score
        positions = maps.shape[1] * maps.shape[2]
        return positions * np.einsum("nhwc,nhwc->nhw", maps, class_weights.reshape(maps.shape))
    raise BundleError(f"CAM is exact only on avg-pooled or flattened features, not {pooling}: use Grad-CAM")


def _class_scores(model, map_output=None):
    """`model` giving (its map, if asked, and) what becomes the class scores, and the function that makes them: the
    pre-softmax scores when the model ends in a softmax Dense layer, else the log of its output (the gradients of
    a saturated probability vanish). Keras ops: the same on TensorFlow and JAX."""
    import keras
    from keras import ops

    last = model.layers[-1]
    if isinstance(last, keras.layers.Dense) and getattr(last.activation, "__name__", "") == "softmax":
        hidden, kernel, bias = last.input, last.kernel, last.bias

        def scores(values):
            return ops.matmul(values, ops.cast(kernel, values.dtype)) + ops.cast(bias, values.dtype)
    else:
        hidden = model.output

        def scores(values):
            return ops.log(ops.maximum(ops.cast(values, "float32"), 1e-12))
    outputs = hidden if map_output is None else [map_output, hidden]
    return keras.Model(model.inputs, outputs), scores


def _target(scores, classes: Sequence[int]):
    """Row i's score of classes[i]."""
    from keras import ops

    chosen = np.asarray(classes, dtype="int32")[:, None]
    return ops.take_along_axis(ops.cast(scores, "float32"), chosen, axis=1)[:, 0]


def _weighted_maps(maps: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Grad-CAM proper: channels weighted by the target's gradient averaged over positions, summed, ReLU."""
    channel_weights = np.asarray(gradients, np.float32).mean(axis=(1, 2), keepdims=True)
    return np.maximum((channel_weights * np.asarray(maps, np.float32)).sum(axis=-1), 0.0)


def _gradients(targets: Callable, maps: np.ndarray) -> np.ndarray:
    """The gradient of sum(targets(maps)) with respect to `maps`, on Keras' backend (TensorFlow or JAX). Each row's
    target depends on its own map alone, so row i is the gradient of target i."""
    if keras_backend() == "jax":
        import jax
        import jax.numpy as jnp

        return np.asarray(jax.grad(lambda values: jnp.sum(targets(values)))(jnp.asarray(maps, jnp.float32)))
    import tensorflow as tf

    values = tf.convert_to_tensor(maps, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(values)
        target = targets(values)
    return np.asarray(tape.gradient(target, values))


def grad_cam(model, images: np.ndarray, classes: Sequence[int], map_layer: str = FEATURE_MAP_LAYER) -> np.ndarray:
    """Grad-CAM of `classes[i]` on `images[i]` for any Keras model on TensorFlow (backbone and classifier in one,
    as a fine-tuned model is) whose layer `map_layer` outputs a (height, width, channels) feature map: (n, height,
    width), non-negative. `images` are already preprocessed for the model."""
    import tensorflow as tf

    with_map, to_scores = _class_scores(model, model.get_layer(map_layer).output)
    with tf.GradientTape() as tape:
        maps, hidden = with_map(tf.convert_to_tensor(images), training=False)
        target = _target(to_scores(hidden), classes)
    return _weighted_maps(maps, tape.gradient(target, maps))


def grad_cam_on_maps(head_on_maps, maps: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Grad-CAM from feature maps already computed, through a model taking them (pooling and head), on TensorFlow
    or JAX: the backbone's forward pass stays outside the gradient, done once for the prediction and the map."""
    model, to_scores = _class_scores(head_on_maps)
    gradients = _gradients(lambda values: _target(to_scores(model(values, training=False)), classes), maps)
    return _weighted_maps(maps, gradients)


_BUILT_MAP_MODEL: dict[tuple, object] = {}  # one backbone kept built (the last asked for)


def feature_map_model(backbone: str, image_size: int, precision: Precision, weights: ResolvedWeights):
    """The backbone's map model, built once for consecutive uses with the same settings: compare's heads, the
    report after another, explain after a report."""
    key = (backbone, image_size, precision, weights.source, weights.file, weights.identity())
    if key not in _BUILT_MAP_MODEL:
        _BUILT_MAP_MODEL.clear()
        _BUILT_MAP_MODEL[key] = build_feature_map_model(get_backbone(backbone), image_size=image_size,
                                                        precision=precision, weights=weights)
    return _BUILT_MAP_MODEL[key]


_RUNTIME_MAPS: dict[tuple, Callable] = {}  # likewise: one runtime's map pass kept compiled (the last asked for)


def runtime_feature_maps(extractor: FeatureExtractor) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None:
    """The extractor's runtime's own pass giving the last feature maps and the pooled features at the rows'
    precision, where the runtime has one (`feature_map_forward`) and can make it from what it has cached; None
    otherwise. Made once for consecutive uses with the same settings."""
    make = getattr(get_runtime(extractor.runtime).load(), "feature_map_forward", None)
    if make is None:
        return None
    request = extractor.forward_request()
    key = (extractor.runtime, request.backbone.name, request.image_size, request.pooling, request.precision,
           request.weights.source, request.weights.file, request.weights.identity(), request.calibration,
           request.batch_size)
    if key not in _RUNTIME_MAPS:
        made = make(request)
        if made is None:
            return None
        _RUNTIME_MAPS.clear()
        _RUNTIME_MAPS[key] = made
    return _RUNTIME_MAPS[key]


def heatmap_method(bundle: ModelBundle) -> HeatmapMethod:
    """CAM for a linear (scikit-learn) head on avg-pooled or flattened features; Grad-CAM for anything else."""
    meta = bundle.metadata
    linear = not meta.whole_model and meta.head_format == "skops"
    return "cam" if linear and meta.extraction.pooling in ("avg", "flatten") else "grad-cam"


def explanation_imports(bundle: ModelBundle) -> tuple[str, ...]:
    """Keras' backend for explaining `bundle` chosen before Keras is first imported (the runtime's that made the
    rows: its maps, and Grad-CAM's gradients on that backend), and what building its models imports, to import
    ahead (flows/cli.py)."""
    runtime = bundle_runtime(bundle)
    runtime.load()
    if heatmap_method(bundle) == "grad-cam" and runtime.keras_backend == "tensorflow":
        require_tensorflow_keras("Grad-CAM heatmaps")  # OpenVINO's rows: the maps come from TensorFlow's model
    return runtime.imports


@dataclass
class Explained:
    """One image: what the head said, and where it looked (the map of the class asked for, or the predicted)."""

    probabilities: np.ndarray  # (n_classes,), the head's, in class order
    heat_class: int  # the class the map is of
    heatmap: np.ndarray  # (height, width) of the feature map, signed for CAM, non-negative for Grad-CAM


class BundleExplainer:
    """A bundle's backbone and head, rebuilt to give class-activation maps. Built once, used for many batches."""

    def __init__(self, bundle: ModelBundle, batch_size: int = 16):
        extractor = bundle_extractor(bundle, batch_size)  # checks the bundle's record against this backbone zoo
        self.bundle, self.extractor = bundle, extractor
        self.image_size, self.pooling = extractor.image_size, extractor.settings.pooling
        self.names = bundle.metadata.class_names
        self.dtype = np.dtype(bundle.metadata.extraction.feature_dtype)
        self.method: HeatmapMethod = heatmap_method(bundle)
        if self.method == "grad-cam" and keras_backend() != "jax":  # gradients from JAX or TensorFlow
            require_tensorflow_keras(f"Grad-CAM heatmaps ({bundle.metadata.head} head, {self.pooling} pooling)")
        self.head = load_head(bundle)
        self.runtime_maps = None  # the store's runtime giving maps and features (CAM only), else TensorFlow's maps
        if bundle.metadata.whole_model:
            import keras

            # A fine-tuned network: its own (trained) backbone gives the maps, its head on pooled features the scores.
            self.map_model, self.feature_head = self._split_whole_model(keras, extractor.spec.name)
            self.head_on_maps = self._head_on_maps(keras)
            return
        self.feature_head = self.head.model if bundle.metadata.head_format == "keras" else None
        if self.method == "cam":
            self.weights, self.intercepts = linear_class_weights(self.head, len(self.names))
            # CAM needs no gradients: the runtime that made the rows gives the maps at their precision, when it can
            # from what it has cached (OpenVINO: its converted model, with no TensorFlow import; keras-jax: its model).
            self.runtime_maps = runtime_feature_maps(extractor)
            if self.runtime_maps is not None:
                return
        # Grad-CAM needs gradients, so Keras computes its maps, on this process's backend: JAX for keras-jax's rows,
        # else TensorFlow (also CAM's when the runtime cannot give them); int8 is OpenVINO's alone, and its maps
        # come from the float32 model it was quantised from.
        precision = "float32" if extractor.precision == "int8" else extractor.precision
        self.map_model = feature_map_model(extractor.spec.name, extractor.image_size, precision, extractor.weights)
        if self.method == "grad-cam":
            import keras

            self.head_on_maps = self._head_on_maps(keras)

    def _split_whole_model(self, keras, backbone: str) -> tuple[object, object]:
        """(image → last feature map, pooled features → probabilities) out of a fine-tuned network, which is
        image → `BACKBONE_POOLING` (build_feature_model's model) → `head` (tasks/heads/finetune.py)."""
        whole = self.head.model
        try:
            feature_model = whole.get_layer(f"{backbone}_{self.pooling}")
            pooling = feature_model.get_layer(pooling_layer_name(self.pooling))
            head = whole.get_layer("head")
        except ValueError:
            raise BundleError(f"Expected the fine-tuned network of {self.bundle.path} to hold its backbone "
                              f"({backbone}_{self.pooling}) and its head: no heatmaps for it") from None
        return keras.Model(feature_model.inputs, pooling.input, name=f"{backbone}_map"), head

    def _head_on_maps(self, keras):
        """Map → pooling → head, one Keras model ending in its own softmax Dense layer (so Grad-CAM can take the
        pre-softmax score), for Grad-CAM through any head."""
        maps = keras.Input(tuple(self.map_model.output.shape[1:]), name="feature_map")
        pooled = {"avg": keras.layers.GlobalAveragePooling2D(), "max": keras.layers.GlobalMaxPooling2D(),
                  "flatten": keras.layers.Flatten()}[self.pooling](maps)
        if self.feature_head is not None:  # a Keras head on pooled features (a fine-tuned network's own head too)
            head = self.feature_head
            last = head.layers[-1]
            if not isinstance(last, keras.layers.Dense):
                raise BundleError(f"Expected the Keras head of {self.bundle.path} to end in a Dense layer, "
                                  f"got {type(last).__name__}")
            if len(head.inputs) != 1 or tuple(head.inputs[0].shape[1:]) != tuple(pooled.shape[1:]):
                raise BundleError(f"Expected the Keras head of {self.bundle.path} to take {pooled.shape[1]}-d "
                                  f"features, it takes {[tuple(i.shape[1:]) for i in head.inputs]}")
            hidden = keras.Model(head.inputs, last.input, name="head_body")(pooled)
            kernel, bias = (np.asarray(w) for w in last.get_weights())
            activation = getattr(last.activation, "__name__", "softmax")
        else:  # a linear head on max-pooled features: its decision scores as a Dense layer, softmax on top
            weights, intercepts = linear_class_weights(self.head, len(self.names))
            hidden, kernel, bias, activation = pooled, weights.T, intercepts, "softmax"
        classes = keras.layers.Dense(kernel.shape[1], activation=activation, dtype="float32", name="classes")
        head_on_maps = keras.Model(maps, classes(hidden), name="head_on_maps")
        classes.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
        return head_on_maps

    def explain(self, images: np.ndarray, classes: Sequence[int] | None = None) -> list[Explained | str]:
        """Decoded uint8 images (n, size, size, 3) → each one's probabilities and the map of `classes[i]`
        (default: the predicted class); or, for an image whose features the head never saw the like of (NaN or
        inf, or beyond the store's dtype), why not."""
        batch = self.extractor.spec.preprocess(images)
        if self.runtime_maps is not None:
            maps, features = self._runtime_pass(batch)
        else:
            maps = np.asarray(self.map_model(batch, training=False))  # on any Keras backend (Grad-CAM's is TF)
            features = pool_maps(maps, self.pooling)
        whole = self.bundle.metadata.whole_model  # the network's own head, on its own pooled maps (nothing stored)
        reasons = unstorable_rows(features, "float32" if whole else self.dtype.name)
        fit = np.flatnonzero([not reason for reason in reasons])
        if whole:
            probabilities = np.asarray(self.feature_head(features[fit], training=False))
        else:
            # Round through the store's dtype: the head was trained on features stored that way.
            probabilities = class_probabilities(self.head, features[fit].astype(self.dtype).astype(np.float32))
        chosen = (np.argmax(probabilities, axis=1) if classes is None
                  else np.asarray(classes, dtype=int).reshape(-1)[fit])
        if len(fit) == 0:
            heat = []
        elif self.method == "cam":
            heat = class_activation_maps(maps[fit], self.weights[chosen], self.pooling)
        else:
            heat = grad_cam_on_maps(self.head_on_maps, maps[fit], chosen.tolist())
        explained: list[Explained | str] = list(reasons)
        for i, p, c, h in zip(fit, probabilities, chosen, heat):
            explained[i] = Explained(p, int(c), h)
        return explained

    def _runtime_pass(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The runtime's maps and features of `batch`, padded to the batch size it was compiled for, as extraction
        pads its last batch."""
        n, size = len(batch), self.extractor.settings.batch_size
        chunks = [self.runtime_maps(_padded(batch[start:start + size], size)) for start in range(0, n, size)]
        maps, features = (np.concatenate([chunk[i] for chunk in chunks])[:n] for i in (0, 1))
        return maps, features

    def explain_files(self, paths: Sequence[str], classes: Sequence[int] | None = None,
                      batch_size: int = 16) -> list[tuple[np.ndarray, Explained] | str]:
        """Each file decoded as for extraction, with its explanation; or the reason it cannot be decoded."""
        results: list[tuple[np.ndarray, Explained] | str] = []
        for start, decoded in zip(range(0, len(paths), batch_size),
                                  decoded_batches(paths, self.image_size, batch_size)):
            good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
            explained = {}
            if good:
                wanted = None if classes is None else [classes[start + i] for i in good]
                for i, item in zip(good, self.explain(np.stack([decoded[i] for i in good]), wanted)):
                    explained[i] = item if isinstance(item, str) else (decoded[i], item)
            results += [explained.get(i, decoded[i]) for i in range(len(decoded))]
        return results


def _padded(batch: np.ndarray, size: int) -> np.ndarray:
    missing = size - len(batch)
    return batch if missing <= 0 else np.concatenate([batch, np.zeros((missing, *batch.shape[1:]), batch.dtype)])


def overlay(image: np.ndarray, heatmap: np.ndarray, side: int | None = None) -> np.ndarray:
    """The image (resized to `side` if given) under the positive part of `heatmap`, upsampled bilinearly and
    coloured with COLOUR_MAP, blended in proportion to the heat: cold regions show the image as it is."""
    import matplotlib

    picture = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if side is not None and picture.size != (side, side):
        picture = picture.resize((side, side), Image.Resampling.BILINEAR)
    positive = np.maximum(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0)
    peak = float(positive.max())
    scaled = positive / peak if peak > 0 else positive
    heat = np.asarray(Image.fromarray(scaled).resize(picture.size, Image.Resampling.BILINEAR)).clip(0.0, 1.0)
    colours = matplotlib.colormaps[COLOUR_MAP](heat)[..., :3]
    weight = OVERLAY_ALPHA * heat[..., None]
    blended = (1 - weight) * np.asarray(picture, dtype=np.float32) + weight * 255.0 * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


class ExplanationRow(BaseModel):
    """One image given to `explain`: the predicted class, its probability, and the overlay file of its heatmap."""

    path: str
    label: str = ""
    confidence: float | None = None
    method: str = ""
    heatmap: str = Field(default="", description="The overlay PNG's name in the output folder.")
    error: str = Field(default="", description="Why the image could not be explained (then no heatmap).")


def explain_images(bundle: ModelBundle, paths: Sequence[str], save: Callable[[int, str, np.ndarray], str], *,
                   batch_size: int = 16) -> list[ExplanationRow]:
    """Each image's predicted class and the heatmap of that class over it, drawn at the network's input size and
    handed to `save(index, path, pixels)`, which returns the file name. One row per path, in order; an image that
    cannot be decoded gets its reason in `error`, never an exception."""
    explainer = BundleExplainer(bundle)
    rows: list[ExplanationRow] = []
    for start in range(0, len(paths), batch_size):  # a batch's overlays are saved before the next is decoded
        chunk = paths[start:start + batch_size]
        for index, (path, result) in enumerate(zip(chunk, explainer.explain_files(chunk, batch_size=batch_size)),
                                               start):
            if isinstance(result, str):
                rows.append(ExplanationRow(path=path, error=result))
                continue
            pixels, explained = result
            c = explained.heat_class
            rows.append(ExplanationRow(path=path, label=explainer.names[c],
                                       confidence=float(explained.probabilities[c]), method=explainer.method,
                                       heatmap=save(index, path, overlay(pixels, explained.heatmap))))
    return rows


def report_heatmaps(bundle: ModelBundle, root: Path, metrics: ReportMetrics) -> tuple[ReportMetrics, dict]:
    """Heatmaps of the predicted class over the report's gallery images (misclassified, then correct examples):
    the metrics with each item's `heatmap` file name, and the overlays by that name (REPORT_SIDE pixels square).
    An image that cannot be read now gets none. One forward pass per image."""
    galleries = {"misclassified": metrics.misclassified, "correct": metrics.correct_examples}
    items = [(kind, i, item) for kind, listed in galleries.items() for i, item in enumerate(listed)]
    if not items:
        return metrics, {}
    names = bundle.metadata.class_names
    explainer = BundleExplainer(bundle)
    results = explainer.explain_files([str(Path(root) / item.path) for _, _, item in items],
                                      [names.index(item.predicted) for _, _, item in items])
    overlays: dict[str, np.ndarray] = {}
    named = {kind: list(listed) for kind, listed in galleries.items()}
    for (kind, i, item), result in zip(items, results):
        if isinstance(result, str):
            continue
        name = heatmap_file(kind, i)
        overlays[name] = overlay(result[0], result[1].heatmap, REPORT_SIDE)
        named[kind][i] = item.model_copy(update={"heatmap": name})
    return metrics.model_copy(update={"misclassified": named["misclassified"], "correct_examples": named["correct"],
                                      "heatmap_method": explainer.method}), overlays
