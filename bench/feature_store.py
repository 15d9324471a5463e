#!/usr/bin/env python3
"""Feature-store benchmark (issue #5): HDF5 vs zarr, float32 vs float16, one writer vs several.

    .venv/bin/python bench/feature_store.py [--rows 10000] [--dim 1280] [--source STORE] [--repeat 3]

Rows are real CNN features tiled to --rows (from --source, default the demo's
demo-output/run/features.h5 when it exists: efficientnet_lite0, 1,280 wide), else synthetic
non-negative sparse values shaped like ReLU-then-average-pooled activations. Each figure is the best
of --repeat runs. Writes go through `create_store` in blocks of 8 row chunks, as extraction does.
"""
from __future__ import annotations

import argparse
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from transfer_flow.storage.feature_store import (  # noqa: E402
    create_store,
    open_store,
    read_contents,
    read_features,
    rows_per_chunk,
)
from transfer_flow.storage.feature_store.concurrent_zarr import (  # noqa: E402
    commit_store,
    preallocate_zarr_store,
    write_rows,
)


def source_rows(source: Path | None, rows: int, dim: int) -> tuple[np.ndarray, str]:
    if source is not None and source.exists():
        store = open_store(source)
        base = read_features(store, np.arange(store.n_rows))
        if base.shape[1] == dim:
            return np.resize(base, (rows, dim)).astype(np.float32), f"{source} ({store.n_rows} real rows, tiled)"
    rng = np.random.default_rng(0)
    synthetic = np.maximum(rng.normal(-0.3, 1.0, size=(rows, dim)), 0) * rng.gamma(2.0, 0.5, size=(1, dim))
    return synthetic.astype(np.float32), "synthetic ReLU-like rows"


def disk_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write(path: Path, features: np.ndarray, dtype: str) -> None:
    n, dim = features.shape
    labels = np.arange(n) % 10
    block = 8 * rows_per_chunk(dim)
    with create_store(path, feature_dim=dim, label_names=[str(i) for i in range(10)], attrs={}, dtype=dtype,
                      overwrite=True) as writer:
        for start in range(0, n, block):
            end = min(n, start + block)
            writer.append(features[start:end], labels[start:end], [f"{i % 10}/{i:06d}.png" for i in range(start, end)],
                          ["train"] * (end - start), [f"{i:064x}" for i in range(start, end)])


def write_parallel(path: Path, features: np.ndarray, dtype: str, workers: int, pool: ProcessPoolExecutor) -> None:
    n, dim = features.shape
    labels = np.arange(n) % 10
    tmp = preallocate_zarr_store(path, n_rows=n, feature_dim=dim, label_names=[str(i) for i in range(10)], attrs={},
                                 dtype=dtype, overwrite=True)
    step = -(-n // workers)
    step = -(-step // rows_per_chunk(dim, np.dtype(dtype))) * rows_per_chunk(dim, np.dtype(dtype))  # aligned ranges
    jobs = [
        pool.submit(
            write_rows,
            tmp,
            s,
            features[s : s + step],
            labels[s : s + step],
            [f"{i % 10}/{i:06d}.png" for i in range(s, min(n, s + step))],
            ["train"] * len(labels[s : s + step]),
            [f"{i:064x}" for i in range(s, min(n, s + step))],
        )
        for s in range(0, n, step)
    ]
    for job in jobs:
        job.result()
    commit_store(tmp, path, overwrite=True)


def best(repeat: int, action) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--source", type=Path, default=REPO / "demo-output" / "run" / "features.h5")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "feature_store")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    features, origin = source_rows(args.source, args.rows, args.dim)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    print(f"{args.rows}x{args.dim} rows from {origin}; best of {args.repeat}")
    print("store          dtype     MiB  write s  read-all s  read 2k random s  read_contents s")
    rng = np.random.default_rng(1)
    random_rows = rng.choice(args.rows, size=min(2000, args.rows), replace=False)
    for name in ("features.h5", "features.zarr"):
        for dtype in ("float32", "float16"):
            path = args.workdir / name
            write_s = best(args.repeat, lambda: write(path, features, dtype))
            store = open_store(path)
            read_all = best(args.repeat, lambda: read_features(store, np.arange(store.n_rows)))
            read_random = best(args.repeat, lambda: read_features(store, random_rows))
            contents = best(args.repeat, lambda: read_contents(store))
            got = read_features(store, np.arange(store.n_rows))
            assert np.array_equal(got, features.astype(dtype).astype(np.float32))
            print(f"{name:<15}{dtype:<8}{disk_bytes(path) / 2**20:6.1f}  {write_s:7.2f}  {read_all:10.2f}  "
                  f"{read_random:16.2f}  {contents:15.2f}")
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(rows_per_chunk, 1).result()  # start and import before timing
        path = args.workdir / "parallel.zarr"
        seconds = best(args.repeat, lambda: write_parallel(path, features, "float32", args.workers, pool))
        assert np.array_equal(read_features(open_store(path), np.arange(args.rows)), features)
        print(f"zarr, {args.workers} processes writing disjoint ranges (preallocate, write_rows, commit): "
              f"{seconds:.2f} s, float32")


if __name__ == "__main__":
    main()
