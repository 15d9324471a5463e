"""What the inbox watcher has seen and announced, kept in one JSON file so a restart never re-announces.

An announcement is written (with its event id) *before* the event is sent and marked sent after:
a watcher killed in between sends it again on restart with the same id, which the Prefect server
recognises as a duplicate. Deleting the state file makes every dataset in the inbox new again.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, Field

from transfer_flow.storage.atomic import file_lock, write_text


class Sighting(BaseModel):
    """A dataset version seen but not announced yet (not ready, or not yet seen unchanged twice)."""

    version: str
    since: float = Field(description="Unix time the watcher first saw this version.")


class Announcement(BaseModel):
    """One dataset version announced (or being announced) as arrived."""

    path: str = Field(description="Absolute path of the dataset folder.")
    name: str = Field(description="The folder's name in the inbox.")
    version: str = Field(description="Fingerprint of the folder's files (paths, sizes, modification times).")
    files: int
    bytes: int
    event_id: str
    announced_at: str
    sent: bool = Field(default=False, description="True once the event reached the Prefect server.")


class InboxState(BaseModel):
    announced: dict[str, Announcement] = Field(
        default_factory=dict, description="Latest announcement per dataset path."
    )
    seen: dict[str, Sighting] = Field(default_factory=dict)


class AnnouncementLog:
    """The state file, read and replaced whole (atomic rename); `locked()` keeps two scanners apart."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()

    def load(self) -> InboxState:
        if not self.path.is_file():
            return InboxState()
        return InboxState.model_validate_json(self.path.read_text(encoding="utf-8"))

    def save(self, state: InboxState) -> None:
        write_text(self.path, state.model_dump_json(indent=1) + "\n")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """An OS lock beside the state file (a watcher and a polling flow on one inbox take turns)."""
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            yield
