"""finetune: a linear head on the frozen features first, then the top of the backbone and that head trained
together on the training images at a low learning rate; the whole fine-tuned model is the bundle's head.

Phase 1 reads the store only (no extraction): standardise → Dense softmax, Adam, early stopping, the best epoch
kept. A fine-tuned network needs a good starting head: trained from scratch with the backbone, the head's
random gradients wreck the pretrained top layers before it learns anything (MEASURED: a head trained 5 epochs
from scratch ended below the probe). Phase 2 rebuilds the backbone with the store's own weights, makes its top
`unfreeze` layers trainable (BatchNormalization layers excepted: they stay in inference mode, as Keras advises,
so a few small batches cannot overwrite their ImageNet statistics), and trains it with the head on the decoded
training images, augmented on the fly, with early stopping on the validation images; the best epoch is kept,
and that may be the phase-1 model itself when fine-tuning never beats it.
"""
from __future__ import annotations

import math
import sys
import time

import numpy as np

from transfer_flow.storage.errors import DatasetError, StoreError, UnreadableImageError
from transfer_flow.tasks.augmentation import AUGMENT_RECIPE
from transfer_flow.tasks.backbones import backbone_layers, build_feature_model, get_backbone, recorded_weights
from transfer_flow.tasks.heads.inputs import HeadInputs, TrainingImages
from transfer_flow.tasks.heads.keras_heads import carve_validation, standardise
from transfer_flow.tasks.images import decode_image
from transfer_flow.tasks.logs import stage_logger

HEAD_EPOCHS = 100  # phase 1: at most, early stopping ends it (a linear head on features: seconds)
HEAD_LEARNING_RATE = 1e-3
DECODE_THREADS = 2  # PyDataset workers decoding the next batches while the model trains


def fit_finetune(data: HeadInputs, settings) -> tuple[object, dict]:
    """Phase 1 on the stored features, phase 2 on the images; returns the whole model (image → probabilities)."""
    import keras

    images = data.images
    record = images.extraction
    spec = get_backbone(record.backbone)
    keras.utils.set_random_seed(settings.seed)
    own = images.views == 0  # the images themselves; their augmented views (--augment) only feed phase 1
    val_paths = _validation_images(data, images, settings)
    row_val = np.array([path in val_paths for path in images.paths])

    # Phase 1: the head on the frozen features, all views of the training images, view 0 of the validation images.
    features = data.features()
    fit_rows, val_rows = ~row_val, row_val & own
    inputs = keras.Input((features.shape[1],), name="features")
    outputs = keras.layers.Dense(data.n_classes, activation="softmax", name="classes")(
        standardise(features[fit_rows], "standardise")(inputs))
    head = keras.Model(inputs, outputs, name="head")
    head.compile(optimizer=keras.optimizers.Adam(HEAD_LEARNING_RATE), loss="sparse_categorical_crossentropy",
                 metrics=["accuracy"])
    first = head.fit(features[fit_rows], data.labels[fit_rows], epochs=HEAD_EPOCHS,
                     validation_data=(features[val_rows], data.labels[val_rows]),
                     batch_size=settings.dense_batch_size, shuffle=True, verbose=0,
                     callbacks=[keras.callbacks.EarlyStopping(monitor="val_loss", patience=settings.patience,
                                                              restore_best_weights=True)])
    head_history = _curves(first.history)
    best_head = int(np.argmin(head_history["val_loss"]))
    stage_logger().info("finetune: head on the frozen features, %d epochs, best val accuracy %.4f",
                        len(head_history["loss"]), head_history["val_accuracy"][best_head])

    # Phase 2: backbone + pooling + that head as one model, its top layers trainable, on the images.
    unfreeze = spec.finetune_layers if settings.unfreeze is None else settings.unfreeze
    weights = recorded_weights(record.weights, "The store", StoreError)
    feature_model = build_feature_model(spec, image_size=record.image_size, pooling=record.pooling,
                                        precision="float32", weights=weights)
    trainable = set_trainable_top(feature_model, unfreeze)
    image = keras.Input((record.image_size, record.image_size, 3), name="image")
    model = keras.Model(image, head(feature_model(image)), name=f"{spec.name}_finetuned")
    # Augmentation lives only in the model that trains: the saved model sees images as they are.
    trainer = keras.Model(image, model(augmentation(settings.flip)(image)), name="trainer")
    trainer.compile(optimizer=keras.optimizers.Adam(settings.learning_rate), loss="sparse_categorical_crossentropy",
                    metrics=["accuracy"])
    train_idx = np.flatnonzero(own & ~row_val)
    val_idx = np.flatnonzero(own & row_val)
    batches = dict(root=images.root, image_size=record.image_size, preprocess=spec.preprocess,
                   batch_size=settings.dense_batch_size)
    train = image_batches([images.paths[i] for i in train_idx], data.labels[train_idx], seed=settings.seed, **batches)
    val = image_batches([images.paths[i] for i in val_idx], data.labels[val_idx], seed=None, **batches)
    start_loss, start_accuracy = _evaluate(model, val)
    start_weights = model.get_weights()
    started = time.perf_counter()
    second = trainer.fit(train, validation_data=val, epochs=settings.epochs, verbose=0,
                         callbacks=[keras.callbacks.EarlyStopping(monitor="val_loss", patience=settings.patience,
                                                                  restore_best_weights=True),
                                    epoch_progress("finetune", settings.epochs)])
    tuned_history = _curves(second.history)
    seconds = time.perf_counter() - started  # training and validation images, decoding included
    images_per_second = (len(train_idx) + len(val_idx)) * len(tuned_history["loss"]) / seconds
    best = int(np.argmin(tuned_history["val_loss"]))
    if tuned_history["val_loss"][best] > start_loss:  # fine-tuning never beat the phase-1 model: keep that
        model.set_weights(start_weights)
        tuned_epochs, score = 0, start_accuracy
    else:
        tuned_epochs, score = best + 1, tuned_history["val_accuracy"][best]
    history = {name: head_history[name] + tuned_history[name] for name in head_history}
    history["fine_tuning_from_epoch"] = [float(len(head_history["loss"]) + 1)]
    return model, {"best_params": {"head_epochs": best_head + 1, "fine_tune_epochs": tuned_epochs,
                                   "unfreeze": len(trainable)},
                   "cv_score": float(score), "score_name": "val accuracy", "history": history,
                   "fine_tune_images_per_second": images_per_second}


