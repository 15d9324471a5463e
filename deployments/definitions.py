"""Every deployment of transfer-flow, declared in one place: which flow, which schedule or trigger, which defaults.

| deployment                     | runs                          | when                                               |
|--------------------------------|-------------------------------|----------------------------------------------------|
| `train-and-promote/retrain`    | pipeline + champion/challenger | cron (nightly, 02:00 local time, by default)       |
| `train-and-promote/on-dataset` | pipeline + champion/challenger | event `transfer-flow.dataset.arrived`          |
| `transfer-learning/on-demand`  | the plain pipeline            | from the UI's run form (typed, with descriptions)   |
| `scan-inbox/poll-inbox`        | one scan of the inbox         | every N seconds, only with an inbox configured      |

`transfer-flow serve` builds these with `build_deployments(ServeOptions(...))` and serves them;
`deployments/prefect.yaml` declares the same for work-pool users (`prefect deploy`).
"""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator

from transfer_flow.storage.errors import SettingsError
from transfer_flow.storage.registry import Metric
from transfer_flow.tasks.inbox import DATASET_ARRIVED, RESOURCE_PREFIX, Readiness

NIGHTLY = "0 2 * * *"
TAGS = ["transfer-flow"]
# PipelineSettings fields a deployment sets itself: every other field is a default `serve` passes on.
# The dataset and output are per deployment; unattended runs always wait (UNATTENDED) and never overwrite
# what is not their own.
SERVE_EXCLUDED = frozenset({"dataset", "output", "overwrite", "wait"})
# Scheduled and triggered runs queue behind a run writing the same output folder instead of failing.
UNATTENDED = {"wait": True}


def default_home() -> Path:
    """Where transfer-flow keeps its server database, registry and run folders.

    $TRANSFER_FLOW_HOME, else ~/.transfer-flow."""
    return Path(os.environ.get("TRANSFER_FLOW_HOME") or Path.home() / ".transfer-flow").expanduser().resolve()


def local_timezone() -> str:
    """The machine's IANA time zone (so "nightly" means the user's night), UTC when it cannot be told."""
    try:
        import tzlocal

        return tzlocal.get_localzone_name() or "UTC"
    except Exception:  # tzlocal missing or the zone unnamed
        return "UTC"


class ServeOptions(BaseModel):
    """What `transfer-flow serve` registers; every path is made absolute (runs execute in other processes)."""

    home: str = Field(default_factory=lambda: str(default_home()))
    registry: str | None = Field(default=None, description="Model registry folder (default HOME/registry).")
    runs: str | None = Field(default=None, description="Folder of run outputs (default HOME/runs).")
    dataset: str | None = Field(
        default=None, description="Dataset the scheduled retrain reads; without it the schedule is registered paused."
    )
    cron: str = NIGHTLY
    timezone: str = Field(default_factory=local_timezone)
    metric: Metric = "macro_f1"
    margin: float = Field(default=0.0, ge=0.0, le=1.0)
    pipeline: dict[str, Any] = Field(
        default_factory=dict, description="PipelineSettings defaults (backbone, weights...)."
    )
    inbox: str | None = Field(default=None, description="Inbox folder scanned by the poll-inbox deployment.")
    poll_seconds: float = Field(default=60.0, gt=0)
    ready: Readiness = "marker"
    quiet_seconds: float = Field(default=60.0, ge=0)

    @field_validator("home", "registry", "runs", "dataset", "inbox")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return None if value is None else str(Path(value).expanduser().resolve())

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        from prefect._internal.schemas.validators import validate_cron_string

        return validate_cron_string(value)

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, value: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"Expected an IANA time zone such as Europe/Paris or UTC, got {value!r}") from None
        return value

    @field_validator("pipeline")
    @classmethod
    def _known_pipeline_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        from transfer_flow.flows.settings import PipelineSettings

        allowed = set(PipelineSettings.model_fields) - SERVE_EXCLUDED
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ValueError(f"Expected pipeline defaults among {', '.join(sorted(allowed))}, got {', '.join(unknown)}")
        return value

    @property
    def registry_dir(self) -> str:
        return self.registry or str(Path(self.home) / "registry")

    @property
    def runs_dir(self) -> str:
        return self.runs or str(Path(self.home) / "runs")

    def registry_parameters(self) -> dict[str, Any]:
        return {"registry": self.registry_dir, "metric": self.metric, "margin": self.margin}

    def pipeline_defaults(self) -> dict[str, Any]:
        """The typed pipeline defaults, checked against PipelineSettings now rather than at 2 a.m."""
        from transfer_flow.flows.settings import PipelineSettings

        checked = PipelineSettings.model_validate({"dataset": ".", "output": ".", **self.pipeline})
        return checked.model_dump(mode="json", exclude=set(SERVE_EXCLUDED))


