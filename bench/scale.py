#!/usr/bin/env python3
"""Scale benchmark: does a run cost what is new, not what is there? Cold run, warm rerun, +10% images.

    .venv/bin/python bench/scale.py [--images 20000] [--workdir DIR] [--skip-cold-extra]

Generates N tiny images (32x32 PNGs, 10 classes, a class colour plus noise) and 10% more, starts one
Prefect server (its start is not counted), then runs the CLI three times on the same output:

    transfer-flow run DATA --output OUT --backbone mobilenet_v2 --weights none --image-size 32 --head sgd

cold (empty output), warm (nothing changed) and +10% (the extra images copied in). Prints, per run, the
CLI's wall time, the flow's own seconds from run.json (list, extract, train, evaluate, total) and each
Prefect task's run time read back from the server.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLASSES = 10
RUN_ARGS = ["--backbone", "mobilenet_v2", "--weights", "none", "--image-size", "32", "--head", "sgd"]


def write_images(root: Path, start: int, count: int, seed: int) -> None:
    """`count` images numbered from `start`, spread over the classes: a class colour plus noise, distinct bytes."""
    rng = np.random.default_rng(seed)
    colours = np.random.default_rng(0).integers(30, 226, size=(CLASSES, 3))
    for folder in range(CLASSES):
        (root / f"class_{folder}").mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        label = i % CLASSES
        pixels = np.clip(colours[label] + rng.normal(0, 40, size=(32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"class_{label}" / f"img_{i:07d}.png")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def task_seconds(api_url: str) -> dict[str, float]:
    """Run time of each task of the latest flow run on the server, by task name (repeats summed)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as client:
        latest = (await client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1))[0]
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[latest.id])))
    seconds: dict[str, float] = {}
    for run in runs:
        name = run.name.rsplit("-", 1)[0]
        seconds[name] = seconds.get(name, 0.0) + run.total_run_time.total_seconds()
    return seconds


def run_cli(dataset: Path, output: Path, env: dict[str, str]) -> dict:
    started = time.perf_counter()
    done = subprocess.run([str(REPO / ".venv/bin/transfer-flow"), "run", str(dataset), "--output", str(output),
                           *RUN_ARGS], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads((output / "run.json").read_text())
    os.environ["PREFECT_API_URL"] = env["PREFECT_API_URL"]
    return {"wall": wall, "summary": summary, "tasks": asyncio.run(task_seconds(env["PREFECT_API_URL"]))}


def describe(name: str, run: dict) -> str:
    s = run["summary"]
    seconds = s["seconds"]
    tasks = ", ".join(f"{k} {v:.2f}" for k, v in sorted(run["tasks"].items(), key=lambda kv: -kv[1]) if v >= 0.05)
    return (f"{name:>6}: {s['images_extracted']} extracted, {s['images_reused']} reused; flow "
            f"{seconds['total']:.2f} s (list+split {seconds['list']:.2f}, extract {seconds['extract']:.2f}, "
            f"train {seconds['train']:.2f}, evaluate+report {seconds['evaluate']:.2f}); CLI wall {run['wall']:.1f} s"
            f"\n        tasks (s): {tasks}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "scale")
    args = parser.parse_args()

    shutil.rmtree(args.workdir, ignore_errors=True)
    dataset, extra, output = args.workdir / "data", args.workdir / "extra", args.workdir / "out"
    started = time.perf_counter()
    write_images(dataset, 0, args.images, seed=1)
    write_images(extra, args.images, args.images // 10, seed=2)
    print(f"generated {args.images} + {args.images // 10} images in {time.perf_counter() - started:.1f} s")

    port = free_port()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PREFECT_HOME": str(args.workdir / "prefect-home"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen([str(REPO / ".venv/bin/prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import urllib.request

        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the Prefect server did not start in 180 s") from None
                time.sleep(1)
        cold = run_cli(dataset, output, env)
        print(describe("cold", cold), flush=True)
        warm = run_cli(dataset, output, env)
        print(describe("warm", warm), flush=True)
        for path in extra.rglob("*.png"):
            shutil.copy2(path, dataset / path.relative_to(extra))
        grown = run_cli(dataset, output, env)
        print(describe("+10%", grown), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    cold_s, grown_s = cold["summary"]["seconds"], grown["summary"]["seconds"]
    print(f"warm flow {warm['summary']['seconds']['total']:.2f} s; +10% flow excluding training "
          f"{grown_s['total'] - grown_s['train']:.2f} s = "
          f"{(grown_s['total'] - grown_s['train']) / (cold_s['total'] - cold_s['train']):.1%} of cold's "
          f"{cold_s['total'] - cold_s['train']:.2f} s; training cold {cold_s['train']:.2f} s, "
          f"+10% {grown_s['train']:.2f} s")


if __name__ == "__main__":
    main()
