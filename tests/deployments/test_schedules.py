"""Schedules that fire: a real `transfer-flow server`, a real `transfer-flow serve`, runs created by the server's
scheduler and executed to completion, and a server log without errors.

`prefect_test_harness` cannot show this: its temporary server runs only the services Prefect marks for
ephemeral servers (triggers, telemetry), not the scheduler. Registering a cron is not the same as the cron
firing: under SQLAlchemy 2.1 the deployments registered and the scheduler failed every minute, silently.

One server and one `serve` for the module (a Prefect server and three served flows cost ~30 s of start-up on
two cores); the cron is `* * * * *`, so the first scheduled run starts at the next minute. The inbox's dataset lands
as `serve` starts, so its poll and its run go on while the cron waits for that minute.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
import warnings
from pathlib import Path

import pytest

from tests.deployments.test_commands import COMMANDS, REPO, SERVER_START_SECONDS, client_env, free_port
from tests.support import FAST, stop_with_ctrl_c, write_colour_images
from transfer_flow.tasks.inbox import MARKER

pytestmark = pytest.mark.slow

# Bounds on waits, not expectations: the cron fires within 60 s and a FAST run takes ~20 s on two idle cores
# (minutes on two cores shared with other test suites).
RUN_WAIT_SECONDS = 600
FAST_OPTIONS = ["--backbone", FAST["backbone"], "--weights", FAST["weights"], "--image-size", str(FAST["image_size"]),
                "--batch-size", str(FAST["batch_size"])]
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \| ")
ERROR_LINE = re.compile(r"\|\s*(ERROR|CRITICAL)\s*\|")
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
INBOX_CLASSES = {"ochre": (200, 150, 40), "teal": (20, 140, 140)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`transfer-flow server` on a free port; its whole output in a file the tests read."""
    root = tmp_path_factory.mktemp("scheduled")
    port = free_port()
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([*COMMANDS, "server", "--home", str(root / "home"), "--port", str(port)], cwd=REPO,
                                   env=client_env(root, None), stdout=log, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while "export PREFECT_API_URL=" not in log_path.read_text() and process.poll() is None:
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        assert process.poll() is None, log_path.read_text()[-3000:]
        yield f"http://127.0.0.1:{port}/api", log_path, root
    finally:
        stop_with_ctrl_c(process)


@pytest.fixture(scope="module")
def served(server, colour_dataset):
    """`transfer-flow serve` with a cron due every minute, a head and a store that are not the defaults, and an
    inbox polled every 15 s, where a dataset arrives once `serve` is running; its output in a file."""
    api, _, root = server
    inbox = root / "inbox"
    inbox.mkdir()
    log_path = root / "serve.log"
    command = [*COMMANDS, "serve", "--home", str(root / "home"), "--dataset", str(colour_dataset),
               "--cron", "* * * * *", "--timezone", "UTC", "--head", "linear-svm", "--store", "zarr",
               "--inbox", str(inbox), "--poll-every", "15", "--limit", "2", *FAST_OPTIONS]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=client_env(root, api), stdout=log,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for k, (name, colour) in enumerate(INBOX_CLASSES.items()):
            write_colour_images(inbox / "paints" / name, colour, 6, seed=20 + k)
        (inbox / "paints" / MARKER).touch()
        yield api, inbox, root / "home", log_path, process
    finally:
        stop_with_ctrl_c(process)


def _runs_of(api: str, deployment: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}):
        with get_client(sync_client=True) as client:
            try:
                deployment_id = client.read_deployment_by_name(deployment).id
            except ObjectNotFound:  # `serve` has not registered it yet
                return []
            ids = DeploymentFilterId(any_=[deployment_id])
            return client.read_flow_runs(deployment_filter=DeploymentFilter(id=ids))


