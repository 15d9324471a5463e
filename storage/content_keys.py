"""Cache keys: every stage names what it made by the same hash of what decided it.

A key is the hash of a JSON list (the stage's input fingerprint, its own settings, its code version,
the package version): equal inputs give equal keys on any machine, and a change to any part gives a
new key, so a stale result is never reused.
"""
from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

KEY_LENGTH = 16  # hex digits: 64 bits, ample for the handful of results kept per output folder


def content_key(*parts: Any) -> str:
    """The key of `parts` (JSON-able; anything else is keyed by its str)."""
    return hashlib.sha256(json.dumps(list(parts), default=str).encode()).hexdigest()[:KEY_LENGTH]


def package_version() -> str:
    """This install's version: part of every key, so results of another release are recomputed."""
    try:
        return metadata.version("transfer-flow")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def file_sha256(path: Path) -> str:
    """A file's SHA-256, read in blocks (weights and converted models run to hundreds of MB)."""
    with Path(path).open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
