"""The raw-pixel baseline on real digits: it scores the test split, and on a large split a sample of it, said so."""
from __future__ import annotations

import numpy as np

from tests.storage.test_report import metrics
from transfer_flow.storage.demo_dataset import write_digits_dataset
from transfer_flow.storage.report import baseline_lines
from transfer_flow.storage.report_metrics import Baselines
from transfer_flow.tasks import baselines
from transfer_flow.tasks.training import CLASSIC_C_GRID


def digits(tmp_path):
    root = write_digits_dataset(tmp_path / "digits")
    paths = sorted(str(path.relative_to(root)) for path in root.glob("*/*.png"))
    labels = np.array([int(path.split("/")[0]) for path in paths])
    order = np.random.default_rng(0).permutation(len(paths))
    train, test = order[:1200], order[1200:]
    return root, [paths[i] for i in train], labels[train], [paths[i] for i in test], labels[test]


def test_large_splits_are_sampled_and_the_report_says_so(tmp_path, monkeypatch):
    root, train_paths, train_labels, test_paths, test_labels = digits(tmp_path)
    decoded: list[int] = []
    real = baselines._raw_pixels
    monkeypatch.setattr(baselines, "_raw_pixels", lambda root, paths: decoded.append(len(paths)) or real(root, paths))
    monkeypatch.setattr(baselines, "RAW_PIXELS_MAX_TRAIN", 400)
    monkeypatch.setattr(baselines, "RAW_PIXELS_MAX_TEST", 150)

    accuracy, scored = baselines.raw_pixel_accuracy(root, train_paths, train_labels, test_paths, test_labels,
                                                    CLASSIC_C_GRID, seed=42)
    assert decoded == [400, 150] and scored == 150
    assert accuracy > 0.85  # 16x16 digits are easy for logistic regression: the sample still measures that

    line = baseline_lines(metrics().model_copy(update={"baselines": Baselines(
        majority=0.1, raw_pixels=accuracy, raw_pixels_test_images=scored, test_images=len(test_paths))}))[0]
    assert f"on a sample of 150 of the {len(test_paths)} test images" in line


def test_small_splits_are_scored_whole(tmp_path):
    root, train_paths, train_labels, test_paths, test_labels = digits(tmp_path)
    compared = baselines.baselines(root, train_paths, train_labels, test_paths, test_labels, CLASSIC_C_GRID, seed=42)
    assert compared.raw_pixels_test_images == compared.test_images == len(test_paths)
    assert compared.raw_pixels > 0.9
    line = baseline_lines(metrics().model_copy(update={"baselines": compared}))[0]
    assert "sample" not in line and f"{compared.raw_pixels:.4f}" in line
