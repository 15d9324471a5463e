"""Extraction as Prefect tasks on a real local Dask cluster gives the same rows as the in-process path."""
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.support import FAST as FAST_ALL
from transfer_flow.flows.pipeline import transfer_learning
from transfer_flow.flows.settings import PipelineSettings
from transfer_flow.storage.feature_store import open_store, read_contents, read_features

FAST = {**FAST_ALL, "batch_size": 4}  # several batches per shard


def rows_by_path(store_path):
    store = open_store(store_path)
    contents = read_contents(store)
    features = read_features(store, np.arange(store.n_rows))
    return {p: (h, label, f) for p, h, label, f in zip(contents.paths, contents.hashes, contents.labels, features)}


def test_two_dask_workers_make_the_rows_one_process_makes(prefect_api, messy_dataset, tmp_path):
    local = transfer_learning(PipelineSettings(dataset=str(messy_dataset), output=str(tmp_path / "local"), **FAST))
    spread = transfer_learning(PipelineSettings(dataset=str(messy_dataset), output=str(tmp_path / "dask"), workers=2,
                                                shard_images=5, **FAST))
    assert spread.images_extracted == local.images_extracted == 28
    assert [s.path for s in spread.images_skipped] == [s.path for s in local.images_skipped]
    a, b = rows_by_path(tmp_path / "local" / "features.h5"), rows_by_path(tmp_path / "dask" / "features.h5")
    assert a.keys() == b.keys()
    for path, (digest, label, features) in a.items():
        assert b[path][:2] == (digest, label)
        np.testing.assert_allclose(b[path][2], features, rtol=1e-4, atol=1e-5)
    assert not list((tmp_path / "dask").glob("*.parts"))  # shards are gone once the store is complete


def _shard_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [r for r in runs if r.name.startswith("extract shard")]


@pytest.mark.slow
def test_shard_task_runs_are_in_the_flow_runs_graph(prefect_api, colour_dataset, tmp_path):
    state = transfer_learning(PipelineSettings(dataset=str(colour_dataset), output=str(tmp_path / "out"), workers=1,
                                               shard_images=10, **FAST), return_state=True)
    assert state.is_completed()
    shards = _shard_runs(state.state_details.flow_run_id)
    assert len(shards) == 3 and all(r.state_type.value == "COMPLETED" for r in shards)  # 24 images, 10 a shard


@pytest.mark.slow
def test_a_worker_reports_to_the_flows_temporary_server_instead_of_starting_its_own(colour_dataset, tmp_path):
    # No PREFECT_API_URL and no server at the default address: the command starts one temporary server; a
    # Dask worker left to itself would start another (seconds per worker, and its task runs out of the graph).
    # --verbose: Prefect's own notices, the temporary server's start among them, are printed.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    fast = ["--backbone", FAST["backbone"], "--weights", FAST["weights"], "--image-size", str(FAST["image_size"])]
    command = [sys.executable, "-m", "transfer_flow.flows.cli", "run", str(colour_dataset), "--output",
               str(tmp_path / "out"), "--workers", "1", "--verbose", *fast]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (done.stdout + done.stderr).count("Starting temporary server") == 1, done.stderr[-3000:]
