"""Polling alternative to `transfer-flow watch`, wiring only: one scan of the inbox per scheduled run."""
from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NONE
from pydantic import Field

from transfer_flow.flows.run_names import inbox_run_name
from transfer_flow.storage.announcements import Announcement
from transfer_flow.tasks.inbox import MARKER, InboxWatcher, Readiness


@task(name="announce ready datasets", cache_policy=NONE)
def announced_datasets(watcher: InboxWatcher) -> list[Announcement]:
    return watcher.scan()


@flow(name="scan-inbox", log_prints=True, flow_run_name=inbox_run_name)
def scan_inbox(
    inbox: str = Field(description="Folder whose sub-folders are datasets."),
    ready: Readiness = Field(
        default="marker",
        description="marker: a dataset is ready when its _READY file exists; "
        "quiet: when nothing in it changed for quiet_seconds.",
    ),
    quiet_seconds: float = Field(default=60.0, ge=0, description="Quiet period of the 'quiet' readiness rule."),
    state_file: str | None = Field(
        default=None,
        description="What was announced; empty: INBOX/.transfer-flow-inbox.json (shared with `transfer-flow watch`).",
    ),
) -> list[Announcement]:
    """Announce every dataset folder of the inbox that became ready since the last scan (one event each)."""
    watcher = InboxWatcher(inbox, ready=ready, marker=MARKER, quiet_seconds=quiet_seconds, state_file=state_file)
    announced = announced_datasets(watcher)
    for a in announced:
        print(f"announced {a.path} (version {a.version}, {a.files} files)")
    if not announced:
        print(f"nothing new in {watcher.inbox}")
    return announced
