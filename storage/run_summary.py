"""run.json: what one pipeline run did, for people and for scripts."""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from storage.atomic import write_text


class SkippedImageRecord(BaseModel):
    path: str
    reason: str


class StageSeconds(BaseModel):
    list: float
    extract: float
    train: float
    evaluate: float
    total: float


class RunSummary(BaseModel):
    dataset: str
    store: str = Field(description="Path of the feature store.")
    model: str
    report: str
    images_listed: int
    images_extracted: int
    images_skipped: list[SkippedImageRecord]
    images_ignored: int = Field(description="Files under the dataset that are not listed images (hidden, non-image, top-level...).")
    ignored_by_reason: dict[str, int]
    dropped_classes: list[str]
    classes: list[str]
    backbone: str
    weights_source: str
    precision: str
    image_size: int
    pooling: str
    accuracy: float
    macro_f1: float
    seconds: StageSeconds

    def save(self, target: Path) -> Path:
        return write_text(Path(target), self.model_dump_json(indent=2) + "\n")
