"""Evaluation: a trained bundle on the store's test rows → metrics and a confusion matrix."""
from __future__ import annotations

import hashlib
import time

import numpy as np
from pydantic import BaseModel
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

from storage.errors import BundleError, DatasetError
from storage.feature_store import FeatureStore, package_version, read_contents, read_features
from storage.model_bundle import ModelBundle, load_head


class Evaluation(BaseModel):
    class_names: list[str]
    accuracy: float
    macro_f1: float
    n_train: int
    n_test: int
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    classification_report: str
    best_params: dict[str, float]
    seconds: float


def report_key(bundle: ModelBundle, store: FeatureStore) -> str:
    """Identifies an evaluation: which head on which rows, by which code."""
    identity = f"{bundle.metadata.head_sha256}:{store.fingerprint()}:{package_version()}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def evaluate_bundle(bundle: ModelBundle, store: FeatureStore, *, n_train: int) -> Evaluation:
    started = time.perf_counter()
    if bundle.metadata.feature_dim != store.feature_dim:
        raise BundleError(f"Bundle {bundle.path} expects {bundle.metadata.feature_dim}-d features "
                          f"({bundle.metadata.backbone}), the store has {store.feature_dim}-d")
    contents = read_contents(store)
    rows = np.flatnonzero(np.asarray(contents.split) == "test")
    if len(rows) == 0:
        raise DatasetError("No test images left to evaluate on (all unreadable?)")
    truth = contents.labels[rows]
    predicted = load_head(bundle).predict(read_features(store, rows))
    names = bundle.metadata.class_names
    indices = list(range(len(names)))
    report = classification_report(truth, predicted, labels=indices, target_names=names, output_dict=True,
                                   zero_division=0)
    return Evaluation(
        class_names=names,
        accuracy=float(accuracy_score(truth, predicted)),
        macro_f1=float(f1_score(truth, predicted, labels=indices, average="macro", zero_division=0)),
        n_train=n_train, n_test=len(rows),
        per_class={name: {k: float(v) for k, v in report[name].items()} for name in names},
        confusion=confusion_matrix(truth, predicted, labels=indices).tolist(),
        classification_report=classification_report(truth, predicted, labels=indices, target_names=names,
                                                     zero_division=0, digits=4),
        best_params=bundle.metadata.head_params,
        seconds=time.perf_counter() - started,
    )
