"""Where a run's outputs live under the user's --output directory, and who may write there."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from transfer_flow.storage.atomic import file_lock
from transfer_flow.storage.errors import OutputExistsError, OutputLockedError
from transfer_flow.storage.feature_store.formats import DEFAULT_STORE_FORMAT, STORE_FORMATS, StoreFormatName

LOCK_FILE = ".transfer-flow.lock"


class OutputLayout(BaseModel):
    root: str
    store_format: StoreFormatName = DEFAULT_STORE_FORMAT

    @property
    def store(self) -> Path:
        return Path(self.root) / STORE_FORMATS[self.store_format].file_name

    @property
    def manifest(self) -> Path:
        return Path(self.root) / "manifest.json"

    @property
    def model(self) -> Path:
        return Path(self.root) / "model"

    @property
    def report(self) -> Path:
        return Path(self.root) / "report"

    @property
    def run_summary(self) -> Path:
        return Path(self.root) / "run.json"

    def outputs(self) -> list[Path]:
        stores = [Path(self.root) / f.file_name for f in STORE_FORMATS.values()]
        return [*stores, self.manifest, self.model, self.report, self.run_summary]

    def claim(self, dataset: str, *, overwrite: bool) -> None:
        """Refuse before any work if DIR holds outputs that are not an earlier run on the same dataset.

        Outputs of an earlier run on the same dataset are brought up to date (that is what the stage
        caches are for); anything else is replaced only with `overwrite`.
        """
        root = Path(self.root)
        if root.exists() and not root.is_dir():
            raise OutputExistsError(f"--output {root} exists and is not a directory")
        existing = [p.name for p in self.outputs() if p.exists()]
        if not existing or overwrite:
            return
        earlier = _earlier_dataset(self.run_summary)
        if earlier is not None and Path(earlier).resolve() == Path(dataset).resolve():
            return
        what = f"a run on {earlier}" if earlier else "files not written by a completed transfer-flow run"
        raise OutputExistsError(f"{root} already holds {', '.join(existing)} from {what} "
                                "(pass --overwrite to replace them, or choose another --output)")

    @contextlib.contextmanager
    def locked(self, *, wait: bool = False) -> Iterator[None]:
        """Hold the output's writer lock; a second writer is refused (or waits, with `wait`).

        An OS lock (flock) dies with its process, so a killed run never leaves a stale lock.
        """
        root = Path(self.root)
        with contextlib.ExitStack() as stack:
            try:
                handle = stack.enter_context(file_lock(root / LOCK_FILE, wait=wait))
            except BlockingIOError:
                holder = (root / LOCK_FILE).read_text().strip() or "another process"
                raise OutputLockedError(f"{root} is being written by {holder}; wait for it to finish "
                                        "(or pass --wait to queue behind it)") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"transfer-flow pid {os.getpid()}")
            handle.flush()
            self._remove_stale_temporaries()
            try:
                yield
            finally:
                handle.truncate(0)

    def _remove_stale_temporaries(self) -> None:
        """Temporaries of a killed run (atomic writes never completed); only called under the lock."""
        for output in self.outputs():
            for stale in Path(self.root).glob(f".{output.name}.*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)


def _earlier_dataset(run_summary: Path) -> str | None:
    try:
        return json.loads(run_summary.read_text())["dataset"]
    except (OSError, ValueError, KeyError):
        return None
