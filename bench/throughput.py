#!/usr/bin/env python3
"""Extraction throughput (issue #5): the classic recipe vs this pipeline on the same photos and backbone.

    .venv/bin/python bench/throughput.py [--images 192] [--backbone vgg16] [--memory-images 0]
    .venv/bin/python bench/throughput.py --runtimes tensorflow,auto [--precision int8] [--dataset demo|photos]

With --runtimes, each runtime's rate is that of a rerun with `--refresh extract` (the first run converts,
calibrates and caches the model once: its extract seconds are reported apart as the one-time cost); on
`--dataset demo` (1,797 digits, ImageNet weights) there is no classic-recipe side.

Prints images/s for the classic recipe (../shared/baseline/seed_pipeline.py extract) and for
`transfer-flow run` (its run.json: seconds.extract covers decode, inference and store writes),
their ratio, the backbone's raw tensor rate on this machine in the precision the pipeline chose
(the limit), decode rate, CLI start-up to the first extracted batch, and peak RSS of each process.
With --memory-images M it also runs the pipeline on M images to compare peak RSS (streaming check).
Photos come from ../shared/datasets/make_datasets.py (JPEG 500×375 crops of two real photos).
Weights: random init for both sides (no network here); the compute is the same as with ImageNet weights.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PYTHON = str(REPO / ".venv" / "bin" / "python")


def measured(
    command: list[str], env: dict[str, str], first_batch: str | None = None
) -> tuple[float, float | None, float, str]:
    """Run `command` in a wrapper process; return (wall s, s to first line matching `first_batch`, peak RSS MiB, output)."""
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "start = time.perf_counter(); first = None; out = []\n"
        "p = subprocess.Popen(sys.argv[2:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)\n"
        "for line in p.stdout:\n"
        "    out.append(line)\n"
        "    if first is None and sys.argv[1] and __import__('re').search(sys.argv[1], line): first = time.perf_counter() - start\n"
        "p.wait()\n"
        "print('\\n'.join(['@@', str(time.perf_counter() - start), str(first), str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss), str(p.returncode)]))\n"
        "sys.stdout.write(''.join(out))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", wrapper, first_batch or "", *command], capture_output=True, text=True, env=env
    )
    head, _, output = done.stdout.partition("\n")
    _, wall, first, rss_kib, code = done.stdout.split("\n")[:5]
    output = "\n".join(done.stdout.split("\n")[5:])
    if code != "0":
        raise SystemExit(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return float(wall), (None if first == "None" else float(first)), int(rss_kib) / 1024, output


def raw_rate(backbone: str, precision: str, batch: int = 32, seconds: float = 10.0) -> float:
    code = f"""
import time, numpy as np, tensorflow as tf
from transfer_flow.tasks.backbones import build_feature_model, get_backbone, resolve_weights
spec = get_backbone({backbone!r})
model = build_feature_model(spec, image_size=spec.native_size, pooling="avg", precision={precision!r}, weights=resolve_weights(spec, "none"))
forward = tf.function(lambda b: model(b, training=False))
x = spec.preprocess(np.random.default_rng(0).integers(0, 255, ({batch}, spec.native_size, spec.native_size, 3)).astype(np.uint8))
forward(x); forward(x)
start, n = time.perf_counter(), 0
while time.perf_counter() - start < {seconds}:
    forward(x); n += {batch}
print(n / (time.perf_counter() - start))
"""
    return float(subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}).stdout.split()[-1])


def decode_rate(folder: Path, size: int) -> float:
    code = f"""
