#!/usr/bin/env python3
"""Augmented views on digits (issue #14): the same images and split, --augment 0 against --augment K.

    .venv/bin/python bench/augment_digits.py [--per-class 40] [--image-size 96] [--augment 4] [--head logreg]

Uses the embedded digits (real, far from ImageNet) and the offline EfficientNet-Lite0 ImageNet weights, and
the tasks the pipeline runs (list, hash, split, extract, train, evaluate) without a Prefect server. Prints
one line per setting: rows, extraction seconds, training seconds, test accuracy on the same test images.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=40, help="digits per class (10 classes)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--augment", type=int, default=4)
    parser.add_argument("--head", default="logreg")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "augment")
    args = parser.parse_args()
    from digits_subset import digits_subset

    from transfer_flow.tasks.evaluation import evaluate_bundle
    from transfer_flow.tasks.extraction import ExtractionSettings, extract_features
    from transfer_flow.tasks.hashing import hash_manifest
    from transfer_flow.tasks.listing import list_dataset
    from transfer_flow.tasks.splitting import split_manifest
    from transfer_flow.tasks.training import TrainingSettings, train_head

    dataset = digits_subset(args.workdir, args.per_class)
    manifest, _ = hash_manifest(list_dataset(dataset, seed=42))
    manifest = split_manifest(manifest, test_size=0.25, seed=42)
    print(f"{len(manifest.records)} digits, {args.backbone} at {args.image_size} px, head {args.head}")
    print("augment   rows  extract s  train s  test accuracy")
    for augment in (0, args.augment):
        out = args.workdir / f"out-{augment}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        settings = ExtractionSettings(backbone=args.backbone, image_size=args.image_size, augment=augment)
        started = time.perf_counter()
        extraction = extract_features(manifest, out / "features.h5", settings)
        extracted = time.perf_counter()
        training = train_head(extraction.store, out / "model", TrainingSettings(head=args.head))
        trained = time.perf_counter()
        evaluation = evaluate_bundle(training.bundle, extraction.store, n_train=training.n_train)
        print(f"{augment:7d} {extraction.store.n_rows:6d} {extracted - started:10.1f} {trained - extracted:8.1f}"
              f"  {evaluation.accuracy:.4f} ({evaluation.n_test} test images)")


if __name__ == "__main__":
    main()
