"""The pipeline's parameters: one typed model, so the CLI, Python callers and the Prefect UI form agree."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from transfer_flow.storage.export import ExportFormat
from transfer_flow.storage.feature_store.formats import DEFAULT_STORE_FORMAT, StoreFormatName
from transfer_flow.tasks.extraction import ExtractionSettings
from transfer_flow.tasks.heads import HEADS, HeadName, heads_help
from transfer_flow.tasks.training import TrainingSettings

RefreshStage = Literal["hash", "extract", "train", "report", "all"]


class PipelineSettings(ExtractionSettings):
    """Settings of one run: dataset in, feature store + model + report out.

    The extraction fields (backbone ... feature_dtype) are ExtractionSettings'; CLI flags, `serve`'s
    deployment parameters and the Prefect UI form are all derived from this model (flows/options.py)."""

    dataset: str = Field(description="Folder with one sub-folder per class (train/ and test/ honoured when present).")
    output: str = Field(description="Folder for the feature store, manifest.json, model/, report/ and run.json.")
    head: HeadName = Field(
        default="logreg",
        description=f"Classifier on the features: {heads_help()}.",
    )
    # The training fields a user tunes, declared once on TrainingSettings.
    epochs: int | None = TrainingSettings.model_fields["epochs"]
    learning_rate: float | None = TrainingSettings.model_fields["learning_rate"]
    unfreeze: int | None = TrainingSettings.model_fields["unfreeze"]
    flip: bool = TrainingSettings.model_fields["flip"]
    store: StoreFormatName = Field(
        default=DEFAULT_STORE_FORMAT,
        description="Feature store format: HDF5 (classic layout, one file) "
        "or zarr (a folder; parallel writes, dask/xarray).",
    )
    test_size: float = Field(
        default=0.25,
        gt=0,
        lt=1,
        description="Fraction of each class held out for evaluation (ignored with train/ and test/ folders).",
    )
    seed: int = Field(default=42, description="Seed of the shuffle, the split, cross-validation and augmented views.")
    overwrite: bool = Field(
        default=False, description="Replace outputs in the folder that are not an earlier run on this dataset."
    )
    refresh: list[RefreshStage] = Field(
        default_factory=list, description="Stages to recompute even when their cache is valid."
    )
    wait: bool = Field(
        default=False, description="If another run is writing to the output folder, wait for it instead of failing."
    )
    workers: int = Field(
        default=0,
        ge=0,
        description="Extract on a local Dask cluster of this many worker processes; "
        "0: in the flow's process (fastest on one small machine).",
    )
    dask_address: str | None = Field(
        default=None,
        description="Extract on an existing Dask cluster (tcp://host:8786); workers need transfer-flow "
        "installed and the dataset and output paths visible.",
    )
    shard_images: int = Field(
        default=512, ge=1, description="Images per shard: the unit of Dask work and of resumption after a crash."
    )

    def distributed(self) -> bool:
        return self.workers > 0 or self.dask_address is not None

    def refreshes(self, stage: str) -> bool:
        return stage in self.refresh or "all" in self.refresh

    @field_validator("dataset")
    @classmethod
    def _dataset_is_a_folder(cls, value: str) -> str:
        # Checked here so a wrong path fails at once, before a Prefect run or server is started.
        if not Path(value).is_dir():
            raise ValueError(f"dataset folder {value} does not exist or is not a folder")
        return value

    @model_validator(mode="after")
    def _heads_get_the_pooling_they_need(self):
        for head in getattr(self, "heads", None) or [self.head]:
            needed = HEADS[head].needs_pooling
            if needed is not None and self.pooling != needed:
                # Checked here so the mistake costs nothing: no extraction runs with the wrong pooling.
                raise ValueError(f"the {head} head needs --pooling {needed} ({HEADS[head].description}), "
                                 f"got --pooling {self.pooling}")
        return self

    def extraction(self) -> ExtractionSettings:
        return ExtractionSettings.model_validate(self.model_dump(include=set(ExtractionSettings.model_fields)))

    def training(self, head: HeadName | None = None) -> TrainingSettings:
        return TrainingSettings(head=head or self.head, seed=self.seed, epochs=self.epochs,
                                learning_rate=self.learning_rate, unfreeze=self.unfreeze, flip=self.flip)


class CompareSettings(PipelineSettings):
    """A pipeline run that trains several heads on one feature store (extracted once)."""

    heads: list[HeadName] = Field(default_factory=lambda: ["logreg", "linear-svm", "dense"], min_length=1,
                                  description="Heads to train and compare, in table order.")

    @field_validator("heads")
    @classmethod
    def _heads_once_each(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"Expected each head once, got {', '.join(value)}")
        return value


class ExportSettings(BaseModel):
    """Settings of one export: a run's feature store out to the formats embedding tools read."""

    source: str = Field(description="A run's output folder, or a feature store (features.h5, features.zarr).")
    format: ExportFormat = Field(
        default="parquet",
        description="parquet: one row per image with a fixed-size-list features column; npy: embeddings/*.npy "
        "shards beside metadata/*.parquet (clip-retrieval's layout).",
    )
    output: str | None = Field(default=None, description="Folder to write; empty: SOURCE/export-FORMAT.")
    store: StoreFormatName | None = Field(default=None, description="Which store, where SOURCE holds both.")
    shard_rows: int = Field(default=100_000, ge=1, description="Rows per parquet/npy shard.")
    overwrite: bool = Field(default=False, description="Replace an existing export folder.")


class PredictionSettings(BaseModel):
    """Settings of one batch prediction: a trained bundle and images in, one labelled row per image out."""

    bundle: str = Field(description="A model bundle folder (DIR/model of a run), or the run's output folder.")
    paths: list[str] = Field(min_length=1, description="Image files and folders (recursed) to label.")
    output: str | None = Field(
        default=None, description="CSV to write; empty: the rows are only returned (the CLI prints them)."
    )
    top_k: int = Field(default=3, ge=1, description="Labels per image, best first: label, label_2 … label_K.")
    batch_size: int = Field(default=32, ge=1, le=4096, description="Images per inference call.")
    overwrite: bool = Field(default=False, description="Replace an existing output CSV.")


class ExplainSettings(BaseModel):
    """Settings of one explanation: a trained bundle and images in, a heatmap overlay per image out."""

    bundle: str = Field(description="A model bundle folder (DIR/model of a run), or the run's output folder.")
    paths: list[str] = Field(min_length=1, description="Image files and folders (recursed) to explain.")
    output: str = Field(description="Folder to write: one heatmap overlay PNG per image and explanations.csv.")
    batch_size: int = Field(default=16, ge=1, le=1024, description="Images per forward (and backward) pass.")
    overwrite: bool = Field(default=False, description="Replace an existing, non-empty output folder.")
