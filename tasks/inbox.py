"""Watch an inbox folder and announce each dataset folder once, when it has fully arrived.

A dataset folder is a direct sub-folder of the inbox. It is *ready* when

- `marker` (default): a `_READY` file is in it (write it last, after copying the images);
- `quiet`: nothing in it has changed for `quiet_seconds` (for uploaders that cannot write a marker);

and, in both modes, when its fingerprint (every file's path, size and modification time, the marker
and hidden files excepted) is the same as at the previous scan, so a folder still being copied is
never announced. A ready folder is announced with one `transfer-flow.dataset.arrived` event. The
state file remembers each announcement, so a restarted watcher stays quiet about what it already
announced; a folder whose fingerprint changes later is announced again, as a new version.

The watcher wakes on filesystem events (watchfiles: inotify, FSEvents, ReadDirectoryChangesW) and
rescans every `interval` seconds regardless, which is all a network filesystem offers.

Polling alternative: `transfer_flow.flows.inbox.scan_inbox` runs one scan as a flow, on a schedule (`transfer-flow serve
--inbox DIR`), sharing the same state file and lock.

The event. The custom event that announces a dataset, and how it is sent.

`transfer-flow.dataset.arrived`, about the resource `transfer-flow.dataset.<folder name>`, with the
payload `{"path", "name", "version", "files", "bytes"}`. The `on-dataset` deployment's trigger
matches it and templates its run parameters from the payload. Anyone can send it, not only the
watcher (a script after an upload, `prefect event emit`...):

    from transfer_flow.tasks.inbox import announce
    announce("/data/inbox/flowers")
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from transfer_flow.storage.announcements import Announcement, AnnouncementLog, InboxState, Sighting
from transfer_flow.storage.errors import SettingsError, TransferFlowError

if TYPE_CHECKING:
    from prefect.events import Event

Readiness = Literal["marker", "quiet"]
DATASET_ARRIVED = "transfer-flow.dataset.arrived"
RESOURCE_PREFIX = "transfer-flow.dataset."
MARKER = "_READY"
STATE_FILE = ".transfer-flow-inbox.json"

log = logging.getLogger("transfer_flow.watch")


class Snapshot(BaseModel):
    version: str
    files: int
    bytes: int
    newest_mtime: float


def snapshot(folder: Path, marker: str = MARKER) -> Snapshot:
    """Fingerprint a folder from its files' relative paths, sizes and mtimes (hidden entries and the marker skipped)."""
    digest = hashlib.sha256()
    files = total = 0
    newest = 0.0
    entries: list[tuple[str, int, int]] = []
    for directory, subdirs, names in os.walk(folder):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for name in names:
            if name.startswith(".") or (name == marker and Path(directory) == folder):
                continue
            path = Path(directory) / name
            try:
                stat = path.stat()
            except OSError:  # vanished between listing and stat: the next scan sees a new fingerprint anyway
                continue
            entries.append((path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns))
            newest = max(newest, stat.st_mtime)
    for relative, size, mtime_ns in sorted(entries):
        digest.update(f"{relative}\0{size}\0{mtime_ns}\n".encode())
        files += 1
        total += size
    return Snapshot(version=digest.hexdigest()[:16], files=files, bytes=total, newest_mtime=newest)


