#!/usr/bin/env python3
"""Fine-tuning against the linear probe on digits (issue #14): one store, one split, logreg and finetune.

    .venv/bin/python bench/finetune_digits.py [--per-class 100] [--image-size 96] [--epochs N] [--learning-rate F]
                                             [--unfreeze N] [--heads logreg,finetune]

Uses the embedded digits (real handwriting, 8x8 scans shown at 64 px: far from ImageNet) and the offline
EfficientNet-Lite0 ImageNet weights (the default backbone), and the tasks the pipeline runs (list, hash, split,
extract, train, evaluate) without a Prefect server. finetune runs with its defaults unless told otherwise. Prints
per head: test accuracy with its 95% Wilson interval on the same test images, training seconds (both phases for
finetune), and the fine-tuning throughput (training + validation images per second, decoding included).
"""
from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=100, help="digits per class (10 classes)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=None, help="finetune: fine-tuning epochs (default: its own)")
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--unfreeze", type=int, default=None)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--heads", default="logreg,finetune", help="comma-separated, trained in this order")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "finetune")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # the per-epoch lines
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
    out = args.workdir / f"out-{args.per_class}-{args.image_size}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    extraction = extract_features(manifest, out / "features.h5",
                                  ExtractionSettings(backbone=args.backbone, image_size=args.image_size))
    print(f"{len(manifest.records)} digits, {args.backbone} at {args.image_size} px (ImageNet weights: "
          f"{extraction.weights.describe()})")
    print("head       test accuracy (95% interval)    train s  fine-tuning img/s  best")
    for head in args.heads.split(","):
        settings = TrainingSettings(head=head, epochs=args.epochs, learning_rate=args.learning_rate,
                                    unfreeze=args.unfreeze)
        training = train_head(extraction.store, out / head, settings)
        evaluation = evaluate_bundle(training.bundle, extraction.store, n_train=training.n_train)
        low, high = evaluation.accuracy_ci
        speed = training.bundle.metadata.training_summary.get("fine_tune_images_per_second")
        print(f"{head:<10} {evaluation.accuracy:.4f} ({low:.3f}-{high:.3f}, {evaluation.n_test} images)"
              f" {training.fit_seconds:10.1f} {f'{speed:18.1f}' if speed else ' ' * 18}  {training.best_params}")


if __name__ == "__main__":
    main()
