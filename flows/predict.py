"""Batch prediction, wiring only: bundle + image paths → labelled rows → CSV."""
from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, Field

from transfer_flow.flows.run_names import prediction_run_name
from transfer_flow.flows.settings import PredictionSettings
from transfer_flow.tasks import stages
from transfer_flow.tasks.prediction import PredictionRow


class PredictionSummary(BaseModel):
    bundle: str
    output: str | None
    images: int
    failed: int
    top_k: int = Field(description="Labels per row: the top_k asked for, at most the bundle's number of classes.")
    rows: list[PredictionRow]


@flow(name="batch-prediction", log_prints=True, flow_run_name=prediction_run_name)
def batch_prediction(settings: PredictionSettings) -> PredictionSummary:
    """Label image files and folders with a trained bundle, through the decode/extract path it was trained with."""
    stages.free_predictions_output(settings.output, settings.overwrite)  # refuse before any work
    bundle = stages.prediction_bundle(settings.bundle)
    top_k = min(settings.top_k, len(bundle.metadata.class_names))  # no empty label_K columns past the last class
    images = stages.listed_images(settings.paths)
    rows = stages.predictions(bundle, images, top_k, settings.batch_size)
    if settings.output:
        stages.predictions_csv(rows, settings.output, top_k, settings.overwrite)
    return PredictionSummary(bundle=bundle.path, output=settings.output, images=len(rows),
                             failed=sum(1 for r in rows if r.error), top_k=top_k, rows=rows)
