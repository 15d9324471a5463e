"""The custom event that announces a dataset, and how it is sent.

`transfer-flow.dataset.arrived`, about the resource `transfer-flow.dataset.<folder name>`, with the
payload `{"path", "name", "version", "files", "bytes"}`. The `on-dataset` deployment's trigger
matches it and templates its run parameters from the payload. Anyone can send it, not only the
watcher (a script after an upload, `prefect event emit`...):

    from deployments.events import announce
    announce("/data/inbox/flowers")
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage.errors import SettingsError

if TYPE_CHECKING:
    from prefect.events import Event

DATASET_ARRIVED = "transfer-flow.dataset.arrived"
RESOURCE_PREFIX = "transfer-flow.dataset."


def dataset_arrived(path: str, name: str, version: str, *, files: int = 0, bytes: int = 0,
                    event_id: str | None = None) -> "Event":
    from prefect.events import Event  # imported when used: `transfer-flow --help` need not load Prefect

    payload: dict[str, Any] = {"path": path, "name": name, "version": version, "files": files, "bytes": bytes}
    return Event(
        id=uuid.UUID(event_id) if event_id else uuid.uuid4(),
        event=DATASET_ARRIVED,
        resource={"prefect.resource.id": f"{RESOURCE_PREFIX}{name}", "prefect.resource.name": name,
                  "transfer-flow.dataset.version": version},
        payload=payload,
    )


def require_api_url() -> str:
    """The configured Prefect API, or a user error: events sent nowhere would be lost silently."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise SettingsError("PREFECT_API_URL is not set: start a server with `transfer-flow server` and export "
                            "the PREFECT_API_URL it prints (a temporary server has no triggers or schedules to serve)")
    return str(url)


def send(event: "Event") -> None:
    """Send one event and return once the server has received it (a websocket round trip)."""
    from prefect.events.clients import get_events_client
    from prefect.utilities.asyncutils import run_coro_as_sync

    require_api_url()

    async def _send() -> None:
        # checkpoint_every=1: after sending, ping and wait for the pong, so the event is known delivered.
        async with get_events_client(reconnection_attempts=3, checkpoint_every=1) as client:
            await client.emit(event)

    run_coro_as_sync(_send())


def announce(folder: str | Path, *, version: str | None = None) -> "Event":
    """Announce a dataset folder by hand (no watcher, no state): one event, sent now."""
    from deployments.watch import snapshot

    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise SettingsError(f"Dataset folder {folder} does not exist or is not a folder")
    snap = snapshot(folder)
    event = dataset_arrived(str(folder), folder.name, version or snap.version, files=snap.files, bytes=snap.bytes)
    send(event)
    return event