def _validation_images(data: HeadInputs, images: TrainingImages, settings) -> set[str]:
    """The images early stopping watches: val/ when there is one, else a stratified share of the training images
    (carved per image, so no view of a validation image is trained on)."""
    own = np.flatnonzero(images.views == 0)
    if data.is_val.any():
        return {images.paths[i] for i in own if data.is_val[i]}
    carved = carve_validation(data.labels[own], settings.validation_fraction, settings.seed)
    return {images.paths[i] for i in own[carved]}


def set_trainable_top(feature_model, unfreeze: int) -> list:
    """Make the backbone's top `unfreeze` layers trainable and every other layer frozen; BatchNormalization layers
    stay frozen everywhere (a frozen BN layer runs in inference mode in Keras 3). The backbone's own dropout
    (EfficientNet's stochastic depth) is turned off: the head was trained on the features extraction computes,
    without it, and Keras 3 passes training=True into a nested model whatever the call says. Returns the top
    layers."""
    import keras

    layers = backbone_layers(feature_model)
    top = layers[len(layers) - min(unfreeze, len(layers)):] if unfreeze else []
    chosen = {id(layer) for layer in top}
    for layer in layers:
        layer.trainable = id(layer) in chosen and not isinstance(layer, keras.layers.BatchNormalization)
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    return top


def augmentation(flip: bool):
    """Random rotation, shift and zoom (the bounds of --augment's views), and a left-right flip when asked: the
    layers are active only while training."""
    import keras

    recipe = AUGMENT_RECIPE
    layers = [keras.layers.RandomFlip("horizontal")] if flip else []
    layers += [keras.layers.RandomRotation(recipe.rotation_degrees / 360, fill_mode="nearest"),
               keras.layers.RandomTranslation(recipe.shift, recipe.shift, fill_mode="nearest"),
               keras.layers.RandomZoom(recipe.zoom, fill_mode="nearest")]
    return keras.Sequential(layers, name="augmentation")


def image_batches(paths: list[str], labels: np.ndarray, *, root, image_size: int, preprocess, batch_size: int,
                  seed: int | None):
    """Decoded, preprocessed batches of the images (shuffled every epoch when `seed` is given), decoded by
    threads ahead of training: the images are streamed, never all in memory."""
    import keras

    class ImageBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=DECODE_THREADS, use_multiprocessing=False)
            self.order = np.arange(len(paths))
            self.rng = np.random.default_rng(seed) if seed is not None else None
            self.on_epoch_end()

        def __len__(self) -> int:
            return math.ceil(len(paths) / batch_size)

        def __getitem__(self, index: int):
            chosen = self.order[index * batch_size:(index + 1) * batch_size]
            decoded = []
            for i in chosen:
                try:
                    decoded.append(decode_image(root / paths[i], image_size))
                except UnreadableImageError as error:
                    raise DatasetError(f"{paths[i]} can no longer be decoded ({error.reason}): it changed since "
                                       "extraction; run the same command again") from None
            return preprocess(np.stack(decoded)), labels[chosen]

        def on_epoch_end(self) -> None:
            if self.rng is not None:
                self.rng.shuffle(self.order)

    return ImageBatches()


def _evaluate(model, batches) -> tuple[float, float]:
    """Loss and accuracy of `model` (not compiled) on the batches."""
    import keras

    losses, hits, count = 0.0, 0, 0
    for index in range(len(batches)):
        x, y = batches[index]
        probabilities = np.asarray(model(x, training=False))
        losses += float(keras.ops.sum(keras.losses.sparse_categorical_crossentropy(y, probabilities)))
        hits += int((probabilities.argmax(axis=1) == y).sum())
        count += len(y)
    return losses / count, hits / count


def _curves(history: dict) -> dict[str, list[float]]:
    names = ("loss", "accuracy", "val_loss", "val_accuracy")
    return {name: [float(v) for v in history.get(name, [])] for name in names}


def epoch_progress(what: str, epochs: int):
    """A progress bar per epoch on a terminal (tqdm), a log line per epoch otherwise."""
    import keras
    from tqdm import tqdm

    log = stage_logger()
    on_terminal = sys.stderr.isatty()

    class EpochProgress(keras.callbacks.Callback):
        bar = None

        def on_epoch_begin(self, epoch, logs=None):
            if on_terminal:
                self.bar = tqdm(total=self.params.get("steps"), unit="batch", leave=False,
                                desc=f"{what} epoch {epoch + 1}/{epochs}")

        def on_train_batch_end(self, batch, logs=None):
            if self.bar is not None:
                self.bar.update(1)

        def on_epoch_end(self, epoch, logs=None):
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            logs = logs or {}
            log.info("%s: epoch %d/%d, loss %.4f, accuracy %.4f, val loss %.4f, val accuracy %.4f", what, epoch + 1,
                     epochs, logs.get("loss", math.nan), logs.get("accuracy", math.nan),
                     logs.get("val_loss", math.nan), logs.get("val_accuracy", math.nan))

    return EpochProgress()
