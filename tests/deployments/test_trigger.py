"""A real event through a real Prefect API: the server's trigger service creates the on-dataset run.

The temporary API of `prefect_test_harness` runs the event trigger and action services (they are
among the services Prefect keeps on in ephemeral servers), so this is the server's own evaluation,
not a simulation. tests/deployments/test_commands.py repeats the main case on a `transfer-flow server`.
"""
import asyncio
import time

import pytest

from tests.support import FAST
from transfer_flow.deployments.definitions import ServeOptions, on_dataset_deployment
from transfer_flow.flows.settings import PipelineSettings
from transfer_flow.tasks.inbox import MARKER, InboxWatcher, dataset_arrived, send

TRIGGER_WAIT_SECONDS = 60  # an upper bound for a busy machine; it takes about a second


async def _runs(deployment_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    async with get_client() as client:
        return await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )


def runs_for_dataset(deployment_id, dataset: str, *, at_least: int = 1):
    """The deployment's runs for `dataset`, once there are `at_least` of them (bounded wait)."""
    deadline = time.monotonic() + TRIGGER_WAIT_SECONDS
    while True:
        found = [r for r in asyncio.run(_runs(deployment_id)) if r.parameters["settings"]["dataset"] == dataset]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


@pytest.fixture(scope="module")
def on_dataset(prefect_api, tmp_path_factory):
    options = ServeOptions(home=str(tmp_path_factory.mktemp("home")), pipeline=FAST)
    return on_dataset_deployment(options).apply(), options


def make_dataset(inbox, name):
    for label in ("cats", "dogs"):
        (inbox / name / label).mkdir(parents=True)
        (inbox / name / label / "1.png").write_bytes(label.encode())
    (inbox / name / MARKER).touch()
    return inbox / name


def test_the_arrival_event_creates_an_on_dataset_run_with_the_payload_path(on_dataset, colour_dataset):
    deployment_id, options = on_dataset
    send(dataset_arrived(str(colour_dataset), "colours", "v1", files=24))
    [run] = runs_for_dataset(deployment_id, str(colour_dataset))
    settings = PipelineSettings.model_validate(run.parameters["settings"])  # what the run will be given
    assert settings.output == f"{options.runs_dir}/colours"
    assert (settings.backbone, settings.weights, settings.image_size) == ("mobilenet_v2", "none", 32)
    assert run.parameters["registry"]["registry"] == options.registry_dir
    assert run.state_type.value == "SCHEDULED"  # `transfer-flow serve` would pick it up now


def test_the_watcher_announces_through_the_events_api_once_across_a_restart(on_dataset, tmp_path):
    deployment_id, _ = on_dataset
    folder = make_dataset(tmp_path, "pets")
    announced = []
    for _ in range(2):  # a watcher, then the same watcher restarted
        watcher = InboxWatcher(tmp_path)  # the real sender
        announced += watcher.scan() + watcher.scan() + watcher.scan()
    assert len(announced) == 1
    [run] = runs_for_dataset(deployment_id, str(folder))
    assert run.parameters["settings"]["output"].endswith("/runs/pets")


def test_the_polling_flow_announces_a_dataset_that_triggers_a_run(on_dataset, tmp_path):
    from transfer_flow.flows.inbox import scan_inbox

    deployment_id, _ = on_dataset
    folder = make_dataset(tmp_path, "birds")
    assert scan_inbox(inbox=str(tmp_path)) == []  # first sight: not yet known to be complete
    [announcement] = scan_inbox(inbox=str(tmp_path))
    assert announcement.path == str(folder) and announcement.sent
    assert scan_inbox(inbox=str(tmp_path)) == []
    [run] = runs_for_dataset(deployment_id, str(folder))
    assert run.parameters["settings"]["output"].endswith("/runs/birds")
