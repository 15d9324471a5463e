"""Heads: the classifiers trained on frozen features, and one way to get class probabilities from any of them."""
from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, PredefinedSplit, StratifiedKFold

from transfer_flow.tasks.logs import stage_logger

HEADS = ("logreg", "linear-svm", "sgd", "dense", "gap")


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def class_probabilities(head, features: np.ndarray) -> np.ndarray:
    """(n, n_classes) scores summing to 1 per row, columns in the head's class order (0..n_classes-1).

    predict_proba where the head has it (logreg, sgd with log loss, dense); otherwise (LinearSVC) a
    softmax over decision_function: a ranking-faithful confidence, not a calibrated probability.
    """
    if hasattr(head, "predict_proba"):
        return np.asarray(head.predict_proba(features), dtype=np.float64)
    scores = np.asarray(head.decision_function(features), dtype=np.float64)
    if scores.ndim == 1:  # two classes: one margin for the positive class
        scores = np.stack([-scores / 2, scores / 2], axis=1)
    return _softmax(scores)


# --- fitting ----------------------------------------------------------------------------------------
# Each fit takes the train (and val) rows and returns (head, summary): the fitted head, which a bundle
# can save (scikit-learn with skops, Keras as .keras), and best_params / cv_score / score_name / history.


def search_folds(labels: np.ndarray, is_val: np.ndarray, cv_folds: int, seed: int):
    if is_val.any():  # a val/ folder: choose C on it, as the user laid out
        return PredefinedSplit(np.where(is_val, 0, -1))
    smallest = int(np.bincount(labels).min())
    return StratifiedKFold(n_splits=min(cv_folds, smallest), shuffle=True, random_state=seed)


def grid_search(estimator, c_grid: list[float], features: np.ndarray, labels: np.ndarray, is_val: np.ndarray,
                cv_folds: int, seed: int, max_iter: int) -> tuple[object, dict]:
    """C chosen by cross-validation (or on val/), then refitted on all rows."""
    # n_jobs=-1: one single-threaded fit per core ran 6x faster here than sequential fits on threaded BLAS.
    search = GridSearchCV(estimator, {"C": c_grid}, cv=search_folds(labels, is_val, cv_folds, seed), n_jobs=-1)
    with warnings.catch_warnings():
        # scikit-learn hands these filters to its worker processes: without them each candidate C that stops at
        # max_iter prints a ConvergenceWarning of its own (15 in a compare); what matters is the model kept.
        warnings.simplefilter("ignore", ConvergenceWarning)
        search.fit(features, labels)
    if np.max(search.best_estimator_.n_iter_) >= max_iter:
        stage_logger().warning("train: the final fit (C=%g) stopped at max_iter=%d before converging: its scores "
                               "stand, but its weights are not the optimum", search.best_params_["C"], max_iter)
    return search.best_estimator_, {"best_params": {"C": float(search.best_params_["C"])},
                                    "cv_score": float(search.best_score_), "score_name": "cv accuracy"}


def fit_logreg(features, labels, is_val, settings) -> tuple[object, dict]:
    from sklearn.linear_model import LogisticRegression

    # The classic recipe, unscaled: standardising CNN activations cost 3 points on the digits demo.
    return grid_search(LogisticRegression(max_iter=settings.max_iter), settings.c_grid, features, labels, is_val,
                       settings.cv_folds, settings.seed, settings.max_iter)


def fit_linear_svm(features, labels, is_val, settings) -> tuple[object, dict]:
    from sklearn.svm import LinearSVC

    # Confidence at prediction time: a softmax over decision_function (see class_probabilities).
    return grid_search(LinearSVC(max_iter=settings.max_iter, random_state=settings.seed), settings.c_grid, features,
                       labels, is_val, settings.cv_folds, settings.seed, settings.max_iter)