import time
from pathlib import Path
from transfer_flow.tasks.images import decode_image
files = sorted(Path({str(folder)!r}).glob("*/*.jpg"))[:200]
start = time.perf_counter()
for f in files: decode_image(f, {size})
print(len(files) / (time.perf_counter() - start))
"""
    return float(subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1])


def photos(folder: Path, n: int) -> Path:
    if not folder.is_dir() or sum(1 for _ in folder.glob("*/*.jpg")) != n:
        subprocess.run(
            [PYTHON, str(SHARED / "datasets" / "make_datasets.py"), "photos", str(folder), str(n)], check=True
        )
    return folder


def pipeline(dataset: Path, output: Path, backbone: str, env: dict[str, str], *extra: str,
             refresh: str = "all", weights: str = "none") -> tuple[dict, float | None, float]:
    wall, first, rss, _ = measured(
        [str(REPO / ".venv/bin/transfer-flow"), "run", str(dataset), "--output", str(output), "--backbone", backbone,
         "--weights", weights, "--refresh", refresh, "--overwrite", *extra],
        env,
        first_batch=r"extract: \d+/\d+ images",
    )
    return json.loads((output / "run.json").read_text()), first, rss


def demo_dataset(folder: Path) -> Path:
    if not folder.is_dir():
        sys.path.insert(0, str(REPO))
        from transfer_flow.storage.demo_dataset import write_digits_dataset

        write_digits_dataset(folder)
    return folder


def compare_runtimes(args: argparse.Namespace, env: dict[str, str]) -> None:
    """Each runtime: a first run (converts and caches once), then a rerun with --refresh extract (the rate)."""
    if args.dataset == "demo":
        data, weights = demo_dataset(args.workdir / "demo-digits"), "imagenet"
    else:
        data, weights = photos(args.workdir / f"photos-{args.images}", args.images), "none"
    rows = []
    if args.dataset == "photos":
        _, _, _, out = measured(
            [PYTHON, str(SHARED / "baseline" / "seed_pipeline.py"), "extract", str(data),
             str(args.workdir / "classic.h5"), "--weights", "none"], env)
        rows.append(("classic recipe (fp32 model.predict)", float(re.search(r"images/s: ([\d.]+)", out).group(1)),
                     None, ""))
    for runtime in args.runtimes.split(","):
        extra = ["--runtime", runtime] + (["--precision", args.precision] if args.precision and runtime != "tensorflow"
                                          else [])
        output = args.workdir / f"runtime-{args.dataset}-{args.backbone}-{runtime}-{args.precision or 'auto'}"
        first, _, _ = pipeline(data, output, args.backbone, env, *extra, refresh="all", weights=weights)
        again, _, _ = pipeline(data, output, args.backbone, env, *extra, refresh="extract", weights=weights)
        rows.append((f"{runtime} -> {again['runtime']} {again['precision']}",
                     again["images_extracted"] / again["seconds"]["extract"], first["seconds"]["extract"]
                     - again["seconds"]["extract"], f"accuracy {again['accuracy']:.4f}"))
    print(f"machine: {os.cpu_count()} CPUs; backbone {args.backbone}; dataset {data.name} ({weights} weights)")
    for name, rate, once, note in rows:
        ratio = rate / rows[0][1]
        print(f"{name:<40} {rate:7.2f} img/s  {ratio:5.2f}x the first row"
              + (f"  (first run +{once:.1f} s: conversion/calibration/compile)" if once is not None else "")
              + (f"  {note}" if note else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--memory-images", type=int, default=0, help="also run the pipeline on this many images")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "throughput")
    parser.add_argument("--runtimes", help="comma-separated runtimes to compare (auto, tensorflow, openvino)")
    parser.add_argument("--precision", help="with --runtimes: the precision asked of the non-TensorFlow runtimes")
    parser.add_argument("--dataset", choices=["photos", "demo"], default="photos")
    args = parser.parse_args()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    if args.runtimes:
        return compare_runtimes(args, env)
    data = photos(args.workdir / f"photos-{args.images}", args.images)

    classic_wall, _, classic_rss, out = measured(
        [PYTHON, str(SHARED / "baseline" / "seed_pipeline.py"), "extract", str(data), str(args.workdir / "classic.h5"),
         "--weights", "none"], env)
    classic_rate = float(re.search(r"images/s: ([\d.]+)", out).group(1))
    summary, first, rss = pipeline(data, args.workdir / f"ours-{args.images}-{args.backbone}", args.backbone, env)
    ours_rate = summary["images_extracted"] / summary["seconds"]["extract"]
    raw = raw_rate(args.backbone, summary["precision"])
    from_spec = (
        __import__("transfer_flow.tasks.backbones", fromlist=["get_backbone"]).get_backbone(args.backbone).native_size
    )
    decode = decode_rate(data, from_spec)
    print(f"machine: {os.cpu_count()} CPUs; backbone {args.backbone}, {args.images} JPEG 500x375")
    print(
        f"classic recipe:   {classic_rate:7.2f} img/s  (fp32 model.predict, load_img loop)  peak RSS {classic_rss:6.0f} MiB"
    )
    print(
        f"transfer-flow:    {ours_rate:7.2f} img/s  ({summary['precision']}; decode+inference+store)  peak RSS {rss:6.0f} MiB"
    )
    print(f"ratio:            {ours_rate / classic_rate:7.2f}x the classic recipe")
    print(
        f"raw tensor rate:  {raw:7.2f} img/s  ({summary['precision']}, tf.function, batch 32) -> end-to-end = {ours_rate / raw:.2f}x raw"
    )
    print(f"decode rate:      {decode:7.2f} img/s  (one thread)")
    print(f"CLI start to first batch: {first:.1f} s" if first is not None else "CLI start to first batch: n/a")
    if args.memory_images:
        big = photos(args.workdir / f"photos-{args.memory_images}", args.memory_images)
        big_summary, _, big_rss = pipeline(
            big, args.workdir / f"ours-{args.memory_images}-{args.backbone}", args.backbone, env
        )
        print(
            f"memory: {args.images} images -> {rss:.0f} MiB; {args.memory_images} images -> {big_rss:.0f} MiB "
            f"({big_rss / rss:.2f}x); {big_summary['images_extracted'] / big_summary['seconds']['extract']:.2f} img/s"
        )


if __name__ == "__main__":
    main()