class InboxWatcher:
    """Scans an inbox and announces ready dataset folders; `emit` sends one announcement (or raises)."""

    def __init__(self, inbox: str | Path, *, ready: Readiness = "marker", marker: str = MARKER,
                 quiet_seconds: float = 30.0, state_file: str | Path | None = None,
                 emit: Callable[[Announcement], None] | None = None, clock: Callable[[], float] = time.time):
        self.inbox = Path(inbox).expanduser().resolve()
        if not self.inbox.is_dir():
            raise SettingsError(f"Inbox {self.inbox} does not exist or is not a folder")
        if ready not in ("marker", "quiet"):
            raise SettingsError(f"Expected readiness 'marker' or 'quiet', got {ready!r}")
        if quiet_seconds < 0:
            raise SettingsError(f"Expected --quiet-seconds of at least 0, got {quiet_seconds}")
        self.ready, self.marker, self.quiet_seconds = ready, marker, float(quiet_seconds)
        self.log = AnnouncementLog(state_file or self.inbox / STATE_FILE)
        self.emit = emit or emit_announcement
        self.clock = clock

    def candidates(self) -> list[Path]:
        return sorted(p for p in self.inbox.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _is_ready(self, folder: Path, snap: Snapshot, sighting: Sighting | None, now: float) -> bool:
        stable = sighting is not None and sighting.version == snap.version
        if not stable:
            return False
        if self.ready == "marker":
            return (folder / self.marker).is_file()
        return now - max(sighting.since, snap.newest_mtime) >= self.quiet_seconds

    def scan(self) -> list[Announcement]:
        """One pass: returns the announcements sent during it."""
        sent: list[Announcement] = []
        with self.log.locked():
            state = self.log.load()
            before = state.model_dump_json()
            present = set()
            for folder in self.candidates():
                key = str(folder)
                present.add(key)
                snap = snapshot(folder, self.marker)
                if snap.files == 0:
                    continue
                now = self.clock()
                previous = state.announced.get(key)
                if previous is not None and previous.version == snap.version:
                    if not previous.sent:  # announced, but the watcher stopped before the server confirmed
                        self._send(previous, state)
                        sent.append(previous)
                    continue
                sighting = state.seen.get(key)
                if not self._is_ready(folder, snap, sighting, now):
                    if sighting is None or sighting.version != snap.version:
                        state.seen[key] = Sighting(version=snap.version, since=now)
                    continue
                announcement = Announcement(
                    path=key, name=folder.name, version=snap.version, files=snap.files, bytes=snap.bytes,
                    event_id=str(uuid.uuid4()),
                    announced_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
                state.announced[key] = announcement
                state.seen.pop(key, None)
                self.log.save(state)  # the intent is on disk before the event leaves
                self._send(announcement, state)
                sent.append(announcement)
            for gone in set(state.seen) - present:  # a folder removed before it was ready
                del state.seen[gone]
            if state.model_dump_json() != before:
                self.log.save(state)
        return sent

    def _send(self, announcement: Announcement, state: InboxState) -> None:
        self.emit(announcement)
        announcement.sent = True
        self.log.save(state)
        log.info("announced %s (version %s, %d files) as %s", announcement.path, announcement.version,
                 announcement.files, announcement.event_id)

    def run(self, interval: float = 5.0, stop: threading.Event | None = None, max_scans: int | None = None) -> None:
        """Scan now, then again on every change in the inbox and at least every `interval` seconds, until
        `stop` is set (or `max_scans` scans are done).

        Changes come as native filesystem events through watchfiles, so a marker is seen within a moment;
        the scan every `interval` seconds, with or without events, is what makes a folder's second,
        unchanged sighting happen, lets the quiet period elapse, and catches what a network filesystem
        never reports as an event (another machine writing over NFS or SMB).
        """
        from watchfiles import watch

        stop = stop or threading.Event()
        timeout_ms = max(1, round(interval * 1000))
        changes = watch(self.inbox, watch_filter=self._is_relevant, stop_event=stop, rust_timeout=timeout_ms,
                        yield_on_timeout=True)
        scans = 0
        try:
            while not stop.is_set():
                try:
                    self.scan()
                except TransferFlowError:
                    raise
                except Exception as error:  # the server is restarting, a folder vanished mid-scan...: try again later
                    log.warning("scan of %s failed (%s: %s); retrying in %g s", self.inbox, type(error).__name__,
                                error, interval)
                scans += 1
                if max_scans is not None and scans >= max_scans:
                    return
                if next(changes, None) is None:  # else a batch of changes, or an empty one: the interval passed
                    return  # `stop` was set while waiting
        finally:
            changes.close()

    def _is_relevant(self, change: Any, path: str) -> bool:
        """Changes that can alter a dataset's fingerprint or its marker: hidden entries (the state file, its
        lock, temporaries, .DS_Store) are not, which also keeps the watcher's own writes from waking it."""
        try:
            parts = Path(path).relative_to(self.inbox).parts
        except ValueError:
            return False
        return bool(parts) and not any(part.startswith(".") for part in parts)


def emit_announcement(announcement: Announcement) -> None:
    """Send the announcement as a `transfer-flow.dataset.arrived` event to the Prefect server."""
    send(dataset_arrived(announcement.path, announcement.name, announcement.version, files=announcement.files,
                         bytes=announcement.bytes, event_id=announcement.event_id))



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


def send(event: "Event") -> None:
    """Send one event and return once the server has received it (a websocket round trip)."""
    from prefect.events.clients import get_events_client
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def _send() -> None:
        # checkpoint_every=1: after sending, ping and wait for the pong, so the event is known delivered.
        async with get_events_client(reconnection_attempts=3, checkpoint_every=1) as client:
            await client.emit(event)

    run_coro_as_sync(_send())


def announce(folder: str | Path, *, version: str | None = None) -> "Event":
    """Announce a dataset folder by hand (no watcher, no state): one event, sent now."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise SettingsError(f"Dataset folder {folder} does not exist or is not a folder")
    snap = snapshot(folder)
    event = dataset_arrived(str(folder), folder.name, version or snap.version, files=snap.files, bytes=snap.bytes)
    send(event)
    return event