def fit_sgd(read_block: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, labels: np.ndarray,
            is_val: np.ndarray, n_classes: int, block_rows: int, settings) -> tuple[object, dict]:
    """Out of core: the features are read `block_rows` at a time, never all at once.

    One pass fits a StandardScaler incrementally, then `sgd_epochs` passes of SGDClassifier.partial_fit
    (logistic loss, so it has predict_proba) over the blocks in a seeded, shuffled order. The val/ rows,
    when there are any, are held out and scored; otherwise the score is the accuracy on the train rows.
    """
    from sklearn.linear_model import SGDClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(settings.seed)
    fit_rows, fit_labels = (rows[~is_val], labels[~is_val]) if is_val.any() else (rows, labels)
    blocks = [np.arange(start, min(start + block_rows, len(fit_rows))) for start in range(0, len(fit_rows), block_rows)]
    scaler = StandardScaler()
    for block in blocks:
        scaler.partial_fit(read_block(fit_rows[block]))
    sgd = SGDClassifier(loss="log_loss", alpha=settings.sgd_alpha, random_state=settings.seed)
    classes = np.arange(n_classes)
    for _ in range(settings.sgd_epochs):
        for b in rng.permutation(len(blocks)):
            block = blocks[b][rng.permutation(len(blocks[b]))]
            sgd.partial_fit(scaler.transform(read_block(fit_rows[block])), fit_labels[block], classes=classes)
    head = Pipeline([("scale", scaler), ("sgd", sgd)])
    score_rows, score_labels = (rows[is_val], labels[is_val]) if is_val.any() else (rows, labels)
    correct = sum(int((head.predict(read_block(score_rows[s:s + block_rows])) == score_labels[s:s + block_rows]).sum())
                  for s in range(0, len(score_rows), block_rows))
    return head, {"best_params": {"alpha": settings.sgd_alpha, "epochs": settings.sgd_epochs},
                  "cv_score": correct / max(1, len(score_rows)),
                  "score_name": "val accuracy" if is_val.any() else "train accuracy"}


def _carve_validation(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified validation mask of about `fraction` of the rows, at least one row per class."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        mask[members[:max(1, min(len(members) - 1, round(fraction * len(members))))]] = True
    return mask


def _fit_keras(build, features, labels, is_val, settings) -> tuple[object, dict]:
    """Adam; early stopping on val/ or a stratified validation split carved from train; the best
    epoch's weights kept. `build(train_features)` returns the uncompiled model."""
    import keras

    keras.utils.set_random_seed(settings.seed)
    val = is_val if is_val.any() else _carve_validation(labels, settings.validation_fraction, settings.seed)
    model = build(features[~val])
    model.compile(optimizer=keras.optimizers.Adam(settings.learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=settings.patience, restore_best_weights=True)
    fitted = model.fit(features[~val], labels[~val], validation_data=(features[val], labels[val]),
                       epochs=settings.epochs, batch_size=settings.dense_batch_size, callbacks=[stop], verbose=0,
                       shuffle=True)
    history = {name: [float(v) for v in values] for name, values in fitted.history.items()}
    best = int(np.argmin(history["val_loss"]))
    return model, {"best_params": {"epochs": best + 1}, "cv_score": history["val_accuracy"][best],
                   "score_name": "val accuracy", "history": history}


def fit_dense(features, labels, is_val, n_classes: int, settings) -> tuple[object, dict]:
    """Standardise → Dense 256 ReLU → Dropout 0.5 → softmax."""
    import keras

    def build(train: np.ndarray):
        normalise = keras.layers.Normalization(name="standardise")
        normalise.adapt(train)
        inputs = keras.Input((features.shape[1],), name="features")
        hidden = keras.layers.Dense(256, activation="relu", name="hidden")(normalise(inputs))
        hidden = keras.layers.Dropout(0.5, name="dropout")(hidden)
        outputs = keras.layers.Dense(n_classes, activation="softmax", name="classes")(hidden)
        return keras.Model(inputs, outputs, name="dense_head")

    return _fit_keras(build, features, labels, is_val, settings)


def fit_gap(features, labels, is_val, n_classes: int, map_shape: tuple[int, int, int], settings) -> tuple[object, dict]:
    """The unpooled feature map (stored flattened, row-major height × width × channels, by
    `--pooling flatten`) → reshape → global average pooling → standardise → Dropout 0.5 → softmax:
    the pooling happens inside the head."""
    import keras

    def build(train: np.ndarray):
        normalise = keras.layers.Normalization(name="standardise")
        normalise.adapt(train.reshape(len(train), *map_shape).mean(axis=(1, 2)))
        inputs = keras.Input((features.shape[1],), name="feature_map")
        pooled = keras.layers.GlobalAveragePooling2D(name="gap")(keras.layers.Reshape(map_shape, name="map")(inputs))
        hidden = keras.layers.Dropout(0.5, name="dropout")(normalise(pooled))
        outputs = keras.layers.Dense(n_classes, activation="softmax", name="classes")(hidden)
        return keras.Model(inputs, outputs, name="gap_head")

    return _fit_keras(build, features, labels, is_val, settings)
