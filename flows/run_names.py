"""Flow run names that say what a run is about: its dataset, its head, and what started it.

`colours · logreg · local` (the CLI or Python), `colours · linear-svm · scheduled` (the cron),
`paints · logreg · dataset arrived` (the event trigger), `colours · dense · on-demand` (the UI form),
`pets · predict · local` (labelling with the bundle of run `pets`), instead of Prefect's random two words,
so the Runs list reads as a history of the datasets and heads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

SEPARATOR = " · "
EVENT_DEPLOYMENTS = {"on-dataset": "dataset arrived"}


def _field(settings: Any, name: str, default: Any = None) -> Any:
    # Parameters arrive validated (a CLI or Python call) or as the JSON a deployment stored.
    return settings.get(name, default) if isinstance(settings, dict) else getattr(settings, name, default)


def _trigger() -> str:
    from prefect.context import FlowRunContext
    from prefect.runtime import deployment

    context = FlowRunContext.get()
    run = context.flow_run if context else None
    if run is not None and run.parent_task_run_id is not None:
        return "subflow"  # its parent run's name says what started it
    name = deployment.name
    if name is None:
        return "local"
    if run is not None and run.auto_scheduled:
        return "scheduled"
    return EVENT_DEPLOYMENTS.get(name, name)


def training_run_name() -> str:
    """For flows with a `settings` parameter (PipelineSettings or CompareSettings)."""
    from prefect.runtime import flow_run

    settings = flow_run.parameters.get("settings", {})
    dataset = Path(str(_field(settings, "dataset", "") or "?")).name
    heads = _field(settings, "heads") or [_field(settings, "head", "logreg")]
    return SEPARATOR.join([dataset, "+".join(heads), _trigger()])


def inbox_run_name() -> str:
    from prefect.runtime import flow_run

    return SEPARATOR.join([Path(str(flow_run.parameters.get("inbox", "?"))).name, _trigger()])


def _bundle_run_name(verb: str) -> str:
    from prefect.runtime import flow_run

    settings = flow_run.parameters.get("settings", {})
    bundle = Path(str(_field(settings, "bundle", "") or "?")).resolve()
    run = bundle.parent.name if bundle.name == "model" else bundle.name  # DIR/model: the run DIR names it
    return SEPARATOR.join([run, verb, _trigger()])


def prediction_run_name() -> str:
    return _bundle_run_name("predict")


def explanation_run_name() -> str:
    return _bundle_run_name("explain")
