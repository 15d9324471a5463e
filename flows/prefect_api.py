"""Which Prefect API a command talks to: PREFECT_API_URL when set, else a `transfer-flow server` answering at
the default address, else (for flow commands) a temporary server Prefect starts for the process."""
from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Iterator

from transfer_flow.storage.errors import SettingsError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4200


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}/api"


def running_local_server(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str | None:
    """The API URL of a server answering at the default `transfer-flow server` address, else None.

    Lets a plain `transfer-flow run` use a server that is already up (its runs then show in the UI)
    instead of paying ~6 s for a temporary one; a refused connection answers at once.
    """
    import httpx

    url = api_url(host, port)
    try:
        return url if httpx.get(f"{url}/health", timeout=0.5).status_code == 200 else None
    except httpx.HTTPError:
        return None


def require_api_url() -> str:
    """The configured Prefect API, or a user error: events sent nowhere would be lost silently."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise SettingsError(
            "PREFECT_API_URL is not set: start a server with `transfer-flow server` and export "
            "the PREFECT_API_URL it prints (a temporary server has no triggers or schedules to serve)"
        )
    return str(url)


@contextlib.contextmanager
def shared_with_workers() -> Iterator[None]:
    """Inside a flow: make this run's Prefect API the explicit PREFECT_API_URL while tasks go to Dask workers.

    Prefect hands its settings to each task it sends to a worker. Without an API URL in them (a command
    running on the temporary server Prefect starts for the process), every worker process would start a
    temporary server of its own: seconds per worker, and the shards' task runs out of this run's graph.
    """
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL, temporary_settings

    context = FlowRunContext.get()
    if PREFECT_API_URL.value() or context is None:
        yield
        return
    with temporary_settings(updates={PREFECT_API_URL: str(context.client.api_url).rstrip("/")}):
        yield


# TensorFlow's C++ start-up lines that TF_CPP_MIN_LOG_LEVEL no longer reaches: 2.21 logs them before absl's log is
# initialised, straight to the process's stderr (tensorflow/tensorflow#100442).
NATIVE_START_UP_LINES = ("oneDNN custom operations are on", "All log messages before absl::InitializeLog()")


@contextlib.contextmanager
def native_start_up_lines_dropped() -> Iterator[None]:
    """Everything written to the process's stderr meanwhile (by native code too) is held, then passed on without
    TensorFlow's start-up lines. A user who asked for TensorFlow's logs (TF_CPP_MIN_LOG_LEVEL=0) gets them all."""
    import sys
    import tempfile

    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") == "0":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(keepends=True)
                    if not line.startswith(("WARNING: All log messages", "I0000")) or
                    not any(banner in line for banner in NATIVE_START_UP_LINES)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def start_api_while_importing(*modules: str) -> None:
    """Start the Prefect API a flow talks to first while a thread imports what its tasks need later.

    Without PREFECT_API_URL Prefect starts a temporary server on the flow's first call (a subprocess: seconds),
    and only then do the tasks import TensorFlow and Keras (seconds more). Here the two overlap. An import that
    fails here is left to fail again, with its own message, where the task needs it.

    With an API already up (PREFECT_API_URL) there is nothing to overlap: the tasks import what they need when they
    need it, and a rerun with nothing to extract imports neither (~7 s of every such command, server module included).
    """
    import importlib
    import threading

    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    # Everything the main thread imports is imported before the thread starts: no two threads in one import.
    import prefect.server.api.server  # noqa: F401  (the temporary server's module)
    from prefect.client.orchestration import get_client

    def import_all() -> None:
        with native_start_up_lines_dropped():
            for name in modules:
                try:
                    importlib.import_module(name)
                except Exception:  # noqa: BLE001  (see the docstring)
                    return

    importer = threading.Thread(target=import_all, name="transfer-flow-imports", daemon=True)
    importer.start()
    try:
        get_client(sync_client=True)  # starts the temporary server when no API is configured, as the flow would
    finally:
        importer.join()

def temporary_server_dies_with_this_process() -> None:
    """Make the temporary server Prefect starts for this process (when no API is configured) die with it.

    Prefect stops that server at exit, but a process killed by a signal or a native crash runs no exit
    handlers, and the server, a child process, was left listening. Prefect keeps one server object per
    port and reuses it, so registering ours first (unstarted: Prefect still starts it only when a flow
    needs it) is all it takes. Linux only (the parent-death signal); elsewhere Prefect's own server stays.
    """
    import sys

    if not sys.platform.startswith("linux"):
        return
    import subprocess
    import types

    from prefect.server.api import server as server_module  # deferred: FastAPI and the server's models

    if None in server_module.SubprocessASGIServer._instances:  # the one Prefect's client asks for (no port)
        return

    class ServerDyingWithParent(server_module.SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            parent, real_popen = os.getpid(), subprocess.Popen

            def popen(*args, **kwargs):
                return real_popen(*args, preexec_fn=lambda: _die_with(parent), **kwargs)

            # Prefect builds the command line; only how the child starts differs, and only during this call.
            server_module.subprocess = types.SimpleNamespace(**{**vars(subprocess), "Popen": popen})
            try:
                return super()._run_uvicorn_command()
            finally:
                server_module.subprocess = subprocess

    ServerDyingWithParent()


def _die_with(parent: int) -> None:
    """Runs in the server's child before exec: SIGKILL it when its parent dies (and leave now if it already has).

    The kernel sends the signal when the *thread* that started the child ends; Prefect starts the server
    from the flow's thread or its long-lived event-loop thread, both of which live as long as the process.
    """
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
