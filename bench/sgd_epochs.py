#!/usr/bin/env python3
"""How many passes the sgd head needs: test accuracy and train seconds for 5, 10 and 20 epochs over 5 seeds,
beside logreg, on Lite0 (the offline ImageNet package) features of the demo digits: 600 digits at 32 px and all
1,797 at 224 px (test split 25%, seed 42).

    .venv/bin/python bench/sgd_epochs.py [--work bench/out/sgd_epochs]

With --store, the same on stores that exist (the scale runs' ones, say), epochs and seeds as given, beside the
number of passes the head makes by default for that many rows (sgd_passes):

    .venv/bin/python bench/sgd_epochs.py --store bench/out/scale/out/features.h5 --epochs 2,3,5,10,20 --seeds 3
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np


def sgd_by_epochs(store, work: Path, label: str, epochs: list[int], seeds: int) -> None:
    """Test accuracy (mean ± deviation over seeds) and median train seconds of the sgd head per number of passes.
    Scored here, not by the report stage: its data checks would cost more than the training at 100k rows."""
    from transfer_flow.storage.feature_store import read_contents, read_features
    from transfer_flow.storage.model_bundle import load_head
    from transfer_flow.tasks.training import TrainingSettings, train_head

    contents = read_contents(store)
    test = np.flatnonzero(np.asarray(contents.split) == "test")
    test_features, test_labels = read_features(store, test), contents.labels[test]
    for count in epochs:
        accuracies, seconds = [], []
        for seed in range(seeds):
            started = time.perf_counter()
            trained = train_head(store, work / f"sgd_{label}_{count}_{seed}",
                                 TrainingSettings(head="sgd", sgd_epochs=count, seed=seed), refresh=True)
            seconds.append(time.perf_counter() - started)
            accuracies.append(float((load_head(trained.bundle).predict(test_features) == test_labels).mean()))
        print(f"  sgd {count:>2} epochs: {np.mean(accuracies):.4f} ± {np.std(accuracies):.4f} over {seeds} seeds, "
              f"train {np.median(seconds):.2f} s (median)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("bench/out/sgd_epochs"))
    parser.add_argument("--store", type=Path, action="append", default=[], help="an existing feature store")
    parser.add_argument("--epochs", default="5,10,20")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    work, epochs = args.work, [int(count) for count in args.epochs.split(",")]
    os.environ["KERAS_HOME"] = str(work / "keras_home")  # the weight conversion stays out of the user's cache
    from transfer_flow.storage.demo_dataset import write_digits_dataset
    from transfer_flow.storage.feature_store import open_store, read_contents
    from transfer_flow.tasks.evaluation import evaluate_bundle
    from transfer_flow.tasks.extraction import ExtractionSettings, extract_features
    from transfer_flow.tasks.hashing import hash_manifest
    from transfer_flow.tasks.heads.sgd import sgd_passes
    from transfer_flow.tasks.listing import list_dataset
    from transfer_flow.tasks.splitting import split_manifest
    from transfer_flow.tasks.training import TrainingSettings, train_head

    for number, path in enumerate(args.store):
        store = open_store(path)
        rows = int(np.isin(read_contents(store).split, ["train", "val"]).sum())
        print(f"{path}: {rows:,} training rows, {store.n_rows:,} in all; passes by default: {sgd_passes(rows)}")
        sgd_by_epochs(store, work, f"store{number}", epochs, args.seeds)
    if args.store:
        return
    every = write_digits_dataset(work / "all")
    subset = work / "digits600"
    if not subset.exists():
        for folder in sorted(every.iterdir()):
            (subset / folder.name).mkdir(parents=True)
            for image in sorted(folder.glob("*.png"))[:60]:
                shutil.copy(image, subset / folder.name / image.name)
    for name, root, size in (("600 digits at 32 px", subset, 32), ("1,797 digits at 224 px", every, 224)):
        manifest = split_manifest(hash_manifest(list_dataset(root))[0], test_size=0.25, seed=42)
        store = extract_features(manifest, work / f"features_{size}.h5",
                                 ExtractionSettings(backbone="efficientnet_lite0", image_size=size)).store
        logreg = train_head(store, work / f"logreg_{size}", TrainingSettings(head="logreg"))
        print(f"{name}: logreg {evaluate_bundle(logreg.bundle, store, n_train=logreg.n_train).accuracy:.4f}")
        sgd_by_epochs(store, work, str(size), epochs, args.seeds)


if __name__ == "__main__":
    main()
