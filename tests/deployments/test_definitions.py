"""Deployments as a real Prefect API stores them: schedules, the event trigger, the typed form, prefect.yaml."""
import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import FAST
from transfer_flow.deployments.definitions import NIGHTLY, ServeOptions, build_deployments
from transfer_flow.tasks.inbox import DATASET_ARRIVED

REPO = Path(__file__).resolve().parents[2]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"


async def _read(names):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        found = {}
        for name in names:
            deployment = await client.read_deployment_by_name(name)
            automations = await client.read_resource_related_automations(f"prefect.deployment.{deployment.id}")
            found[name] = (deployment, automations)
        return found


def read_deployments(*names):
    return asyncio.run(_read(names))


@pytest.fixture(scope="module")
def registered(prefect_api, colour_dataset, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    inbox = tmp_path_factory.mktemp("inbox")
    options = ServeOptions(home=str(home), dataset=str(colour_dataset), inbox=str(inbox), timezone="Europe/Paris",
                           pipeline=FAST, metric="accuracy", margin=0.01)
    deployments = build_deployments(options)
    for deployment in deployments:
        deployment.apply()
    return options, deployments, read_deployments(*(d.full_name for d in deployments))


def test_serve_registers_the_four_deployments(registered):
    _, deployments, _ = registered
    assert [d.full_name for d in deployments] == ["train-and-promote/retrain", "train-and-promote/on-dataset",
                                                 "transfer-learning/on-demand", "scan-inbox/poll-inbox"]


def test_retrain_runs_nightly_on_the_dataset_with_the_typed_settings(registered, colour_dataset):
    options, _, found = registered
    deployment, automations = found["train-and-promote/retrain"]
    [schedule] = deployment.schedules
    assert schedule.schedule.cron == NIGHTLY == "0 2 * * *" and schedule.schedule.timezone == "Europe/Paris"
    assert schedule.active and automations == []
    settings = deployment.parameters["settings"]
    assert settings["dataset"] == str(colour_dataset) and settings["output"] == f"{options.home}/runs/retrain"
    assert {k: settings[k] for k in FAST} == FAST
    assert deployment.parameters["registry"] == {"registry": f"{options.home}/registry", "metric": "accuracy",
                                                 "margin": 0.01}
    assert deployment.entrypoint == "transfer_flow.flows.retrain.train_and_promote"


def test_on_dataset_is_triggered_by_the_arrival_event_with_parameters_from_its_payload(registered):
    options, _, found = registered
    deployment, [automation] = found["train-and-promote/on-dataset"]
    assert deployment.schedules == []
    trigger = automation.trigger
    assert trigger.expect == {DATASET_ARRIVED} and trigger.posture == "Reactive" and trigger.threshold == 1
    assert trigger.match.root == {"prefect.resource.id": "transfer-flow.dataset.*"}
    [action] = automation.actions
    assert action.type == "run-deployment" and action.deployment_id == deployment.id
    settings = action.parameters["settings"]
    assert settings["dataset"] == "{{ event.payload.path }}"
    assert settings["output"] == f"{options.home}/runs/{{{{ event.payload.name }}}}"
    assert {k: settings[k] for k in FAST} == FAST


def test_on_demand_offers_a_typed_form(registered):
    from transfer_flow.tasks.backbones import BACKBONES

    _, _, found = registered
    deployment, _ = found["transfer-learning/on-demand"]
    assert deployment.schedules == [] and deployment.enforce_parameter_schema
    form = deployment.parameter_openapi_schema["definitions"]["PipelineSettings"]["properties"]
    assert set(form["backbone"]["enum"]) == set(BACKBONES)
    assert deployment.parameters["settings"]["backbone"] == "mobilenet_v2"  # serve's defaults prefill the form
    assert form["pooling"]["enum"] == ["flatten", "avg", "max"]
    assert all(field.get("description") for field in form.values())


def test_poll_inbox_scans_on_an_interval(registered):
    options, _, found = registered
    deployment, _ = found["scan-inbox/poll-inbox"]
    [schedule] = deployment.schedules
    assert schedule.schedule.interval.total_seconds() == options.poll_seconds
    assert deployment.parameters["inbox"] == options.inbox


def test_without_a_dataset_the_retrain_schedule_is_registered_paused(prefect_api, tmp_path):
    from transfer_flow.deployments.definitions import retrain_deployment

    retrain_deployment(ServeOptions(home=str(tmp_path), cron="30 3 * * 1-5", timezone="UTC")).apply()
    deployment, _ = read_deployments("train-and-promote/retrain")["train-and-promote/retrain"]
    [schedule] = deployment.schedules
    assert schedule.schedule.cron == "30 3 * * 1-5" and not schedule.active
    assert "dataset" not in deployment.parameters["settings"]


def test_every_entrypoint_imports(registered):
    from prefect.flows import load_flow_from_entrypoint

    _, deployments, _ = registered
    entrypoints = {d.entrypoint for d in deployments}
    entrypoints |= {d["entrypoint"] for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
    for entrypoint in sorted(entrypoints):
        assert load_flow_from_entrypoint(entrypoint).name


def test_prefect_yaml_declares_what_serve_registers():
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert set(by_name) == {"retrain", "on-dataset", "on-demand", "poll-inbox"}
    assert by_name["retrain"]["schedules"][0]["cron"] == NIGHTLY
    [trigger] = by_name["on-dataset"]["triggers"]
    assert (
        trigger["expect"] == [DATASET_ARRIVED]
        and trigger["parameters"]["settings"]["dataset"] == "{{ event.payload.path }}"
    )
    # The yaml's pipeline defaults are PipelineSettings' defaults.
    assert spec["definitions"]["pipeline"] == ServeOptions().pipeline_defaults()


def test_prefect_deploy_accepts_prefect_yaml(prefect_api, tmp_path):
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "TRANSFER_FLOW_HOME": str(tmp_path),
           "TRANSFER_FLOW_DATASET": str(tmp_path / "data"), "TRANSFER_FLOW_INBOX": str(tmp_path / "inbox")}
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    subprocess.run([*prefect, "work-pool", "create", "transfer-flow", "--type", "process", "--overwrite"], env=env,
                   cwd=REPO, check=True, capture_output=True, timeout=120)
    done = subprocess.run([*prefect, "deploy", "--name", "on-dataset", "--prefect-file", str(PREFECT_YAML)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    deployment, [automation] = read_deployments("train-and-promote/on-dataset")["train-and-promote/on-dataset"]
    assert deployment.work_pool_name == "transfer-flow"
    settings = automation.actions[0].parameters["settings"]
    assert settings["dataset"] == "{{ event.payload.path }}"  # event templates survive `prefect deploy`
    assert settings["output"] == f"{tmp_path}/runs/{{{{ event.payload.name }}}}"  # environment variables are filled in