def pause(api: str, deployment: str) -> None:
    """Pause the deployment's schedule and drop the runs it already queued (late ones included)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}):
        with get_client(sync_client=True) as client:
            deployment_id = client.read_deployment_by_name(deployment).id
            client.pause_deployment(deployment_id)
            queued = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
            for run in queued:
                client.delete_flow_run(run.id)


def wait_for_final_run(served, deployment: str, accept=lambda run: True):
    """The first run of `deployment` that `accept`s and reached a final state; fails with the logs otherwise."""
    api, _, _, serve_log, process = served
    deadline = time.monotonic() + RUN_WAIT_SECONDS
    while time.monotonic() < deadline:
        assert process.poll() is None, f"serve exited {process.returncode}:\n{serve_log.read_text()[-4000:]}"
        final = [r for r in _runs_of(api, deployment) if accept(r) and r.state_type.value in FINAL]
        if final:
            return final[0]
        time.sleep(2)
    raise AssertionError(f"no finished run of {deployment} in {RUN_WAIT_SECONDS} s:\n{serve_log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def first_scheduled_retrain(served):
    """The first retrain the cron started, once finished; then the schedule is paused. A retrain every minute, each
    longer than a minute on loaded cores, would keep both --limit slots busy for the rest of the module."""
    run = wait_for_final_run(served, "train-and-promote/retrain")
    pause(served[0], "train-and-promote/retrain")
    return run


def test_the_cron_fires_and_the_scheduled_retrain_completes(served, first_scheduled_retrain):
    assert first_scheduled_retrain.auto_scheduled  # created by the server's scheduler, not by us
    assert first_scheduled_retrain.state_type.value == "COMPLETED", served[3].read_text()[-4000:]
    summary = json.loads((served[2] / "runs" / "retrain" / "run.json").read_text())
    assert summary["accuracy"] > 0


def test_the_scheduled_retrain_uses_the_head_and_store_serve_was_given(served, first_scheduled_retrain):
    from transfer_flow.storage.model_bundle import read_bundle_metadata

    summary = json.loads((served[2] / "runs" / "retrain" / "run.json").read_text())
    assert read_bundle_metadata(Path(summary["model"])).head == "linear-svm"
    assert summary["store"].endswith("features.zarr") and Path(summary["store"]).is_dir()


def test_a_dataset_arriving_in_the_polled_inbox_is_trained_on(served):
    _, inbox, home, _, _ = served
    poll = wait_for_final_run(served, "scan-inbox/poll-inbox")
    assert poll.state_type.value == "COMPLETED"
    run = wait_for_final_run(served, "train-and-promote/on-dataset",
                             accept=lambda r: r.parameters["settings"]["dataset"] == str(inbox / "paints"))
    assert run.state_type.value == "COMPLETED", served[3].read_text()[-4000:]
    assert json.loads((home / "runs" / "paints" / "run.json").read_text())["classes"] == sorted(INBOX_CLASSES)


def logged_errors(text: str) -> tuple[list[str], list[str]]:
    """ERROR/CRITICAL lines and tracebacks, each with the lines that follow it up to the next log line; split
    into SQLite write contention (`database is locked`) and everything else."""
    blocks, current = [], None
    for line in text.splitlines():
        if LOG_LINE.match(line):
            current = [line] if ERROR_LINE.search(line) else None
            if current is not None:
                blocks.append(current)
        elif current is not None or "Traceback (most recent call last)" in line:
            if current is None:
                current = []
                blocks.append(current)
            current.append(line)
    texts = ["\n".join(block) for block in blocks]
    return [t for t in texts if "database is locked" not in t], [t for t in texts if "database is locked" in t]


def test_neither_the_server_nor_serve_logged_an_error(server, served):
    # Last in the module: by now the scheduler, the triggers and every served run have had their turn.
    # SQLite lets one writer in at a time and Prefect's deferred transactions can fail to upgrade to a write
    # while another connection writes (`database is locked`, raised at once, whatever the busy timeout); on two
    # loaded cores a served run's state updates meet the scheduler's. The runs above completed regardless, so
    # that contention is reported (a warning), not failed on; Prefect's answer to it is PostgreSQL.
    for log in (server[1], served[3]):
        errors, contention = logged_errors(log.read_text())
        assert not errors, f"{log.name}:\n" + "\n\n".join(errors[:5])
        if contention:
            warnings.warn(f"{log.name}: {len(contention)} SQLite write contentions (database is locked)")
