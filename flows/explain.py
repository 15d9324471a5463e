"""Heatmaps for any image, wiring only: bundle + image paths → one overlay PNG per image + explanations.csv."""
from __future__ import annotations

from prefect import flow
from pydantic import BaseModel

from transfer_flow.flows.run_names import explanation_run_name
from transfer_flow.flows.settings import ExplainSettings
from transfer_flow.tasks import stages
from transfer_flow.tasks.heatmaps import ExplanationRow


class ExplanationSummary(BaseModel):
    bundle: str
    output: str
    images: int
    failed: int
    rows: list[ExplanationRow]


@flow(name="explain-images", log_prints=True, flow_run_name=explanation_run_name)
def explain_with_heatmaps(settings: ExplainSettings) -> ExplanationSummary:
    """Draw where a trained bundle looked for the class it predicts on each image (exact CAM for linear heads
    on avg-pooled features, Grad-CAM otherwise), through the decode/extract path it was trained with."""
    stages.free_explanations_output(settings.output, settings.overwrite)  # refuse before any work
    bundle = stages.prediction_bundle(settings.bundle)
    images = stages.listed_images(settings.paths)
    rows = stages.explanations(bundle, images, settings.output, settings.batch_size, settings.overwrite)
    return ExplanationSummary(bundle=bundle.path, output=settings.output, images=len(rows),
                              failed=sum(1 for r in rows if r.error), rows=rows)
