"""What an evaluation's report says, as one typed record: written as report/metrics.json, read back by the
report pages, the run summary and the registry. The JSON keys are the fields, in this order."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from transfer_flow.storage.run_summary import SkippedImageRecord

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
    raw_pixels_test_images: int | None = Field(
        default=None, description="Test images the raw-pixel baseline was scored on (large test sets are sampled).")
    test_images: int | None = Field(default=None, description="Test images in the split.")


class SuspectLabel(BaseModel):
    """A training image whose given label the other images contradict (out-of-fold predictions)."""

    path: str = Field(description="Relative to the dataset root.")
    label: str = Field(description="The class it was given (its folder).")
    predicted: str = Field(description="The class the out-of-fold model prefers.")
    confidence: float = Field(description="Out-of-fold probability of the predicted class.")
    label_probability: float = Field(description="Out-of-fold probability of the given label.")


class NearDuplicate(BaseModel):
    """Two images whose features are nearly identical: a re-encoded, resized or lightly edited copy."""

    paths: list[str] = Field(description="The two images, relative to the dataset root.")
    similarity: float = Field(description="Cosine similarity of their features.")
    crosses_split: bool = Field(description="One is a test image, the other is not: the test score is optimistic.")


class FeatureMapSummary(BaseModel):
    """What report/feature_map.png shows."""

    file: str = "feature_map.png"
    method: str
    points: int = Field(description="Images drawn (every test image when they fit, a stratified sample of the rest).")
    rows: int = Field(description="Images in the store (view 0).")


# --- run context (dataset, split, counts, skipped images, Prefect run) ---------------------------------------


class ClassCounts(BaseModel):
    train: int = Field(description="Training images of the class (val/ included; augmented views not counted).")
    test: int


class RunContext(BaseModel):
    """Where the numbers come from: what a reader of the report needs to trust or reproduce them."""

    dataset: str = Field(description="The dataset folder, as given.")
    created: str = Field(description="When the report was written, ISO 8601 UTC.")
    version: str = Field(description="transfer-flow version.")
    seed: int
    split: str = Field(description="How train and test were chosen: train/ and test/ folders, or a random "
                       "stratified split with its test fraction.")
    class_counts: dict[str, ClassCounts]
    skipped: list[SkippedImageRecord] = Field(default_factory=list, description="Images that gave no row, why.")
    flow_run_id: str | None = Field(default=None, description="The Prefect flow run that wrote the report.")
    flow_run_url: str | None = Field(default=None, description="Its page in the Prefect UI, when a server is known.")


# --- end of run context ---------------------------------------------------------------------------------------


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
    runtime: str = Field(default="tensorflow", description="What ran the backbone (reports before runtimes: TF).")
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
    # Data checks (tasks/data_checks.py): the lists hold the first SUSPECTS_LISTED / NEAR_DUPLICATES_LISTED.
    suspect_labels: list[SuspectLabel] = Field(default_factory=list, description="The least likely label first.")
    n_suspect_labels: int = 0
    suspect_cutoff: float | None = Field(
        default=None, description="A suspect's given label has an out-of-fold probability below this."
    )
    near_duplicates: list[NearDuplicate] = Field(
        default_factory=list, description="Pairs crossing train/test first, then the most similar."
    )
    n_near_duplicates: int = 0
    n_near_duplicates_crossing: int = 0
    near_duplicate_similarity: float | None = Field(
        default=None, description="Near-duplicates' features have at least this cosine similarity."
    )
    feature_map: FeatureMapSummary | None = None
    context: RunContext | None = None
    average_precision: dict[str, float] = Field(
        default_factory=dict, description="Per class: area under its precision-recall curve on the test images.")
    stage_key: str = Field(default="", description="Cache key of the evaluation that wrote the report.")


def metrics_json(metrics: ReportMetrics) -> str:
    return metrics.model_dump_json(indent=2) + "\n"


def read_metrics(report_dir: Path) -> ReportMetrics:
    """The metrics of the report in `report_dir` (ValueError if malformed, OSError if missing)."""
    return ReportMetrics.model_validate_json((Path(report_dir) / METRICS_FILE).read_text(encoding="utf-8"))
