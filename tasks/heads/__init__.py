"""The head zoo: every classifier trained on frozen features, by name, and one way to get class
probabilities from any of them.

`HEADS` is the single source of head names: the settings' `HeadName`, the CLI's choices and help, compare,
training's dispatch and the bundle all read it. Adding a head is one `HeadSpec` entry below plus the
module with its fit (which takes `HeadInputs` and the TrainingSettings, its `epochs` and `learning_rate`
filled with the head's defaults, and returns the fitted head and a summary: best_params, cv_score,
score_name, and history for heads trained by epochs).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from transfer_flow.storage.errors import SettingsError
from transfer_flow.tasks.backbones import Pooling
from transfer_flow.tasks.heads.finetune import fit_finetune
from transfer_flow.tasks.heads.inputs import HeadInputs, TrainingImages
from transfer_flow.tasks.heads.keras_heads import fit_dense, fit_gap
from transfer_flow.tasks.heads.linear import fit_linear_svm, fit_logreg
from transfer_flow.tasks.heads.sgd import fit_sgd

__all__ = ["HEADS", "HeadInputs", "HeadName", "HeadSpec", "TrainingImages", "class_probabilities", "get_head",
           "heads_help"]


@dataclass(frozen=True)
class HeadSpec:
    """What the pipeline needs to know about one head."""

    name: str
    description: str  # one line, for --help and the docs
    fit: Callable[[HeadInputs, Any], tuple[object, dict]]  # (train rows, TrainingSettings) -> (head, summary)
    settings: tuple[str, ...]  # the TrainingSettings fields that decide it: its stage key and bundle record them
    # How the bundle stores it: skops (scikit-learn types only), keras (a head on features, .keras loaded with
    # safe_mode) or keras-model (the whole network, image in, probabilities out; .keras too);
    # storage/model_bundle.py saves and loads each format.
    head_format: Literal["skops", "keras", "keras-model"]
    needs_pooling: Pooling | None = None  # the store's pooling the head requires (None: any)
    reads_in_blocks: bool = False  # streams the store in blocks instead of loading the train rows at once
    reads_images: bool = False  # trains on the images too (HeadInputs.images), not only on the stored features
    epochs: int | None = None  # the head's default for TrainingSettings.epochs (heads trained by epochs)
    learning_rate: float | None = None  # the head's default for TrainingSettings.learning_rate


_C_SEARCH = ("c_grid", "cv_folds", "max_iter")
_EPOCHS = ("epochs", "patience", "validation_fraction", "dense_batch_size", "learning_rate")
_FINETUNE = (*_EPOCHS, "unfreeze", "flip")

HEADS: dict[str, HeadSpec] = {
    spec.name: spec
    for spec in (
        HeadSpec("logreg", "logistic regression, C chosen by cross-validation (the classic recipe)", fit_logreg,
                 _C_SEARCH, "skops"),
        HeadSpec("linear-svm", "linear SVM, C chosen by cross-validation", fit_linear_svm, _C_SEARCH, "skops"),
        HeadSpec("sgd", "logistic loss by SGD out of core: reads the store in blocks, for stores larger than memory",
                 fit_sgd, ("sgd_alpha", "sgd_epochs", "sgd_block_rows"), "skops", reads_in_blocks=True),
        HeadSpec("dense", "Keras Dense 256 + Dropout 0.5, early stopping on validation loss", fit_dense, _EPOCHS,
                 "keras", epochs=100, learning_rate=1e-3),
        HeadSpec("gap", "Keras global average pooling over the unpooled map inside the head (needs pooling flatten)",
                 fit_gap, _EPOCHS, "keras", needs_pooling="flatten", epochs=100, learning_rate=1e-3),
        HeadSpec("finetune", "a linear head on the frozen features, then the top --unfreeze layers of the backbone "
                 "trained with it on the augmented training images at a low learning rate (the whole network is "
                 "the model)", fit_finetune, _FINETUNE, "keras-model", reads_images=True, epochs=20,
                 learning_rate=1e-4),
    )
}

HeadName = Literal[tuple(HEADS)]  # an enum in the UI form, choices on the command line


def get_head(name: str) -> HeadSpec:
    try:
        return HEADS[name]
    except KeyError:
        raise SettingsError(f"Expected a head in {list(HEADS)}, got {name!r}") from None


def heads_help() -> str:
    """One line per head, for --help."""
    return "; ".join(f"{spec.name}: {spec.description}" for spec in HEADS.values())


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def class_probabilities(head, features: np.ndarray) -> np.ndarray:
    """(n, n_classes) scores summing to 1 per row, columns in the head's class order (0..n_classes-1), whose
    argmax is the head's prediction.

    A softmax over decision_function for the scikit-learn heads: for logreg that is its predict_proba
    (multinomial); for linear-svm a ranking-faithful confidence, not a calibrated probability; for sgd
    (one-vs-rest) it replaces predict_proba's normalised sigmoids, which saturate at 1.0 for several classes
    once margins reach ~20 (float32) and then tie, so their argmax was not the prediction (0.808 instead of
    0.896 on the digits demo). The Keras heads (no decision_function) give their softmax output.
    """
    if not hasattr(head, "decision_function"):
        return np.asarray(head.predict_proba(features), dtype=np.float64)
    scores = np.asarray(head.decision_function(features), dtype=np.float64)
    if scores.ndim == 1:  # two classes: one margin for the positive class
        scores = np.stack([-scores / 2, scores / 2], axis=1)
    return _softmax(scores)
