#!/usr/bin/env python3
"""The sgd head trains on a feature store bigger than the memory it is allowed (issue #7).

    .venv/bin/python bench/sgd_out_of_core.py [--rows 60000] [--dim 1280] [--headroom-mb 120] [--classes 10]

Writes a synthetic float32 store (--rows × --dim, separable clusters, 3/4 train), then, each in a fresh
process capped with RLIMIT_AS at (its address space after imports + --headroom-mb), which is less than
the store's features: (1) `--head sgd` training, which reads the store in chunk-sized blocks, and
(2) reading every train row at once, as the in-memory heads do. Prints the store size, the cap, and
for each: success or MemoryError, seconds, peak RSS.

Measured here (2 CPUs), with the defaults:

    store: 60000 rows x 1280 float32 = 301 MiB on disk (train rows 220 MiB), written in 1.4 s
          sgd: trained, train accuracy 1.0000 in 14.4 s under a cap of imports + 120 MiB (RLIMIT_AS 569 MiB), peak RSS 245 MiB
     load-all: MemoryError in 11.5 s under a cap of imports + 120 MiB (RLIMIT_AS 569 MiB), peak RSS 209 MiB
"""
from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

ATTRS = {"backbone": "synthetic", "weights_source": "random", "image_size": 224, "pooling": "avg",
         "precision": "float32", "preprocessing": "none"}


def write_store(path: Path, rows: int, dim: int, classes: int) -> None:
    from transfer_flow.storage.feature_store import create_store, rows_per_chunk

    rng = np.random.default_rng(0)
    centres = rng.normal(scale=1.0, size=(classes, dim)).astype(np.float32)
    block = 8 * rows_per_chunk(dim)
    with create_store(path, feature_dim=dim, label_names=[f"c{i}" for i in range(classes)], attrs=ATTRS) as writer:
        for start in range(0, rows, block):
            n = min(block, rows - start)
            labels = rng.integers(0, classes, n)
            features = centres[labels] + rng.normal(scale=3.0, size=(n, dim)).astype(np.float32)
            index = range(start, start + n)
            writer.append(features, labels, [f"{i}.png" for i in index],
                          ["test" if i % 4 == 0 else "train" for i in index])


def _address_space() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * resource.getpagesize()


def _child(kind: str, store_path: str, model_dir: str, headroom: int, answer) -> None:
    from transfer_flow.storage.feature_store import open_store, read_contents, read_features
    from transfer_flow.tasks.training import TrainingSettings, train_head

    store = open_store(store_path)
    contents = read_contents(store)
    rows = np.flatnonzero(np.asarray(contents.split) == "train")
    cap = _address_space() + headroom
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    started = time.perf_counter()
    try:
        if kind == "sgd":
            result = train_head(store, Path(model_dir), TrainingSettings(head="sgd", sgd_epochs=3))
            outcome = f"trained, {result.score_name} {result.cv_score:.4f}"
        else:
            outcome = f"loaded {read_features(store, rows).nbytes / 2**20:.0f} MiB"
    except MemoryError:
        outcome = "MemoryError"
    answer.put((outcome, time.perf_counter() - started, cap,
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=60000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--headroom-mb", type=int, default=120)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sgd-bench-", dir=REPO / "bench") as folder:
        store = Path(folder) / "features.h5"
        started = time.perf_counter()
        write_store(store, args.rows, args.dim, args.classes)
        train_mib = args.rows * 3 / 4 * args.dim * 4 / 2**20
        print(f"store: {args.rows} rows x {args.dim} float32 = {store.stat().st_size / 2**20:.0f} MiB on disk "
              f"(train rows {train_mib:.0f} MiB), written in {time.perf_counter() - started:.1f} s")
        context = multiprocessing.get_context("spawn")
        for kind in ("sgd", "load-all"):
            answer = context.Queue()
            child = context.Process(target=_child, args=(kind, str(store), str(Path(folder) / "model"),
                                                         args.headroom_mb * 2**20, answer))
            child.start()
            outcome, seconds, cap, peak = answer.get()
            child.join()
            print(f"{kind:>9}: {outcome} in {seconds:.1f} s under a cap of imports + {args.headroom_mb} MiB "
                  f"(RLIMIT_AS {cap / 2**20:.0f} MiB), peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
