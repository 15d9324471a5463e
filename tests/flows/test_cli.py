"""The transfer-flow command as a user meets it: help, bad arguments, bad datasets, a real run."""
import json
import os
import subprocess
import sys

import pytest

from transfer_flow.flows.cli import EXIT_USER_ERROR, main

CLI = [sys.executable, "-m", "transfer_flow.flows.cli"]


@pytest.mark.parametrize("command", [[], ["run"], ["demo"], ["backbones"]])
def test_every_command_explains_itself(command):
    done = subprocess.run([*CLI, *command, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "usage: transfer-flow" in done.stdout


def test_missing_dataset_is_one_line_without_traceback(tmp_path):
    done = subprocess.run([*CLI, "run", str(tmp_path / "nope"), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_USER_ERROR
    lines = [line for line in done.stderr.splitlines() if line.startswith("transfer-flow: error:")]
    assert len(lines) == 1 and "does not exist" in lines[0]
    assert "Traceback" not in done.stderr


def test_out_of_range_setting_names_the_option(tmp_path, capsys):
    assert main(["run", str(tmp_path), "--output", str(tmp_path / "out"), "--test-size", "1.5"]) == EXIT_USER_ERROR
    assert "--test-size" in capsys.readouterr().err


def test_unknown_backbone_is_an_argument_error(tmp_path):
    with pytest.raises(SystemExit) as caught:
        main(["run", str(tmp_path), "--output", str(tmp_path / "out"), "--backbone", "alexnet"])
    assert caught.value.code == 2


def test_debug_lets_the_error_itself_through(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="does not exist"):
        main(["--debug", "run", str(tmp_path / "nope"), "--output", str(tmp_path / "out")])


def test_backbones_lists_every_backbone_and_its_offline_status(capsys):
    from transfer_flow.tasks.backbones import BACKBONES

    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    for name in BACKBONES:
        assert name in out
    assert "25088" in out  # vgg16 flatten at 224


def test_run_on_a_messy_folder_lists_what_it_skipped(prefect_api, messy_dataset, tmp_path, capsys):
    output = tmp_path / "out"
    args = ["run", str(messy_dataset), "--output", str(output), "--backbone", "mobilenet_v2", "--weights", "none",
            "--image-size", "32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "skipped red/empty.jpg" in out and str(output / "report" / "report.md") in out
    assert json.loads((output / "run.json").read_text())["images_extracted"] > 0
    assert main(args) == 0  # the same dataset again: brought up to date, nothing re-extracted
    assert "0 images extracted" in capsys.readouterr().out


def test_output_of_another_dataset_needs_overwrite(prefect_api, messy_dataset, colour_dataset, tmp_path, capsys):
    output = tmp_path / "out"
    fast = ["--backbone", "mobilenet_v2", "--weights", "none", "--image-size", "32"]
    assert main(["run", str(colour_dataset), "--output", str(output), *fast]) == 0
    assert main(["run", str(messy_dataset), "--output", str(output), *fast]) == EXIT_USER_ERROR
    assert "--overwrite" in capsys.readouterr().err
    assert main(["run", str(messy_dataset), "--output", str(output), *fast, "--overwrite"]) == 0


def test_bad_dataset_inside_the_flow_is_one_line(prefect_api, tmp_path, capsys):
    (tmp_path / "data" / "only").mkdir(parents=True)
    (tmp_path / "data" / "only" / "a.png").write_bytes(b"")
    assert (
        main(["run", str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--weights", "none"]) == EXIT_USER_ERROR
    )
    err = capsys.readouterr().err
    assert "transfer-flow: error:" in err and "Traceback" not in err


def test_debug_and_verbose_are_accepted_after_the_command_too(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="does not exist"):
        main(["run", str(tmp_path / "nope"), "--output", str(tmp_path / "out"), "--debug"])
    assert main(["backbones", "--verbose"]) == 0


def test_a_positional_argument_is_named_as_the_user_typed_it(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope"), "--output", str(tmp_path / "out")]) == EXIT_USER_ERROR
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("transfer-flow: error: DATASET: ") and "--dataset" not in line


@pytest.fixture
def no_server(tmp_path):
    """PREFECT_API_URL at a port where nothing listens: a command that reached Prefect would fail on it."""
    import socket

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}):
        yield


def test_mistakes_that_need_no_server_are_reported_once_before_one_starts(no_server, colour_dataset, messy_dataset,
                                                                          tmp_path, capsys):
    from transfer_flow.storage.output_layout import OutputLayout

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "manifest.json").write_text("{}")  # outputs, but not from a run on this dataset
    (tmp_path / "old.csv").write_text("keep me")
    fast = ["--backbone", "mobilenet_v2", "--image-size", "32"]
    cases = [
        (["run", str(colour_dataset), "-o", str(tmp_path / "a"), *fast, "--weights", str(tmp_path / "no.weights.h5")],
         "does not exist"),
        (["run", str(colour_dataset), "-o", str(taken), *fast, "--weights", "none"], "--overwrite"),
        (["compare", str(messy_dataset), "-o", str(taken), *fast, "--weights", "none"], "--overwrite"),
        (["predict", str(tmp_path), str(colour_dataset), "-o", str(tmp_path / "old.csv")], "--overwrite"),
        (["predict", str(tmp_path / "no-bundle"), str(colour_dataset)], "bundle"),
    ]
    for argv, message in cases:
        assert main(argv) == EXIT_USER_ERROR, argv
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("transfer-flow: error:") and message in line, (argv, line)
    assert (tmp_path / "old.csv").read_text() == "keep me"
    assert not OutputLayout(root=str(tmp_path / "a")).store.exists()


# `main` in a fresh process, then which of TensorFlow and Keras that process imported.
RUN_THEN_IMPORTED = """
import sys
from transfer_flow.flows.cli import main
code = main(sys.argv[1:])
print(code, sorted({"tensorflow", "keras"} & set(sys.modules)))
"""


@pytest.mark.parametrize("api", ["a running server", "a temporary server"])
def test_a_warm_rerun_imports_neither_tensorflow_nor_keras(prefect_api, colour_dataset, tmp_path, api):
    """A rerun with nothing to extract or train builds no model, so the command imports neither: not ahead while a
    temporary server starts (the backbone's converted model is cached, the head is scikit-learn's), and not at all
    with a server up (seconds of every such command)."""
    from prefect.server.api.server import SubprocessASGIServer

    from tests.support import FAST

    command = ["run", str(colour_dataset), "--output", str(tmp_path / "out"), "--backbone", FAST["backbone"],
               "--weights", FAST["weights"], "--image-size", str(FAST["image_size"])]
    assert main(command) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    if api == "a running server":
        env["PREFECT_API_URL"] = SubprocessASGIServer().api_url
    done = subprocess.run([sys.executable, "-c", RUN_THEN_IMPORTED, *command], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(0 images extracted, 24 reused" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "0 []"
