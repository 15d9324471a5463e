#!/usr/bin/env python3
"""Start-up benchmark (issue #11): `run` start → first extracted batch, and `predict` on 3 images.

    .venv/bin/python bench/startup.py [--images N] [--repeat R] [--workdir DIR]

Each measurement is a fresh `transfer-flow` process with no PREFECT_API_URL and no server on 127.0.0.1:4200
(so the process pays for its temporary Prefect server, as a new user's first command does), output not a
terminal (so extraction prints a line per ~10% instead of a bar). "first batch" is the moment the first
`extract: i/N images` line appears; "lines" counts what the user reads for the whole run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = str(REPO / ".venv/bin/transfer-flow")
FIRST_BATCH = "extract: "  # the progress line: "extract: 32/120 images"


def timed_run(dataset: Path, output: Path, env: dict[str, str]) -> tuple[float, float, int]:
    """Seconds to the first extracted batch, seconds in all, lines printed."""
    started = time.perf_counter()
    process = subprocess.Popen([CLI, "run", str(dataset), "--output", str(output)], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first, lines = None, 0
    for line in process.stdout:
        lines += 1
        if first is None and FIRST_BATCH in line and "/" in line.split(FIRST_BATCH, 1)[1].split()[0]:
            first = time.perf_counter() - started
    if process.wait() != 0:
        raise SystemExit(f"run failed with exit code {process.returncode}")
    return first or float("nan"), time.perf_counter() - started, lines


def timed_predict(bundle: Path, images: list[Path], env: dict[str, str]) -> tuple[float, int]:
    started = time.perf_counter()
    done = subprocess.run([CLI, "predict", str(bundle), *map(str, images)], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - started, len(done.stdout.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=120, help="digits to run on (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="cold runs to take the median of (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "startup")
    args = parser.parse_args()
    from transfer_flow.storage.demo_dataset import write_digits_dataset

    shutil.rmtree(args.workdir, ignore_errors=True)
    source = write_digits_dataset(args.workdir / "all")
    dataset = args.workdir / "dataset"
    files = sorted(source.glob("*/*.png"))[:: max(1, 1797 // args.images)][: args.images]
    for path in files:
        (dataset / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dataset / path.parent.name / path.name)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(args.workdir / "prefect-home")  # a new user's: no profile, an empty database
    # Two shared cores can take longer than Prefect's default 20 s to start the temporary server.
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

    firsts, totals, lines = [], [], 0
    for k in range(args.repeat):
        first, total, lines = timed_run(dataset, args.workdir / f"run-{k}", env)
        firsts.append(first)
        totals.append(total)
        print(f"run {k}: first extracted batch at {first:.1f} s, exit at {total:.1f} s, {lines} lines", flush=True)
    predicts = []
    for _ in range(args.repeat):
        seconds, predict_lines = timed_predict(args.workdir / "run-0", files[:3], env)
        predicts.append(seconds)
        print(f"predict 3 images: {seconds:.1f} s, {predict_lines} lines", flush=True)
    print(f"median over {args.repeat}: run → first batch {statistics.median(firsts):.1f} s "
          f"(whole run {statistics.median(totals):.1f} s, {lines} lines); "
          f"predict on 3 images {statistics.median(predicts):.1f} s ({predict_lines} lines)")


if __name__ == "__main__":
    main()
