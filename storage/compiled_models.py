"""The compiled-model cache: one folder per converted (and, for int8, calibrated) backbone, named by its key.

A runtime that converts the Keras model (OpenVINO) saves the result here once; the next run with the same
key loads it without TensorFlow. An entry is published by renaming a finished folder into place, so a
reader never sees half of one. Entries are untrusted on the way back in: `entry.json` is size-capped and
validated, and every file it lists must have exactly its recorded size and SHA-256, or the entry is
reported unusable (the caller rebuilds it).

    <root>/<name>-<key>/entry.json      what the entry holds and how to check it
    <root>/<name>-<key>/<files>         the runtime's own files (model.xml, model.bin)
    <root>/<name>-<key>/blobs/          the runtime's compiled-blob cache (its own format and checks)
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from transfer_flow.storage.atomic import rename_into_place, temp_dir_beside, write_text
from transfer_flow.storage.content_keys import file_sha256

ENTRY_FILE = "entry.json"
MAX_ENTRY_BYTES = 1 << 20  # entry.json lists a few files and a few hundred calibration hashes
MAX_MODEL_BYTES = 4 << 30  # the largest backbone (VGG16 at flatten, fp32) is ~60 MB


class CachedFile(BaseModel):
    size: int = Field(ge=0, le=MAX_MODEL_BYTES)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class CompiledModelEntry(BaseModel):
    """What one entry holds; written last into the entry, read first."""

    key: str
    runtime: str
    runtime_version: str
    description: str = Field(description="For people: backbone, size, pooling, precision, weights.")
    files: dict[str, CachedFile]
    calibration_hashes: list[str] = Field(
        default_factory=list, description="Content hashes of the calibration images (int8), in calibration order."
    )


class UnusableEntryError(ValueError):
    """A cache entry exists but is not what it should be (truncated, edited, another key)."""


def entry_dir(root: Path, name: str, key: str) -> Path:
    return Path(root) / f"{name}-{key}"


def read_entry(folder: Path, key: str) -> CompiledModelEntry | None:
    """The checked entry in `folder`; None when there is none; UnusableEntryError when it is not intact."""
    folder = Path(folder)
    meta = folder / ENTRY_FILE
    if not folder.exists():
        return None
    if not meta.is_file() or meta.stat().st_size > MAX_ENTRY_BYTES:
        raise UnusableEntryError(f"{meta} is missing or larger than {MAX_ENTRY_BYTES} bytes")
    try:
        entry = CompiledModelEntry.model_validate_json(meta.read_bytes())
    except (ValidationError, UnicodeDecodeError) as error:
        raise UnusableEntryError(f"{meta} is not a cache entry ({str(error).splitlines()[0]})") from None
    if entry.key != key:
        raise UnusableEntryError(f"{meta} is for key {entry.key}, expected {key}")
    for name, expected in entry.files.items():
        path = folder / name
        if Path(name).name != name or not path.is_file():  # only plain files of the entry itself
            raise UnusableEntryError(f"{path} is missing")
        if path.stat().st_size != expected.size:
            raise UnusableEntryError(f"{path} has {path.stat().st_size} bytes, expected {expected.size}")
        if file_sha256(path) != expected.sha256:
            raise UnusableEntryError(f"{path} does not have the recorded content (SHA-256 differs)")
    return entry


def publish_entry(folder: Path, write: Callable[[Path], CompiledModelEntry | dict]) -> CompiledModelEntry:
    """Build an entry in a temporary folder beside `folder` with `write(tmp)` (which saves the runtime's files
    and returns the entry without `files`), record sizes and hashes, and rename it into place (replacing an
    unusable one). Concurrent builders of one key write equivalent entries: the last rename wins."""
    folder = Path(folder)
    tmp = temp_dir_beside(folder, overwrite=True)
    try:
        described = write(tmp)
        fields = described.model_dump(exclude={"files"}) if isinstance(described, BaseModel) else dict(described)
        files = {path.name: CachedFile(size=path.stat().st_size, sha256=file_sha256(path))
                 for path in sorted(tmp.iterdir()) if path.is_file()}
        entry = CompiledModelEntry(**fields, files=files)
        write_text(tmp / ENTRY_FILE, entry.model_dump_json(indent=2) + "\n")
        rename_into_place(tmp, folder, overwrite=True)
        return entry
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_entry(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
