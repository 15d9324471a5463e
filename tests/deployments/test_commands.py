"""`transfer-flow server | serve | watch` as a user meets them, including a real `prefect server start`."""
import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import stop_with_ctrl_c
from transfer_flow.deployments.commands import add_deployment_commands
from transfer_flow.flows.prefect_api import is_loopback, running_local_server
from transfer_flow.storage.errors import SettingsError

REPO = Path(__file__).resolve().parents[2]
COMMANDS = [sys.executable, "-m", "transfer_flow.deployments.commands"]
SERVER_START_SECONDS = 120  # bound on the wait; it takes ~15 s on 2 CPUs


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="transfer-flow")
    add_deployment_commands(top.add_subparsers(dest="command", required=True))
    return top


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def client_env(tmp_path: Path, api_url: str | None) -> dict[str, str]:
    """A user's shell: their own PREFECT_HOME (no profile from this machine), PREFECT_API_URL as exported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "client-prefect-home")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@pytest.mark.parametrize("command", ["server", "serve", "watch"])
def test_every_command_explains_itself_and_has_a_handler(command, capsys):
    with pytest.raises(SystemExit) as done:
        parser().parse_args([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: transfer-flow {command}")
    args = parser().parse_args([command] + (["inbox"] if command == "watch" else []))
    assert callable(args.handler)


def test_server_refuses_a_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = parser().parse_args(["server", "--home", str(tmp_path), "--port", str(busy.getsockname()[1])])
        with pytest.raises(SettingsError, match="already running"):
            args.handler(args)


def test_no_running_server_is_found_on_a_free_port():
    assert running_local_server("127.0.0.1", free_port()) is None


def test_only_loopback_addresses_count_as_local():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10")


@pytest.mark.parametrize("command", [["serve", "--register-only"], ["watch", "INBOX", "--once"]])
def test_without_a_server_the_commands_say_how_to_start_one(command, tmp_path):
    command = [str(tmp_path) if part == "INBOX" else part for part in command]
    done = subprocess.run([*COMMANDS, *command], cwd=REPO, env=client_env(tmp_path, None), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "PREFECT_API_URL is not set" in done.stderr and "transfer-flow server" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_rejects_bad_settings_before_contacting_the_server(tmp_path):
    for bad, message in [(["--cron", "every night"], "--cron"), (["--timezone", "Mars/Olympus"], "--timezone"),
                         (["--dataset", str(tmp_path / "nope")], "does not exist"), (["--margin", "2"], "--margin")]:
        args = parser().parse_args(["serve", "--register-only", *bad])
        with pytest.raises(SettingsError, match=message):
            args.handler(args)


def test_serve_register_only_registers_under_the_current_api(prefect_api, colour_dataset, tmp_path, capsys):
    args = parser().parse_args(["serve", "--register-only", "--home", str(tmp_path), "--dataset", str(colour_dataset),
                                "--cron", "15 4 * * *", "--timezone", "UTC", "--backbone", "mobilenet_v2"])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "train-and-promote/retrain" in out and "cron '15 4 * * *' (UTC)" in out
    assert "on event transfer-flow.dataset.arrived" in out


# A value other than the default for every pipeline option `serve` offers; adding a field to PipelineSettings
# without one here fails the test below, so a new option cannot be dropped on its way to the deployments.
SERVE_PIPELINE_VALUES = {
    "backbone": "mobilenet_v2", "weights": "none", "image_size": 48, "pooling": "max", "runtime": "tensorflow",
    "precision": "float32", "batch_size": 7, "feature_dtype": "float16", "head": "linear-svm", "store": "zarr",
    "test_size": 0.3, "seed": 7,
    "refresh": ["train"], "workers": 2, "dask_address": "tcp://127.0.0.1:8786", "shard_images": 64, "augment": 2,
    "epochs": 3, "learning_rate": 0.0005, "unfreeze": 10, "flip": True,
}


def test_serve_passes_every_pipeline_option_to_every_deployment(prefect_api, colour_dataset, tmp_path):
    from prefect.client.orchestration import get_client

    from transfer_flow.deployments.definitions import SERVE_EXCLUDED
    from transfer_flow.flows.options import flag
    from transfer_flow.flows.settings import PipelineSettings

    assert set(SERVE_PIPELINE_VALUES) == set(PipelineSettings.model_fields) - SERVE_EXCLUDED
    argv = ["serve", "--register-only", "--home", str(tmp_path), "--dataset", str(colour_dataset)]
    for name, value in SERVE_PIPELINE_VALUES.items():
        if value is True:  # a switch: the flag alone
            argv.append(flag(name))
            continue
        for item in value if isinstance(value, list) else [value]:
            argv += [flag(name), str(item)]
    args = parser().parse_args(argv)
    assert args.handler(args) == 0

    async def registered_settings():
        async with get_client() as client:
            retrain = await client.read_deployment_by_name("train-and-promote/retrain")
            on_dataset = await client.read_deployment_by_name("train-and-promote/on-dataset")
            on_demand = await client.read_deployment_by_name("transfer-learning/on-demand")
            [automation] = await client.read_resource_related_automations(f"prefect.deployment.{on_dataset.id}")
            return {"retrain": retrain.parameters["settings"], "on-dataset": on_dataset.parameters["settings"],
                    "on-demand": on_demand.parameters["settings"],
                    "on-dataset trigger": automation.actions[0].parameters["settings"]}

    for deployment, settings in asyncio.run(registered_settings()).items():
        assert {k: settings.get(k) for k in SERVE_PIPELINE_VALUES} == SERVE_PIPELINE_VALUES, deployment


@pytest.mark.parametrize("option", [["--wait"], ["--overwrite"], ["--output", "x"]])
def test_serve_refuses_options_that_cannot_apply_to_a_deployment(option, capsys):
    with pytest.raises(SystemExit) as refused:
        parser().parse_args(["serve", *option])
    assert refused.value.code == 2 and f"unrecognized arguments: {' '.join(option)}" in capsys.readouterr().err


@pytest.fixture
def real_server(tmp_path):
    """`transfer-flow server` on a free loopback port, stopped with Ctrl-C (SIGINT) afterwards."""
    port = free_port()
    process = subprocess.Popen([*COMMANDS, "server", "--home", str(tmp_path / "home"), "--port", str(port)], cwd=REPO,
                               env=client_env(tmp_path, None), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    lines = []
    deadline = time.monotonic() + SERVER_START_SECONDS
    try:
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                break
            lines.append(line)
            if "export PREFECT_API_URL=" in line:
                break
        printed = "".join(lines)
        assert "export PREFECT_API_URL=" in printed, printed[-3000:]
        yield port, printed, tmp_path
    finally:
        stop_with_ctrl_c(process)
        process.stdout.close()
    assert process.returncode == 0
    with socket.socket() as probe:  # the `prefect server start` child went with it
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


def test_server_serve_inspect_and_a_triggered_run_on_a_real_server(real_server, colour_dataset):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from transfer_flow.tasks.inbox import dataset_arrived, send

    port, printed, tmp_path = real_server
    api = f"http://127.0.0.1:{port}/api"
    assert f"UI:  http://127.0.0.1:{port}" in printed and f"export PREFECT_API_URL={api}" in printed
    assert (tmp_path / "home" / "prefect" / "prefect.db").is_file()
    assert running_local_server("127.0.0.1", port) == api
    _cli_uses_a_running_server(api, port)
    env = client_env(tmp_path, api)
    serve = subprocess.run(
        [
            *COMMANDS,
            "serve",
            "--register-only",
            "--home",
            str(tmp_path / "home"),
            "--dataset",
            str(colour_dataset),
            "--backbone",
            "mobilenet_v2",
            "--weights",
            "none",
            "--image-size",
            "32",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert serve.returncode == 0, serve.stderr[-2000:]
    inspect = subprocess.run([sys.executable, "-m", "prefect", "deployment", "inspect", "train-and-promote/retrain"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 0 and "0 2 * * *" in inspect.stdout, inspect.stdout[-2000:] + inspect.stderr[-2000:]

    with temporary_settings(updates={PREFECT_API_URL: api}):
        send(dataset_arrived(str(colour_dataset), "colours", "v1"))
        deadline = time.monotonic() + 60
        runs = []
        while not runs and time.monotonic() < deadline:
            # The triggered run, not the retrain schedule's upcoming runs (same dataset, output RUNS/retrain);
            # both wait in Scheduled, as nothing executes them here (--register-only).
            runs = [
                r
                for r in asyncio.run(_flow_runs())
                if r.parameters.get("settings", {}).get("dataset") == str(colour_dataset)
                and not r.parameters["settings"].get("output", "").endswith("/runs/retrain")
            ]
            time.sleep(0.5)
    assert len(runs) == 1 and runs[0].parameters["settings"]["output"] == f"{tmp_path / 'home'}/runs/colours"


def _cli_uses_a_running_server(api: str, port: int) -> None:
    """With no PREFECT_API_URL, the flow commands point Prefect at the server that answers (here on `port`)."""
    import functools

    from prefect.settings import PREFECT_API_URL, temporary_settings

    import transfer_flow.flows.prefect_api as server
    from transfer_flow.flows.cli import _prefect_api

    found = functools.partial(server.running_local_server, "127.0.0.1", port)
    original, server.running_local_server = server.running_local_server, found
    try:
        with temporary_settings(restore_defaults={PREFECT_API_URL}):
            for command in ("run", "serve", "watch"):  # serve and watch find it as run does
                with _prefect_api(command):
                    assert PREFECT_API_URL.value() == api
            with _prefect_api("backbones"):  # no flow: no server needed
                assert not PREFECT_API_URL.value()
    finally:
        server.running_local_server = original


async def _flow_runs():
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_flow_runs()


def test_the_transfer_flow_command_dispatches_to_these_handlers(capsys):
    from transfer_flow.flows.cli import EXIT_USER_ERROR, main

    assert main(["serve", "--register-only", "--cron", "at two"]) == EXIT_USER_ERROR
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("transfer-flow: error: --cron")
