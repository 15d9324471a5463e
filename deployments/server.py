"""A real Prefect server for transfer-flow: API, UI, scheduler and triggers, its SQLite database under HOME/prefect.

`transfer-flow server` runs `prefect server start` in the foreground with `PREFECT_HOME=HOME/prefect`,
bound to 127.0.0.1 unless told otherwise, waits until it answers, then prints the UI address and
the `PREFECT_API_URL` other terminals must export. Ctrl-C stops it.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from transfer_flow.flows.prefect_api import DEFAULT_HOST, DEFAULT_PORT, api_url, is_loopback
from transfer_flow.storage.errors import SettingsError

STARTUP_SECONDS = 120


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as uvicorn does: old TIME_WAIT sockets are no obstacle
        try:
            probe.bind((host, port))
        except OSError as error:
            raise SettingsError(
                f"Cannot listen on {host}:{port} ({error.strerror}): is a server already running "
                f"there? Use it (export PREFECT_API_URL={api_url(host, port)}) or pick --port"
            ) from None


def server_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port), "--analytics-off"]


def server_environment(prefect_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the server is the API, not a client of one
    env["PREFECT_HOME"] = str(prefect_home)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # no network here, and nothing to report
    return env


def wait_until_healthy(url: str, process: subprocess.Popen, timeout: float = STARTUP_SECONDS) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SettingsError(f"The Prefect server exited with code {process.returncode} before answering "
                                "(its output is above)")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SettingsError(f"The Prefect server did not answer at {url} within {timeout:.0f} s")


def run_server(home: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
               echo: Callable[[str], None] = print) -> int:
    """Start the server, print where it is, wait for it to stop; returns its exit code."""
    prefect_home = Path(home).expanduser().resolve() / "prefect"
    prefect_home.mkdir(parents=True, exist_ok=True)
    if not is_loopback(host):
        echo(f"warning: listening on {host}: anyone who can reach this machine on port {port} can see and start "
             "runs (the Prefect server has no authentication by default)")
    check_port_free(host, port)
    url = api_url(host, port)
    process = subprocess.Popen(server_command(host, port), env=server_environment(prefect_home))
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        wait_until_healthy(url, process)
        echo("")
        echo(f"Prefect server for transfer-flow is up (database: {prefect_home / 'prefect.db'})")
        echo(f"  UI:  {url.removesuffix('/api')}")
        echo(f"  API: {url}")
        echo("In every terminal that runs transfer-flow serve / watch / run, or the prefect CLI:")
        echo(f"  export PREFECT_API_URL={url}")
        echo("Stop the server with Ctrl-C.")
        sys.stdout.flush()
        return process.wait()
    except KeyboardInterrupt:
        return _stop(process)
    except BaseException:
        _stop(process)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(signum, frame) -> None:
    # `kill`, a closed terminal or a service manager: stop the server like Ctrl-C does, never orphan it.
    raise KeyboardInterrupt


def _stop(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.terminate()  # SIGTERM: honoured even where SIGINT is ignored (background jobs of scripts)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return 0
