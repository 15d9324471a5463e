#!/usr/bin/env python3
"""How many passes the sgd head needs: test accuracy and train seconds for 5, 10 and 20 epochs over 5 seeds,
beside logreg, on Lite0 (the offline ImageNet package) features of the demo digits: 600 digits at 32 px and all
1,797 at 224 px (test split 25%, seed 42).

    .venv/bin/python bench/sgd_epochs.py [--work bench/out/sgd_epochs]
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("bench/out/sgd_epochs"))
    work = parser.parse_args().work
    os.environ["KERAS_HOME"] = str(work / "keras_home")  # the weight conversion stays out of the user's cache
    from transfer_flow.storage.demo_dataset import write_digits_dataset
    from transfer_flow.tasks.evaluation import evaluate_bundle
    from transfer_flow.tasks.extraction import ExtractionSettings, extract_features
    from transfer_flow.tasks.hashing import hash_manifest
    from transfer_flow.tasks.listing import list_dataset
    from transfer_flow.tasks.splitting import split_manifest
    from transfer_flow.tasks.training import TrainingSettings, train_head

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
        for epochs in (5, 10, 20):
            accuracies, seconds = [], []
            for seed in range(5):
                started = time.perf_counter()
                trained = train_head(store, work / f"sgd_{size}_{epochs}_{seed}",
                                     TrainingSettings(head="sgd", sgd_epochs=epochs, seed=seed), refresh=True)
                seconds.append(time.perf_counter() - started)
                accuracies.append(evaluate_bundle(trained.bundle, store, n_train=trained.n_train).accuracy)
            print(f"  sgd {epochs:>2} epochs: {np.mean(accuracies):.4f} ± {np.std(accuracies):.4f} over 5 seeds, "
                  f"train {np.median(seconds):.2f} s (median)", flush=True)


if __name__ == "__main__":
    main()
