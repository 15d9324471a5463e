"""What a command can check without a Prefect server, checked before one starts.

A wrong path, an output folder of another dataset, a missing weights file or an existing CSV then costs
nothing and is said once (inside a flow it is a task error, a flow error and the final line). The flows
check the same again, for runs started from a deployment.
"""
from __future__ import annotations

from pathlib import Path

from transfer_flow.flows.settings import ExplainSettings, PipelineSettings, PredictionSettings
from transfer_flow.storage.explanations import refuse_existing_explanations
from transfer_flow.storage.output_layout import OutputLayout
from transfer_flow.storage.predictions import refuse_existing_predictions
from transfer_flow.tasks.backbones import BACKBONES, resolve_weights
from transfer_flow.tasks.prediction import find_bundle


def check_pipeline(settings: PipelineSettings) -> None:
    resolve_weights(BACKBONES[settings.backbone], settings.weights)
    OutputLayout(root=settings.output, store_format=settings.store).claim(settings.dataset,
                                                                         overwrite=settings.overwrite)


def check_prediction(settings: PredictionSettings) -> None:
    if settings.output:
        refuse_existing_predictions(Path(settings.output), overwrite=settings.overwrite)
    find_bundle(settings.bundle)


def check_explanation(settings: ExplainSettings) -> None:
    refuse_existing_explanations(Path(settings.output), overwrite=settings.overwrite)
    find_bundle(settings.bundle)
