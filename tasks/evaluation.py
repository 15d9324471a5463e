"""Evaluation: a trained bundle on the store's test rows → metrics and a confusion matrix.

A head on features reads the test rows' stored features; a fine-tuned network (a `keras-model` bundle) reads the
test images themselves, decoded the way extraction decoded them."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    classification_report,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
)

from transfer_flow.storage.content_keys import content_key, package_version
from transfer_flow.storage.errors import BundleError, DatasetError, UnreadableImageError
from transfer_flow.storage.feature_store import FeatureStore, read_contents, read_features
from transfer_flow.storage.model_bundle import ModelBundle, load_head
from transfer_flow.storage.report import DataCheckPictures
from transfer_flow.storage.report_metrics import Baselines, ClassCounts, GalleryImage, Misclassified
from transfer_flow.tasks.baselines import accuracy_interval, baselines
from transfer_flow.tasks.data_checks import SUSPECTS_SHOWN, DataChecks, check_data
from transfer_flow.tasks.heads import class_probabilities
from transfer_flow.tasks.images import decode_image
from transfer_flow.tasks.prediction import image_probabilities
from transfer_flow.tasks.training import CLASSIC_C_GRID

GALLERY_IMAGES = 48  # misclassified images kept for the report, most confident mistakes first
CORRECT_PER_CLASS = 2  # correctly labelled images per class shown with heatmaps beside the mistakes
CORRECT_IMAGES = 40  # at most, whatever the number of classes: each costs a forward pass in the report stage
THUMBNAIL_SIDE = 96
CURVE_POINTS = 200  # points kept per precision-recall curve: enough to draw, small enough to pass between tasks


class PrecisionRecall(BaseModel):
    """One class against the rest, from the head's test scores."""

    precision: list[float]
    recall: list[float]
    average_precision: float


class Evaluation(BaseModel):
    class_names: list[str]
    accuracy: float
    accuracy_ci: tuple[float, float] = Field(description="95% Wilson score interval over the test images.")
    macro_f1: float
    baselines: Baselines = Field(description="The same split scored without the CNN features.")
    n_train: int
    n_test: int
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    classification_report: str
    best_params: dict[str, float]
    misclassified: list[Misclassified] = Field(
        default_factory=list, description=f"At most {GALLERY_IMAGES}, most confident first."
    )
    n_misclassified: int = 0
    correct_examples: list[GalleryImage] = Field(
        default_factory=list,
        description=f"{CORRECT_PER_CLASS} per class (at most {CORRECT_IMAGES}), most confident first.",
    )
    checks: DataChecks = Field(default_factory=DataChecks, description="Feature map, suspect labels, near-duplicates.")
    class_counts: dict[str, ClassCounts] = Field(default_factory=dict, description="Train and test images per class.")
    precision_recall: dict[str, PrecisionRecall] = Field(
        default_factory=dict, description="Per class with test images: its precision-recall curve.")
    seconds: float


# Bump when the same evaluation would give another report (2: report.html, 3: baselines, 4: heatmaps, 5: data checks,
# 6: run context and precision-recall curves, 7: sampled raw-pixel baseline).
REPORT_CODE_VERSION = 7


def report_key(bundle: ModelBundle, store: FeatureStore) -> str:
    """Identifies an evaluation: which head on which rows, by which code."""
    return content_key(bundle.metadata.head_sha256, store.fingerprint(), package_version(), REPORT_CODE_VERSION)


def check_bundle_fits_store(bundle: ModelBundle, store: FeatureStore) -> None:
    """Refuse features the head was not trained on: another width, or the same width from another
    backbone, pooling, image size or preprocessing (efficientnet_lite0 and mobilenet_v2 are both 1,280-d)."""
    meta, made = bundle.metadata, store.extraction
    if meta.feature_dim != store.feature_dim:
        raise BundleError(f"Bundle {bundle.path} expects {meta.feature_dim}-d features "
                          f"({meta.extraction.backbone}), the store has {store.feature_dim}-d")
    if made is None:  # a store not written by extraction: its width is all there is to check
        return
    for field in ("backbone", "pooling", "image_size", "preprocessing"):
        recorded, given = getattr(meta.extraction, field), getattr(made, field)
        if given != recorded:
            raise BundleError(f"Bundle {bundle.path} was trained on features with {field} {recorded}, the store "
                              f"{store.path} has {field} {given}: retrain, or evaluate on a matching store")


def precision_recall_curves(truth: np.ndarray, probabilities: np.ndarray, names: list[str]
                            ) -> dict[str, PrecisionRecall]:
    """Each class with test images against the rest; a curve thinned to CURVE_POINTS points."""
    curves = {}
    for k, name in enumerate(names):
        positive = truth == k
        if not positive.any():
            continue  # no test image of this class: no recall to speak of
        precision, recall, _ = precision_recall_curve(positive, probabilities[:, k])
        keep = np.unique(np.linspace(0, len(recall) - 1, min(len(recall), CURVE_POINTS)).round().astype(int))
        curves[name] = PrecisionRecall(precision=precision[keep].tolist(), recall=recall[keep].tolist(),
                                       average_precision=float(average_precision_score(positive, probabilities[:, k])))
    return curves


