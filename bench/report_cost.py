"""What the report stage costs on the demo digits (1,797 images, Lite0 at 224 px, logreg), beside extraction:
the stage is evaluate_bundle (predictions, baselines, data checks) plus write_report (pictures, thumbnails, HTML),
as the pipeline's report stage runs them. Prints wall seconds and CPU seconds (this process and its worker
processes), and, where the data checks exist, what each part costs on its own.

Run: .venv/bin/python bench/report_cost.py                  # extracts and trains once into bench/out/report_cost
     .venv/bin/python bench/report_cost.py --store S --bundle B   # an existing store and bundle
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import psutil

from transfer_flow.storage.demo_dataset import write_digits_dataset
from transfer_flow.storage.model_bundle import load_bundle
from transfer_flow.storage.report import write_report
from transfer_flow.storage.report_metrics import ReportMetrics


def cpu_seconds() -> float:
    """CPU time of this process and its live children (scikit-learn's worker processes among them)."""
    processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


class Clock:
    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *_):
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu
        print(f"  {self.name:<38} {self.wall:7.1f} s wall {self.cpu:7.1f} s CPU")


def demo_store(work: Path):
    from transfer_flow.tasks.extraction import ExtractionSettings, extract_features
    from transfer_flow.tasks.hashing import hash_manifest
    from transfer_flow.tasks.listing import list_dataset
    from transfer_flow.tasks.splitting import split_manifest
    from transfer_flow.tasks.training import TrainingSettings, train_head

    root = write_digits_dataset(work / "digits")
    manifest = split_manifest(hash_manifest(list_dataset(root))[0], test_size=0.25, seed=42)
    with Clock("extraction (Lite0, 224 px)"):
        store = extract_features(manifest, work / "features.h5", ExtractionSettings()).store
    with Clock("training (logreg)"):
        bundle = train_head(store, work / "model", TrainingSettings()).bundle
    return store, bundle


def parts(store, bundle) -> None:
    """Each part of the stage alone (fresh caches), where this checkout has the data checks."""
    try:
        from transfer_flow.tasks import data_checks
    except ImportError:
        return
    from transfer_flow.storage.feature_store import read_contents, read_features
    from transfer_flow.tasks.baselines import _cached, baselines
    from transfer_flow.tasks.training import CLASSIC_C_GRID

    contents = read_contents(store)
    split, view = np.asarray(contents.split), contents.view
    test, train = np.flatnonzero((split == "test") & (view == 0)), np.flatnonzero((split != "test") & (view == 0))
    root = Path(store.attrs["dataset_root"])
    _cached.cache_clear()
    with Clock("baselines (majority, raw pixels)"):
        baselines(root, [contents.paths[i] for i in train], contents.labels[train], [contents.paths[i] for i in test],
                  contents.labels[test], bundle.metadata.head_params.get("c_grid") or CLASSIC_C_GRID, 42)
    images = np.flatnonzero(view == 0)
    most = max(2, data_checks.DATA_CHECK_MAX_BYTES // (4 * store.feature_dim))
    if len(images) > most:  # the checks' own sample of a large store (check_data)
        images = images[data_checks.map_rows(contents.labels[images], split[images] == "test", 42, most)]
        print(f"  (the data checks' sample: {len(images):,} rows)")
        train = images[split[images] != "test"]
    features = read_features(store, images)
    with Clock("near-duplicates"):
        data_checks.near_duplicates(features, [contents.paths[i] for i in images], list(split[images]))
    with Clock("feature map (PCA + t-SNE)"):
        shown = data_checks.map_rows(contents.labels[images], split[images] == "test", 42)
        data_checks.feature_map(features[shown], contents.labels[images[shown]], split[images[shown]] == "test",
                                np.zeros(len(shown), bool), contents.label_names, 42, len(images))
    with Clock("suspect labels (3-fold out-of-fold)"):
        data_checks.out_of_fold_probabilities(features[split[images] != "test"], contents.labels[train],
                                              [contents.hashes[i] for i in train],
                                              float(bundle.metadata.head_params.get("C", 1.0)), 42)
    _cached.cache_clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store")
    parser.add_argument("--bundle")
    parser.add_argument("--work", default="bench/out/report_cost")
    args = parser.parse_args()
    from transfer_flow.storage.feature_store import open_store
    from transfer_flow.tasks import evaluation

    if args.store:
        store, bundle = open_store(args.store), load_bundle(Path(args.bundle))
    else:
        store, bundle = demo_store(Path(args.work))
    print(f"{store.n_rows} rows, {store.feature_dim}-d, head {bundle.metadata.head}")
    parts(store, bundle)
    root = Path(store.attrs["dataset_root"])
    with Clock("report stage: evaluate + write"):
        result = evaluation.evaluate_bundle(bundle, store, n_train=0)
        meta = bundle.metadata
        extra = {}
        if hasattr(result, "checks"):
            extra = dict(checks=evaluation.data_check_pictures(root, result.checks))
        metrics = ReportMetrics(
            accuracy=result.accuracy, macro_f1=result.macro_f1, n_train=result.n_train, n_test=result.n_test,
            head=meta.head, backbone=meta.extraction.backbone, weights_source="-", image_size=meta.extraction.image_size,
            pooling=meta.extraction.pooling, precision=meta.extraction.precision, feature_dim=meta.feature_dim,
            store=str(store.path), class_names=result.class_names, per_class=result.per_class,
            confusion=result.confusion, misclassified=result.misclassified, n_misclassified=result.n_misclassified,
            **(result.checks.model_dump(exclude={"feature_map_points"}) if extra else {}))
        thumbnails = evaluation.gallery_thumbnails(root, result.misclassified)
        write_report(Path(args.work) / "report", metrics, result.classification_report, overwrite=True,
                     gallery=list(zip(thumbnails, result.misclassified)), **extra)
    print(f"accuracy {result.accuracy:.4f}; baselines majority {result.baselines.majority:.4f}, raw pixels "
          f"{result.baselines.raw_pixels:.4f}" + (f"; {result.checks.n_suspect_labels} suspect labels, "
                                                 f"{result.checks.n_near_duplicates} near-duplicate pairs"
                                                 if extra else ""))


if __name__ == "__main__":
    main()
