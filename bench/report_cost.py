"""What the report's baselines cost on the demo digits (1,797 images): decoding at 16x16 and the raw-pixel
logistic regression with the classic C grid, on the pipeline's own content-hash split.

Run: .venv/bin/python bench/report_cost.py [DATASET]   (default: the demo digits, written to tmp/digits)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from transfer_flow.storage.demo_dataset import write_digits_dataset
from transfer_flow.tasks.baselines import baselines
from transfer_flow.tasks.hashing import hash_manifest
from transfer_flow.tasks.listing import list_dataset
from transfer_flow.tasks.splitting import split_manifest
from transfer_flow.tasks.training import CLASSIC_C_GRID


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else write_digits_dataset(Path("tmp/digits"))
    manifest = split_manifest(hash_manifest(list_dataset(root))[0], test_size=0.25, seed=42)
    train = [r for r in manifest.records if r.split != "test"]
    test = [r for r in manifest.records if r.split == "test"]
    labels = {name: i for i, name in enumerate(manifest.class_names)}
    started = time.perf_counter()
    result = baselines(root, [r.path for r in train], np.array([labels[r.label] for r in train]),
                       [r.path for r in test], np.array([labels[r.label] for r in test]), CLASSIC_C_GRID, 42)
    print(f"{len(train)} train / {len(test)} test images: majority {result.majority:.4f}, raw pixels "
          f"{result.raw_pixels:.4f}, {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
