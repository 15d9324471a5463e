"""Errors a user can act on.

Every error the CLI should print as one line (no traceback) derives from `TransferFlowError`,
and also from the matching built-in, so callers can catch either (the zarr-python habit).
"""
from __future__ import annotations

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


class UnreadableImageError(TransferFlowError, ValueError):
    """One image cannot be decoded; the pipeline records it as skipped with `reason`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class OutputLockedError(TransferFlowError, BlockingIOError):
    """Another run is writing to the same output folder."""
