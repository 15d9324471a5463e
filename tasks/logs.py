"""One logger for the stages: the Prefect run logger inside a run (so lines reach the UI), a plain one outside."""
from __future__ import annotations

import logging

from prefect.exceptions import MissingContextError
from prefect.logging import get_logger, get_run_logger


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("transfer_flow")
