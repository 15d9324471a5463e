"""What the headline is measured against, on the same split: a majority-class guess and logistic regression
on the raw pixels. If the CNN features do not beat raw pixels, the backbone is not earning its keep."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from transfer_flow.storage.report_metrics import Baselines
from transfer_flow.tasks.data_checks import stratified_sample
from transfer_flow.tasks.heads.linear import search_folds
from transfer_flow.tasks.images import decoded_batches

RAW_PIXELS_SIDE = 16  # images downsampled to 16 x 16 RGB: 768 raw features
# Images the raw-pixel baseline decodes and fits at most, so that its cost stops growing with the dataset: at
# 20,000 images 5,000 train + all 5,544 test cost 4.9 s, 2,000 + 2,000 cost 3.4 s of which the fit is most (1,000
# train: 1.6 s). 2,000 sampled test images still pin its accuracy to within ~2 points (95%), enough for a baseline;
# the report says when it was sampled.
RAW_PIXELS_MAX_TRAIN = 2000
RAW_PIXELS_MAX_TEST = 2000
RAW_PIXELS_MAX_ITER = 100  # per C on the path; warm starts make later Cs cheap
# lbfgs stops at this gradient tolerance (scikit-learn's default 1e-4): on the demo the same C and test accuracy
# (0.9716) for a quarter of the CPU (0.9 s instead of 3.8 s; bench/report_cost.py).
RAW_PIXELS_TOL = 1e-3


def accuracy_interval(correct: int, total: int) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy of `correct` out of `total` test images."""
    from scipy.stats import binomtest

    interval = binomtest(int(correct), int(total)).proportion_ci(confidence_level=0.95, method="wilson")
    return float(interval.low), float(interval.high)


def majority_accuracy(train_labels: np.ndarray, test_labels: np.ndarray) -> float:
    return float(np.mean(test_labels == np.bincount(train_labels).argmax()))


def _raw_pixels(root: Path, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(pixels in [0, 1], flattened; mask of the images that decoded)."""
    decoded = [image for batch in decoded_batches([root / p for p in paths], RAW_PIXELS_SIDE, 256) for image in batch]
    readable = np.array([not isinstance(image, str) for image in decoded], bool)
    pixels = np.stack([image.reshape(-1) for image in decoded if not isinstance(image, str)] or
                      [np.zeros(RAW_PIXELS_SIDE * RAW_PIXELS_SIDE * 3, np.uint8)])
    return pixels.astype(np.float32) / 255.0, readable


def raw_pixel_accuracy(root: Path, train_paths: list[str], train_labels: np.ndarray, test_paths: list[str],
                       test_labels: np.ndarray, c_grid: list[float], seed: int) -> tuple[float | None, int]:
    """(accuracy on the test images scored, how many were scored); (None, 0) when too little could be read."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from threadpoolctl import threadpool_limits

    # Each class in proportion, as the data checks sample: every class keeps enough rows for the C search's folds.
    keep = stratified_sample(train_labels, RAW_PIXELS_MAX_TRAIN, seed)
    scored = stratified_sample(test_labels, RAW_PIXELS_MAX_TEST, seed)
    train_x, train_ok = _raw_pixels(root, [train_paths[i] for i in keep])
    test_x, test_ok = _raw_pixels(root, [test_paths[i] for i in scored])
    classes, train_y = np.unique(train_labels[keep][train_ok], return_inverse=True)
    if not test_ok.any() or len(classes) < 2 or np.bincount(train_y).min() < 2:
        return None, 0  # too little left to cross-validate C
    # The same C grid and folds as the logreg head, searched as a regularisation path: each fold fits the Cs in
    # order, each fit starting from the last one's weights, so the large Cs (slow to converge from zero on raw
    # pixels) take a few steps instead of a thousand. One BLAS thread: bench/report_cost.py measured the 18 cold
    # GridSearchCV fits on threaded BLAS at most of the report stage's time (BENCHMARKS.md).
    head = LogisticRegressionCV(Cs=sorted(c_grid), cv=search_folds(train_y, np.zeros(len(train_y), bool), 3, seed),
                                l1_ratios=(0.0,), scoring="accuracy", max_iter=RAW_PIXELS_MAX_ITER, tol=RAW_PIXELS_TOL,
                                use_legacy_attributes=False)
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a baseline: its score matters, not its last digits
        head.fit(train_x, train_y)
    return float(np.mean(classes[head.predict(test_x)] == test_labels[scored][test_ok])), int(test_ok.sum())


@lru_cache(maxsize=8)  # compare evaluates several heads on one store: the baselines are the same for each
def _cached(root: str, train_paths: tuple[str, ...], train_labels: tuple[int, ...], test_paths: tuple[str, ...],
            test_labels: tuple[int, ...], c_grid: tuple[float, ...], seed: int) -> Baselines:
    train_y, test_y = np.array(train_labels), np.array(test_labels)
    raw, scored = raw_pixel_accuracy(Path(root), list(train_paths), train_y, list(test_paths), test_y, list(c_grid),
                                     seed)
    return Baselines(majority=majority_accuracy(train_y, test_y), raw_pixels=raw, raw_pixels_test_images=scored,
                     test_images=len(test_y))


def baselines(root: Path, train_paths: list[str], train_labels: np.ndarray, test_paths: list[str],
              test_labels: np.ndarray, c_grid: list[float], seed: int) -> Baselines:
    return _cached(str(root), tuple(train_paths), tuple(int(v) for v in train_labels), tuple(test_paths),
                   tuple(int(v) for v in test_labels), tuple(c_grid), seed)
