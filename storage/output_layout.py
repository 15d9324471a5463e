"""Where a run's outputs live under the user's --output directory, and who may write there."""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from transfer_flow.storage.atomic import file_lock, write_json
from transfer_flow.storage.errors import OutputExistsError, OutputLockedError
from transfer_flow.storage.feature_store.formats import DEFAULT_STORE_FORMAT, STORE_FORMATS, StoreFormatName

LOCK_FILE = ".transfer-flow.lock"
# Which dataset the latest run into this folder was started on, written before it writes anything else:
# a run killed at any point leaves outputs that the next run on the same dataset recognises as its own.
CLAIM_FILE = ".transfer-flow-claim.json"


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

    @property
    def claim_file(self) -> Path:
        return Path(self.root) / CLAIM_FILE

    def claim(self, dataset: str, *, overwrite: bool) -> None:
        """Refuse before any work if DIR holds outputs that are not an earlier run's on the same dataset; then
        record that this run on `dataset` writes here (the claim).

        An earlier run is known by its claim (written before its first output, so it covers a run killed at
        any point) or, for folders from before claims, by its run.json. Its outputs are brought up to date
        (that is what the stage caches are for); anything else is replaced only with `overwrite`.
        """
        root = Path(self.root)
        if root.exists() and not root.is_dir():
            raise OutputExistsError(f"--output {root} exists and is not a directory")
        existing = [p.name for p in self.outputs() if p.exists()]
        if existing and not overwrite:
            earlier = _recorded_dataset(self.claim_file) or _recorded_dataset(self.run_summary)
            if earlier is None or Path(earlier).resolve() != Path(dataset).resolve():
                what = f"a run on {earlier}" if earlier else "files not written by a transfer-flow run"
                raise OutputExistsError(f"{root} already holds {', '.join(existing)} from {what} "
                                        "(pass --overwrite to replace them, or choose another --output)")
        write_json(self.claim_file, {"dataset": str(Path(dataset).resolve()), "pid": os.getpid(),
                                     "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})

    @contextlib.contextmanager
    def locked(self, *, wait: bool = False) -> Iterator[None]:
        """Hold the output's writer lock; a second writer is refused (or waits, with `wait`).

        An OS lock (flock) dies with its process, so a killed run never leaves a stale lock. The lock file
        itself stays, empty between runs: removing it while a second run waits on it would let a third run
        lock a new file of the same name, and two runs would write at once.
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
        for output in [*self.outputs(), self.claim_file]:
            for stale in Path(self.root).glob(f".{output.name}.*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)


def _recorded_dataset(record: Path) -> str | None:
    """The dataset a claim or run.json names (None when absent or unreadable: then it proves nothing)."""
    try:
        dataset = json.loads(record.read_text())["dataset"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return dataset if isinstance(dataset, str) else None
