"""logreg and linear-svm: linear heads, C chosen by cross-validation (or on val/), train rows in memory."""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, PredefinedSplit, StratifiedGroupKFold, StratifiedKFold

from transfer_flow.tasks.heads.inputs import HeadInputs
from transfer_flow.tasks.logs import stage_logger


def search_folds(labels: np.ndarray, is_val: np.ndarray, cv_folds: int, seed: int, groups: np.ndarray | None = None):
    """The folds C is chosen on. With augmented views (rows sharing a group), every view of an image stays in
    the fold of the image: a view scored while its siblings trained the model would inflate the score."""
    if is_val.any():  # a val/ folder: choose C on it, as the user laid out
        return PredefinedSplit(np.where(is_val, 0, -1))
    if groups is not None and len(np.unique(groups)) < len(groups):
        images_per_class = min(len(np.unique(groups[labels == c])) for c in np.unique(labels))
        return StratifiedGroupKFold(n_splits=min(cv_folds, images_per_class), shuffle=True, random_state=seed)
    smallest = int(np.bincount(labels).min())
    return StratifiedKFold(n_splits=min(cv_folds, smallest), shuffle=True, random_state=seed)


def grid_search(estimator, c_grid: list[float], features: np.ndarray, labels: np.ndarray, is_val: np.ndarray,
                cv_folds: int, seed: int, max_iter: int, groups: np.ndarray | None = None) -> tuple[object, dict]:
    """C chosen by cross-validation (or on val/), then refitted on all rows."""
    # n_jobs=-1: one single-threaded fit per core ran 6x faster here than sequential fits on threaded BLAS.
    folds = search_folds(labels, is_val, cv_folds, seed, groups)
    search = GridSearchCV(estimator, {"C": c_grid}, cv=folds, n_jobs=-1)
    with warnings.catch_warnings():
        # scikit-learn hands these filters to its worker processes: without them each candidate C that stops at
        # max_iter prints a ConvergenceWarning of its own (15 in a compare); what matters is the model kept.
        warnings.simplefilter("ignore", ConvergenceWarning)
        search.fit(features, labels, groups=groups if isinstance(folds, StratifiedGroupKFold) else None)
    if np.max(search.best_estimator_.n_iter_) >= max_iter:
        stage_logger().warning("train: the final fit (C=%g) stopped at max_iter=%d before converging: its scores "
                               "stand, but its weights are not the optimum", search.best_params_["C"], max_iter)
    return search.best_estimator_, {"best_params": {"C": float(search.best_params_["C"])},
                                    "cv_score": float(search.best_score_), "score_name": "cv accuracy"}


def fit_logreg(data: HeadInputs, settings) -> tuple[object, dict]:
    from sklearn.linear_model import LogisticRegression

    # The classic recipe, unscaled: standardising CNN activations cost 3 points on the digits demo.
    return grid_search(LogisticRegression(max_iter=settings.max_iter), settings.c_grid, data.features(), data.labels,
                       data.is_val, settings.cv_folds, settings.seed, settings.max_iter, data.groups)


def fit_linear_svm(data: HeadInputs, settings) -> tuple[object, dict]:
    from sklearn.svm import LinearSVC

    # Confidence at prediction time: a softmax over decision_function (see class_probabilities).
    return grid_search(LinearSVC(max_iter=settings.max_iter, random_state=settings.seed), settings.c_grid,
                       data.features(), data.labels, data.is_val, settings.cv_folds, settings.seed, settings.max_iter,
                       data.groups)