def evaluate_bundle(bundle: ModelBundle, store: FeatureStore, *, n_train: int) -> Evaluation:
    started = time.perf_counter()
    check_bundle_fits_store(bundle, store)
    contents = read_contents(store)
    rows = np.flatnonzero((np.asarray(contents.split) == "test") & (contents.view == 0))  # images, not views
    if len(rows) == 0:
        raise DatasetError("No test images left to evaluate on (all unreadable?)")
    truth = contents.labels[rows]
    root = Path(store.attrs.get("dataset_root", ""))
    if bundle.metadata.whole_model:
        probabilities = image_probabilities(bundle, root, [contents.paths[i] for i in rows])
    else:
        probabilities = class_probabilities(load_head(bundle), read_features(store, rows))
    predicted = np.argmax(probabilities, axis=1)
    names = bundle.metadata.class_names
    wrong = np.flatnonzero(predicted != truth)
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")]
    misclassified = [Misclassified(path=contents.paths[rows[i]], true=names[truth[i]], predicted=names[predicted[i]],
                                   confidence=float(probabilities[i, predicted[i]])) for i in wrong[:GALLERY_IMAGES]]
    correct_examples = [GalleryImage(path=contents.paths[rows[i]], true=names[truth[i]], predicted=names[truth[i]],
                                     confidence=float(probabilities[i, truth[i]]))
                        for i in most_confident_correct(truth, predicted, probabilities)]
    # The baselines see the images themselves: augmented views would only repeat their paths.
    train_rows = np.flatnonzero(np.isin(np.asarray(contents.split), ["train", "val"]) & (contents.view == 0))
    params = bundle.metadata.head_params
    compared = baselines(root, [contents.paths[i] for i in train_rows],
                         contents.labels[train_rows], [contents.paths[i] for i in rows], truth,
                         params.get("c_grid") or CLASSIC_C_GRID, int(params.get("seed", 42)))
    # The out-of-fold model for suspect labels: logistic regression at the head's chosen C when it chose one
    # (logreg, linear-svm), else at scikit-learn's default C=1.
    checks = check_data(store, contents, rows, predicted != truth, c=float(params.get("C", 1.0)),
                        seed=int(params.get("seed", 42)))
    indices = list(range(len(names)))
    report = classification_report(truth, predicted, labels=indices, target_names=names, output_dict=True,
                                   zero_division=0)
    return Evaluation(
        class_names=names,
        accuracy=float(accuracy_score(truth, predicted)),
        accuracy_ci=accuracy_interval(int((predicted == truth).sum()), len(rows)),
        baselines=compared,
        macro_f1=float(f1_score(truth, predicted, labels=indices, average="macro", zero_division=0)),
        n_train=n_train, n_test=len(rows),
        per_class={name: {k: float(v) for k, v in report[name].items()} for name in names},
        confusion=confusion_matrix(truth, predicted, labels=indices).tolist(),
        classification_report=classification_report(truth, predicted, labels=indices, target_names=names,
                                                     zero_division=0, digits=4),
        best_params=bundle.metadata.training_summary.get("best_params", bundle.metadata.head_params),
        misclassified=misclassified, n_misclassified=len(wrong), correct_examples=correct_examples,
        checks=checks,
        class_counts={name: ClassCounts(train=int(n_train_images), test=int(n_test_images)) for name, n_train_images,
                      n_test_images in zip(names, np.bincount(contents.labels[train_rows], minlength=len(names)),
                                           np.bincount(truth, minlength=len(names)))},
        precision_recall=precision_recall_curves(truth, probabilities, names),
        seconds=time.perf_counter() - started,
    )


def most_confident_correct(truth: np.ndarray, predicted: np.ndarray, probabilities: np.ndarray) -> list[int]:
    """Indices of up to CORRECT_PER_CLASS correctly labelled rows per class (CORRECT_IMAGES in all), class by class,
    the most confident first within each."""
    chosen: list[int] = []
    for c in range(probabilities.shape[1]):
        right = np.flatnonzero((truth == c) & (predicted == c))
        chosen += right[np.argsort(-probabilities[right, c], kind="stable")][:CORRECT_PER_CLASS].tolist()
    return chosen[:CORRECT_IMAGES]


def thumbnail(root: Path, path: str, side: int = THUMBNAIL_SIDE) -> np.ndarray | None:
    """An image as the network saw it (decoded and resized the same way), small; None if it cannot be read now."""
    try:
        return decode_image(Path(root) / path, side)
    except UnreadableImageError:
        return None


def gallery_thumbnails(root: Path, items: list[Misclassified], side: int = THUMBNAIL_SIDE) -> list[np.ndarray | None]:
    return [thumbnail(root, item.path, side) for item in items]


def data_check_pictures(root: Path, checks: DataChecks, shown: int = SUSPECTS_SHOWN) -> DataCheckPictures:
    """The feature map and the thumbnails of the first `shown` suspect labels and near-duplicate pairs."""
    return DataCheckPictures(
        feature_map=checks.feature_map_points,
        suspects=[(thumbnail(root, item.path), item) for item in checks.suspect_labels[:shown]],
        duplicates=[(thumbnail(root, pair.paths[0]), thumbnail(root, pair.paths[1]), pair)
                    for pair in checks.near_duplicates[:shown]])
