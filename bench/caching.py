#!/usr/bin/env python3
"""Caching benchmark (issue #4): cold run, warm rerun, +10% images, and CLI start-up.

    .venv/bin/python bench/caching.py [--images N] [--backbone NAME] [--workdir DIR]

Uses the embedded digits (PNG, 64×64) so it runs offline. Prints one line per measurement; the
extraction figures are the flow's own `seconds.extract` from run.json (decode + inference + store).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(dataset: Path, output: Path, backbone: str, env: dict[str, str]) -> tuple[float, dict]:
    started = time.perf_counter()
    subprocess.run([str(REPO / ".venv/bin/transfer-flow"), "run", str(dataset), "--output", str(output),
                    "--backbone", backbone], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started, json.loads((output / "run.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1797, help="digits to use (at most 1797)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "caching")
    args = parser.parse_args()
    from transfer_flow.storage.demo_dataset import write_digits_dataset

    shutil.rmtree(args.workdir, ignore_errors=True)
    source = write_digits_dataset(args.workdir / "all")
    files = sorted(source.glob("*/*.png"))[: args.images]
    base_count = int(len(files) / 1.1)
    dataset = args.workdir / "dataset"
    for path in files[:base_count]:
        (dataset / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dataset / path.parent.name / path.name)
    output = args.workdir / "out"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

    wall, cold = run_cli(dataset, output, args.backbone, env)
    print(f"cold:        {cold['images_extracted']} images extracted, extract {cold['seconds']['extract']:.2f} s, "
          f"flow total {cold['seconds']['total']:.2f} s, CLI wall {wall:.2f} s")
    wall, warm = run_cli(dataset, output, args.backbone, env)
    print(
        f"warm:        {warm['images_extracted']} extracted, {warm['images_hashed']} hashed, cached {warm['cached']}, "
        f"extract {warm['seconds']['extract']:.3f} s = {warm['seconds']['extract'] / cold['seconds']['extract']:.2%} of cold, "
        f"flow total {warm['seconds']['total']:.2f} s, CLI wall {wall:.2f} s"
    )
    for path in files[base_count:]:
        shutil.copy2(path, dataset / path.parent.name / path.name)
    wall, grown = run_cli(dataset, output, args.backbone, env)
    print(
        f"+{len(files) - base_count} images ({(len(files) - base_count) / base_count:.0%}): "
        f"{grown['images_extracted']} extracted, {grown['images_reused']} reused, extract "
        f"{grown['seconds']['extract']:.2f} s = {grown['seconds']['extract'] / cold['seconds']['extract']:.2%} of cold"
    )

    # Start-up: the same warm run against an already running server instead of a temporary one.
    home = args.workdir / "prefect-home"
    server_env = {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_API_PORT": "4290"}
    server = subprocess.Popen(
        [str(REPO / ".venv/bin/prefect"), "server", "start", "--host", "127.0.0.1", "--port", "4290"],
        env=server_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client_env = {**env, "PREFECT_HOME": str(home), "PREFECT_API_URL": "http://127.0.0.1:4290/api"}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            probe = subprocess.run(
                [
                    str(REPO / ".venv/bin/python"),
                    "-c",
                    "import urllib.request; urllib.request.urlopen('http://127.0.0.1:4290/api/health', timeout=2)",
                ],
                capture_output=True,
            )
            if probe.returncode == 0:
                break
            time.sleep(1)
        run_cli(dataset, output, args.backbone, client_env)  # fills this server's result cache
        wall, served = run_cli(dataset, output, args.backbone, client_env)
        print(f"warm, running server: flow total {served['seconds']['total']:.2f} s, CLI wall {wall:.2f} s")
    finally:
        server.terminate()
        server.wait(timeout=30)
    started = time.perf_counter()
    subprocess.run([str(REPO / ".venv/bin/transfer-flow"), "--help"], check=True, stdout=subprocess.DEVNULL)
    print(f"transfer-flow --help: {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
