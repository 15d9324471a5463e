"""run.json: what one pipeline run did, for people and for scripts."""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from transfer_flow.storage.atomic import write_text


class SkippedImageRecord(BaseModel):
    path: str
    reason: str


class StageSeconds(BaseModel):
    list: float = Field(description="Listing, hashing and splitting.")
    extract: float
    train: float
    evaluate: float = Field(description="Evaluation and report.")
    total: float


class StageCached(BaseModel):
    extract: bool
    train: bool
    report: bool


class RunSummary(BaseModel):
    dataset: str
    store: str = Field(description="Path of the feature store.")
    model: str
    report: str
    images_listed: int = Field(description="= images_extracted + images_reused + len(images_skipped)")
    images_extracted: int = Field(description="Images decoded and run through the backbone by this run.")
    images_reused: int = Field(description="Rows reused from an earlier run with the same extraction settings.")
    images_skipped: list[SkippedImageRecord]
    images_ignored: int = Field(
        description="Files under the dataset that are not listed images (hidden, non-image, top-level...)."
    )
    ignored_by_reason: dict[str, int]
    dropped_classes: list[str]
    classes: list[str]
    backbone: str
    weights_source: str
    precision: str
    runtime: str = Field(description="What ran the backbone: tensorflow, openvino.")
    image_size: int
    pooling: str
    accuracy: float
    macro_f1: float
    images_hashed: int = Field(description="Files whose bytes were read to hash them (the others were unchanged).")
    cached: StageCached = Field(description="Per stage: was its output reused rather than recomputed?")
    seconds: StageSeconds

    def save(self, target: Path) -> Path:
        return write_text(Path(target), self.model_dump_json(indent=2) + "\n")
