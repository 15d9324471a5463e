"""dense and gap: small Keras heads trained with Adam and early stopping, saved as .keras."""
from __future__ import annotations

import numpy as np

from transfer_flow.tasks.heads.inputs import HeadInputs
from transfer_flow.tasks.heads.standardise import floored_std


def carve_validation(labels: np.ndarray, fraction: float, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """A stratified validation mask of about `fraction` of the images, at least one per class. Rows sharing a
    group (an image's augmented views) land on the same side: a view's siblings in training would flatter it."""
    groups = np.arange(len(labels)) if groups is None else groups
    images, first = np.unique(groups, return_index=True)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = rng.permutation(images[labels[first] == c])
        chosen.extend(members[:max(1, min(len(members) - 1, round(fraction * len(members))))])
    return np.isin(groups, chosen)


def standardise(columns: np.ndarray, name: str):
    """A Normalization layer with the train rows' means and floored deviations (see standardise.py), fixed
    in the saved model rather than adapted (adapt would divide a near-constant column by ~1e-7)."""
    import keras

    return keras.layers.Normalization(mean=columns.mean(axis=0), variance=floored_std(columns.std(axis=0)) ** 2,
                                      name=name)


def _fit_keras(build, features, labels, is_val, settings, groups=None) -> tuple[object, dict]:
    """Adam; early stopping on val/ or a stratified validation split carved from train, which picks the
    number of epochs. With a carved split the head is then refitted from scratch on every train row for that
    many epochs: the carved rows are a fifth of a small training set, and leaving them out cost dense 3
    points on 600 digits (BENCHMARKS.md). `build(train_features)` returns the uncompiled model."""
    import keras

    def compiled(train: np.ndarray):
        keras.utils.set_random_seed(settings.seed)
        model = build(train)
        model.compile(optimizer=keras.optimizers.Adam(settings.learning_rate),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    carved = not is_val.any()
    val = carve_validation(labels, settings.validation_fraction, settings.seed, groups) if carved else is_val
    model = compiled(features[~val])
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=settings.patience, restore_best_weights=True)
    fitted = model.fit(features[~val], labels[~val], validation_data=(features[val], labels[val]),
                       epochs=settings.epochs, batch_size=settings.dense_batch_size, callbacks=[stop], verbose=0,
                       shuffle=True)
    history = {name: [float(v) for v in values] for name, values in fitted.history.items()}
    best = int(np.argmin(history["val_loss"]))
    if carved:
        model = compiled(features)
        model.fit(features, labels, epochs=best + 1, batch_size=settings.dense_batch_size, verbose=0, shuffle=True)
    return model, {"best_params": {"epochs": best + 1}, "cv_score": history["val_accuracy"][best],
                   "score_name": "val accuracy", "history": history}


def fit_dense(data: HeadInputs, settings) -> tuple[object, dict]:
    """Standardise → Dense 256 ReLU → Dropout 0.5 → softmax."""
    import keras

    features = data.features()

    def build(train: np.ndarray):
        inputs = keras.Input((features.shape[1],), name="features")
        hidden = keras.layers.Dense(256, activation="relu", name="hidden")(standardise(train, "standardise")(inputs))
        hidden = keras.layers.Dropout(0.5, name="dropout")(hidden)
        outputs = keras.layers.Dense(data.n_classes, activation="softmax", name="classes")(hidden)
        return keras.Model(inputs, outputs, name="dense_head")

    return _fit_keras(build, features, data.labels, data.is_val, settings, data.groups)


def fit_gap(data: HeadInputs, settings) -> tuple[object, dict]:
    """The unpooled feature map (stored flattened, row-major height × width × channels, by
    `--pooling flatten`) → reshape → global average pooling → standardise → Dropout 0.5 → softmax:
    the pooling happens inside the head."""
    import keras

    features, map_shape = data.features(), data.map_shape

    def build(train: np.ndarray):
        pooled_train = train.reshape(len(train), *map_shape).mean(axis=(1, 2))
        inputs = keras.Input((features.shape[1],), name="feature_map")
        pooled = keras.layers.GlobalAveragePooling2D(name="gap")(keras.layers.Reshape(map_shape, name="map")(inputs))
        hidden = keras.layers.Dropout(0.5, name="dropout")(standardise(pooled_train, "standardise")(pooled))
        outputs = keras.layers.Dense(data.n_classes, activation="softmax", name="classes")(hidden)
        return keras.Model(inputs, outputs, name="gap_head")

    return _fit_keras(build, features, data.labels, data.is_val, settings, data.groups)
