#!/usr/bin/env python3
"""What a runtime's precision costs in accuracy, measured on the features a user's head trains on: Lite0 (the offline
ImageNet package) at 224 px on all 1,797 demo digits, extracted once per runtime and precision, then the logreg
head's model (standardised features, logistic regression) scored by 5-fold cross-validation repeated 3 times on the
same folds for every extraction. The difference to OpenVINO float32 is paired fold by fold, so a single split's
noise (one test image = 0.24 points on the demo) does not read as a precision cost.

    .venv/bin/python bench/precision_cost.py [--work bench/out/precision_cost]
        [--runs openvino:float32,openvino:bfloat16,openvino:int8,tensorflow:float32,tensorflow:bfloat16]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

DEFAULT_RUNS = "openvino:float32,openvino:bfloat16,openvino:int8,tensorflow:float32,tensorflow:bfloat16"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("bench/out/precision_cost"))
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="runtime:precision pairs; the first is the reference")
    args = parser.parse_args()
    os.environ["KERAS_HOME"] = str(args.work / "keras_home")  # the weight conversion stays out of the user's cache
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import RepeatedStratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from transfer_flow.storage.demo_dataset import write_digits_dataset
    from transfer_flow.storage.feature_store import read_contents, read_features
    from transfer_flow.tasks.extraction import ExtractionSettings, extract_features
    from transfer_flow.tasks.hashing import hash_manifest
    from transfer_flow.tasks.listing import list_dataset
    from transfer_flow.tasks.splitting import split_manifest

    manifest = split_manifest(hash_manifest(list_dataset(write_digits_dataset(args.work / "digits")))[0],
                              test_size=0.25, seed=42)  # int8 calibrates on the train split's images only
    folds = RepeatedStratifiedKFold(n_splits=5, n_repeats=3, random_state=0)
    reference = None
    print("runtime:precision  mean accuracy (15 folds) per C  | difference to the first, mean ± standard error")
    for run in args.runs.split(","):
        runtime, precision = run.split(":")
        store = extract_features(manifest, args.work / f"{runtime}-{precision}.h5",
                                 ExtractionSettings(backbone="efficientnet_lite0", image_size=224, runtime=runtime,
                                                    precision=precision)).store
        contents = read_contents(store)
        order = np.argsort(contents.paths)  # the same image in the same place for every extraction
        features, labels = read_features(store, np.arange(store.n_rows))[order], contents.labels[order]
        scores = {c: cross_val_score(make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)),
                                     features, labels, cv=folds, n_jobs=2) for c in (0.01, 0.1, 1.0)}
        reference = reference or scores
        print(f"{run:20s} " + "  ".join(
            f"C={c}: {s.mean():.4f} | {100 * (s - reference[c]).mean():+.2f} ± "
            f"{100 * (s - reference[c]).std(ddof=1) / np.sqrt(len(s)):.2f}" for c, s in scores.items()), flush=True)


if __name__ == "__main__":
    main()
