"""kill -9 at each stage boundary and in the middle of each stage, then the same command again: it must finish
with a store identical to a clean run's, without --overwrite. Each killed run is a real subprocess that SIGKILLs
itself at the chosen point (a function patched in that process only), so the kill lands exactly there."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.support import FAST
from transfer_flow.flows.pipeline import transfer_learning
from transfer_flow.flows.settings import PipelineSettings
from transfer_flow.storage.feature_store import open_store, read_contents, read_features

pytestmark = pytest.mark.slow

FAST_ARGS = ["--backbone", FAST["backbone"], "--weights", FAST["weights"], "--image-size", str(FAST["image_size"]),
             "--batch-size", str(FAST["batch_size"])]

# Where to die: (object path, attribute, which call dies). Stage boundaries die on entering a stage's work,
# middles inside it (after the work started, before it was committed).
KILL_POINTS = {
    "extract: middle (decoded, shard not committed)": ("transfer_flow.storage.row_cache:RowCache", "commit_shard", 1),
    "extract → store write (shards committed)": ("transfer_flow.tasks.stages", "assemble_store", 1),
    "store write: middle (rows half appended)": ("transfer_flow.storage.feature_store:FeatureWriter", "append", 1),
    "store write → train": ("transfer_flow.tasks.stages", "train_head", 1),
    "train: middle (grid search running)": ("sklearn.model_selection:GridSearchCV", "fit", 1),
    "bundle write: middle (head written, not renamed)": ("transfer_flow.storage.model_bundle", "_versions", 1),
    "train → report": ("transfer_flow.tasks.stages", "write_report", 1),
    "report: middle (first plot drawn)": ("matplotlib.figure:Figure", "savefig", 1),
}
ZARR_POINTS = ["extract: middle (decoded, shard not committed)", "store write: middle (rows half appended)",
               "train: middle (grid search running)"]

KILLER = """
import importlib, os, signal, sys
module_name, _, class_name = sys.argv[1].partition(":")
owner = importlib.import_module(module_name)
owner = getattr(owner, class_name) if class_name else owner
attribute, nth = sys.argv[2], int(sys.argv[3])
real = getattr(owner, attribute)
calls = []
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(owner, attribute, dying)
from transfer_flow.flows.cli import main
sys.exit(main(sys.argv[4:]))
"""


def cli_process(argv: list[str], env: dict[str, str], kill_at: tuple[str, str, int] | None = None):
    if kill_at is None:
        return subprocess.run([sys.executable, "-m", "transfer_flow.flows.cli", *argv], env=env, capture_output=True,
                              text=True)
    owner, attribute, nth = kill_at
    return subprocess.run([sys.executable, "-c", KILLER, owner, attribute, str(nth), *argv], env=env,
                          capture_output=True, text=True)


def store_of(output: Path, store: str) -> dict:
    opened = open_store(output / ("features.h5" if store == "hdf5" else "features.zarr"))
    contents = read_contents(opened)
    return {"features": read_features(opened, np.arange(opened.n_rows)), "labels": contents.labels,
            "paths": contents.paths, "split": contents.split, "hashes": contents.hashes,
            "attrs": {k: v for k, v in contents.attrs.items() if k not in ("created", "written")}}


@pytest.fixture(scope="module")
def clean_runs(prefect_api, colour_dataset, tmp_path_factory):
    stores = {}
    for store in ("hdf5", "zarr"):
        output = tmp_path_factory.mktemp(f"clean-{store}") / "out"
        transfer_learning(PipelineSettings(dataset=str(colour_dataset), output=str(output), store=store, **FAST))
        stores[store] = store_of(output, store)
    return stores


@pytest.fixture(scope="module")
def api_env(prefect_api):
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}


# Every point on HDF5 and three on zarr is ~11 killed-and-rerun pairs of CLI processes (minutes on 2 cores);
# `make test` runs three (the middle of extraction, store write and training, both stores among them; about
# 1.5 min each on 2 cores) and `make test-faults` the whole matrix.
ALL_CASES = [("hdf5", p) for p in KILL_POINTS] + [("zarr", p) for p in ZARR_POINTS]
ONE_PER_STAGE = [("zarr", "extract: middle (decoded, shard not committed)"),
                 ("hdf5", "store write: middle (rows half appended)"),
                 ("hdf5", "train: middle (grid search running)")]
CASES = ALL_CASES if os.environ.get("TRANSFER_FLOW_ALL_FAULTS") == "1" else ONE_PER_STAGE


@pytest.mark.parametrize("store,point", CASES)
def test_killed_run_resumes_with_the_same_command(clean_runs, api_env, colour_dataset, tmp_path, store, point):
    argv = ["run", str(colour_dataset), "--output", str(tmp_path / "out"), "--store", store, *FAST_ARGS]
    killed = cli_process(argv, api_env, kill_at=KILL_POINTS[point])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    rerun = cli_process(argv, api_env)  # the same command: no --overwrite
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    got, clean = store_of(tmp_path / "out", store), clean_runs[store]
    assert got.keys() == clean.keys()
    # Random-init weights (FAST) differ from process to process, so feature values are compared by shape only;
    # rows, their order, labels, split, hashes and attributes must be exactly the clean run's.
    assert got.pop("features").shape == clean["features"].shape
    for key in clean:
        if key == "features":
            continue
        if isinstance(clean[key], np.ndarray):
            np.testing.assert_array_equal(got[key], clean[key], err_msg=key)
        else:
            assert got[key] == clean[key], key
    summary = json.loads((tmp_path / "out" / "run.json").read_text())
    if point.startswith(("store write → train", "train", "bundle", "report")):
        assert summary["images_extracted"] == 0  # the killed run's store was kept, not redone
    assert not list((tmp_path / "out").glob(".*.tmp")) and not list((tmp_path / "out").glob("*.parts"))


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_run_leaves_no_prefect_server_behind(colour_dataset, tmp_path):
    """No PREFECT_API_URL: the run starts Prefect's temporary server; SIGKILL the run while it trains."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"  # a loaded machine starts it slowly
    marker = tmp_path / "training"
    script = KILLER.replace("os.kill(os.getpid(), signal.SIGKILL)", f"open({str(marker)!r}, 'w').close(); "
                            "import time; time.sleep(600)")  # hold still while training, to be killed from outside
    process = subprocess.Popen([sys.executable, "-c", script, "sklearn.model_selection:GridSearchCV", "fit", "1",
                                "run", str(colour_dataset), "--output", str(tmp_path / "out"), *FAST_ARGS],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(1200):  # until it trains (at most 10 minutes; no timing is asserted)
            if marker.exists() or process.poll() is not None:
                break
            time.sleep(0.5)
        assert marker.exists(), "the run never reached training"
        servers = [pid for pid in _children(process.pid)
                   if b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert servers, "no temporary server was started"
        process.kill()
        process.wait()
        for _ in range(100):
            if not any(_alive(pid) for pid in servers):
                break
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in servers), "the temporary server outlived the killed run"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
