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
from transfer_flow.tasks.extraction import FeatureExtractor
from transfer_flow.tasks.heads import HEADS
from transfer_flow.tasks.heatmaps import explanation_imports
from transfer_flow.tasks.prediction import bundle_runtime, find_bundle
from transfer_flow.tasks.runtimes import get_runtime


def check_pipeline(settings: PipelineSettings) -> tuple[str, ...]:
    """Returns, as every check here, what the command's tasks import to build the backbone (to import ahead), with
    Keras' backend chosen for them: the runtime is loaded first, as resolving the weights may build a model. Nothing
    when no Keras model will be built: a backbone its runtime has cached, under heads that are not Keras models."""
    runtime = get_runtime(settings.resolved_runtime())
    module = runtime.load()
    weights = resolve_weights(BACKBONES[settings.backbone], settings.weights)
    OutputLayout(root=settings.output, store_format=settings.store).claim(settings.dataset,
                                                                         overwrite=settings.overwrite)
    heads = getattr(settings, "heads", None) or [settings.head]
    has_cached_entry = getattr(module, "has_cached_entry", None)  # runtimes that keep converted models (OpenVINO)
    if (all(HEADS[head].head_format == "skops" for head in heads) and has_cached_entry is not None
            and settings.resolved_precision() != "int8"  # its key names the training images: known after the split
            and has_cached_entry(FeatureExtractor(settings, weights).forward_request())):
        return ()
    return runtime.imports


def check_prediction(settings: PredictionSettings) -> tuple[str, ...]:
    if settings.output:
        refuse_existing_predictions(Path(settings.output), overwrite=settings.overwrite)
    runtime = bundle_runtime(find_bundle(settings.bundle))
    runtime.load()
    return runtime.imports


def check_explanation(settings: ExplainSettings) -> tuple[str, ...]:
    refuse_existing_explanations(Path(settings.output), overwrite=settings.overwrite)
    return explanation_imports(find_bundle(settings.bundle))
