"""Errors a user can act on.

Every error the CLI should print as one line (no traceback) derives from `TransferFlowError`,
and also from the matching built-in, so callers can catch either (the zarr-python habit).
"""
from __future__ import annotations

import errno
import re
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class TransferFlowError(Exception):
    """Base of all user-facing errors: the message alone must tell the user what to do."""


class DatasetError(TransferFlowError, ValueError):
    """The dataset folder cannot be used as given (missing, too few classes, class too small...)."""


class OutputExistsError(TransferFlowError, FileExistsError):
    """An output already exists and the user did not ask to overwrite it."""


class WeightsUnavailableError(TransferFlowError, FileNotFoundError):
    """Pretrained weights are neither given, cached, installed nor downloadable."""


class WeightsFileError(TransferFlowError, ValueError):
    """A weights file does not fit the backbone it was given for, or holds NaN or inf."""


class StoreError(TransferFlowError, ValueError):
    """A feature store is missing, malformed, or incompatible with what reads it."""


class BundleError(TransferFlowError, ValueError):
    """A model bundle is missing, altered, or incompatible with the features it is given."""


class SettingsError(TransferFlowError, ValueError):
    """A setting has a value the pipeline cannot use."""

    @classmethod
    def from_validation_error(
        cls, error: ValidationError, *, positional: Mapping[str, str] | None = None, nested: Collection[str] = ()
    ) -> SettingsError:
        """pydantic's errors in the user's words: each field as its flag (`--image-size`), or as the positional
        argument it was given as (`DATASET`); `nested` names containers left out of the flag (`pipeline`)."""
        positional = positional or {}
        parts = []
        for detail in error.errors():
            loc = [str(part) for part in detail["loc"] if part not in nested]
            if loc and loc[0] in positional:
                where = positional[loc[0]]
            else:
                where = "--" + "-".join(loc).replace("_", "-") if loc else ""
            parts.append((f"{where}: " if where else "") + detail["msg"].removeprefix("Value error, "))
        return cls("; ".join(parts))


def first_problem(error: ValidationError) -> str:
    """pydantic's first complaint about a file we read, in one clause: where in it, and what."""
    detail = error.errors()[0]
    where = ".".join(str(part) for part in detail["loc"]) or "the file"
    return f"{where}: {detail['msg']}"


class UnreadableImageError(TransferFlowError, ValueError):
    """One image cannot be decoded; the pipeline records it as skipped with `reason`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class OutputLockedError(TransferFlowError, BlockingIOError):
    """Another run is writing to the same output folder."""


class DiskError(TransferFlowError, OSError):
    """The file system refused a read or write: full, read-only, or not ours to touch."""

    def __str__(self) -> str:  # the sentence alone, without OSError's "[Errno N]"
        return self.strerror or super().__str__()


# errno → (what happened, what to do); every write is atomic, so whatever was in place before is unchanged.
_DISK_FAULTS = {
    errno.ENOSPC: ("no space left on device", "free some space or choose another --output"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose another --output"),
    errno.EROFS: ("read-only file system", "choose a writable --output"),
    errno.EACCES: ("permission denied", "check the folder's permissions or choose another --output"),
    errno.EPERM: ("operation not permitted", "check the folder's permissions or choose another --output"),
}


def disk_error(error: BaseException, where: str | None = None) -> DiskError | None:
    """A one-sentence DiskError for a full, read-only or forbidden file system, else None.

    Looks through the chain of causes (h5py and zarr re-raise) and finds the path in the error, or in
    h5py's message, or falls back to `where` (zarr names no file)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and not isinstance(current, TransferFlowError):
            code = current.errno
            if code not in _DISK_FAULTS:
                found = re.search(r"errno = (\d+)", str(current))
                code = int(found.group(1)) if found else code
            if code in _DISK_FAULTS:
                quoted = re.search(r"filename = '([^']*)'", str(current))
                path = current.filename or (quoted.group(1) if quoted else None) or where
                what, advice = _DISK_FAULTS[code]
                return DiskError(code, f"{what}{f' on {path}' if path else ''}: {advice} "
                                       "(files already in place are unchanged)")
        current = current.__cause__ or current.__context__
    return None
