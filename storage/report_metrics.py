"""What an evaluation's report says, as one typed record: written as report/metrics.json, read back by the
report pages, the run summary and the registry. The JSON keys are the fields, in this order."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

METRICS_FILE = "metrics.json"


class GalleryImage(BaseModel):
    """A test image shown in the report, with where the network looked for its predicted class."""

    path: str = Field(description="Relative to the dataset root.")
    true: str
    predicted: str
    confidence: float = Field(description="The head's score for the predicted class.")
    heatmap: str | None = Field(
        default=None, description="PNG under report/ (a path relative to it): the class-activation heatmap of the "
        "predicted class over the image as the network saw it; None when the image cannot be read now.",
    )


class Misclassified(GalleryImage):
    """A test image the head labelled wrongly."""


class TrainingScore(BaseModel):
    name: str = Field(description="What the head was selected by (cv accuracy, validation accuracy...).")
    value: float


class Baselines(BaseModel):
    """The same split scored without the CNN features: what the headline must beat."""

    majority: float = Field(description="Accuracy of always answering the most frequent training class.")
    raw_pixels: float | None = Field(
        default=None,
        description="Logistic regression (the same C grid, cross-validated) on the images downsampled to 16x16 "
        "RGB; None when the images cannot be read now.",
    )


class ReportMetrics(BaseModel):
    accuracy: float
    macro_f1: float
    n_train: int
    n_test: int
    accuracy_ci: tuple[float, float] | None = Field(
        default=None, description="95% Wilson score interval of the accuracy over the test images."
    )
    baselines: Baselines | None = None
    best_params: dict[str, Any] = Field(default_factory=dict)
    head: str
    backbone: str
    weights_source: str = Field(description="For people: the weights' source and file.")
    image_size: int
    pooling: str
    precision: str
    feature_dim: int
    feature_dtype: str = "float32"
    store: str
    class_names: list[str]
    per_class: dict[str, dict[str, float]] = Field(description="precision, recall, f1-score, support per class.")
    confusion: list[list[int]]
    training_score: TrainingScore | None = None
    n_misclassified: int = 0
    misclassified: list[Misclassified] = Field(default_factory=list, description="The most confident first.")
    correct_examples: list[GalleryImage] = Field(
        default_factory=list, description="A few correctly labelled test images per class, the most confident first, "
        "shown with their heatmaps beside the mistakes.",
    )
    heatmap_method: str | None = Field(
        default=None, description="cam (exact, linear heads on avg-pooled or flattened features) or grad-cam.",
    )
    stage_key: str = Field(default="", description="Cache key of the evaluation that wrote the report.")


def metrics_json(metrics: ReportMetrics) -> str:
    return metrics.model_dump_json(indent=2) + "\n"


def read_metrics(report_dir: Path) -> ReportMetrics:
    """The metrics of the report in `report_dir` (ValueError if malformed, OSError if missing)."""
    return ReportMetrics.model_validate_json((Path(report_dir) / METRICS_FILE).read_text(encoding="utf-8"))