def retrain_deployment(options: ServeOptions):
    """Nightly (by default) retraining on the configured dataset, with champion/challenger promotion."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from transfer_flow.flows.retrain import train_and_promote

    settings: dict[str, Any] = {**options.pipeline_defaults(), **UNATTENDED,
                                "output": str(Path(options.runs_dir) / "retrain")}
    if options.dataset:
        settings["dataset"] = options.dataset
    description = (f"Retrain on {options.dataset} and promote the new model if it scores at least as well "
                   f"({options.metric}, margin {options.margin:g}); registry {options.registry_dir}."
                   if options.dataset else
                   "No dataset configured: the schedule is paused. Serve with --dataset DIR, or run it from "
                   "the UI with a dataset in the form.")
    return train_and_promote.to_deployment(
        name="retrain",
        schedules=[Cron(options.cron, timezone=options.timezone, active=options.dataset is not None)],
        parameters={"settings": settings, "registry": options.registry_parameters()},
        description=description, tags=TAGS, entrypoint_type=EntrypointType.MODULE_PATH,
    )


def on_dataset_parameters(options: ServeOptions) -> dict[str, Any]:
    """Run parameters templated from the event: the dataset is the payload's path; outputs go to RUNS/<name>."""
    settings = {**options.pipeline_defaults(), **UNATTENDED, "dataset": "{{ event.payload.path }}",
                "output": str(Path(options.runs_dir)) + "/{{ event.payload.name }}"}
    return {"settings": settings, "registry": options.registry_parameters()}


def on_dataset_deployment(options: ServeOptions):
    """Train and promote whenever a `transfer-flow.dataset.arrived` event names a dataset folder."""
    from prefect.deployments.runner import EntrypointType
    from prefect.events import DeploymentEventTrigger

    from transfer_flow.flows.retrain import train_and_promote

    trigger = DeploymentEventTrigger(
        name="on-dataset: dataset arrived",
        description=f"Runs train-and-promote on the folder named by each {DATASET_ARRIVED} event.",
        expect={DATASET_ARRIVED},
        match={"prefect.resource.id": f"{RESOURCE_PREFIX}*"},
        parameters=on_dataset_parameters(options),
    )
    return train_and_promote.to_deployment(
        name="on-dataset",
        triggers=[trigger],
        parameters={
            "settings": {**options.pipeline_defaults(), **UNATTENDED},
            "registry": options.registry_parameters(),
        },
        description=f"Triggered by {DATASET_ARRIVED} (sent by `transfer-flow watch`, the poll-inbox deployment or "
        f"any script); outputs in {options.runs_dir}/<dataset name>.",
        tags=TAGS,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def on_demand_deployment(options: ServeOptions):
    """The plain pipeline, run from the UI: the form is built from PipelineSettings (descriptions, enums, defaults)."""
    from prefect.deployments.runner import EntrypointType

    from transfer_flow.flows.pipeline import transfer_learning

    return transfer_learning.to_deployment(
        name="on-demand",
        parameters={"settings": options.pipeline_defaults()},
        description="Run the pipeline on any dataset folder: fill in dataset and output (absolute paths, "
                    "as seen by the machine running `transfer-flow serve`).",
        tags=TAGS, entrypoint_type=EntrypointType.MODULE_PATH,
    )


def poll_inbox_deployment(options: ServeOptions):
    """For users who cannot keep `transfer-flow watch` running: scan the inbox on a schedule."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Interval

    from transfer_flow.flows.inbox import scan_inbox

    if options.inbox is None:
        raise SettingsError("The poll-inbox deployment needs an inbox folder (--inbox DIR)")
    return scan_inbox.to_deployment(
        name="poll-inbox",
        schedules=[Interval(dt.timedelta(seconds=options.poll_seconds))],
        parameters={"inbox": options.inbox, "ready": options.ready, "quiet_seconds": options.quiet_seconds},
        description=f"Announce datasets that arrived in {options.inbox} "
        "(the on-dataset deployment then trains on them).",
        tags=TAGS,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def build_deployments(options: ServeOptions) -> list:
    """Every deployment `transfer-flow serve` registers, in the order they are listed."""
    deployments = [retrain_deployment(options), on_dataset_deployment(options), on_demand_deployment(options)]
    if options.inbox is not None:
        deployments.append(poll_inbox_deployment(options))
    return deployments
