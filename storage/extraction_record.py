"""How a store's features were made, as one typed record: written to store attributes and to bundle.json by
`record_attrs`, read back from either by `read_record`, and nowhere else.

Training copies it from the store into the bundle, evaluation checks a bundle against a store with it,
prediction rebuilds the extractor from it. On disk it is flat scalars (readable with h5dump or a zarr
listing): the backbone's name, the weights' source and file, image size, pooling, compute precision,
preprocessing, resize, stored feature dtype, the augmented views of each training image (how many,
by which recipe and seed), the runtime that ran the backbone and, for int8, the calibration set's identity.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field


class WeightsRecord(BaseModel):
    """Which weights a backbone got, and from where."""

    source: str = Field(description="random, path, keras-cache, offline-package or download.")
    file: str | None = Field(default=None, description="The weights file loaded; None for random init.")

    def describe(self) -> str:
        """For people (logs, the registry's entries); never parsed back."""
        return self.source if self.file is None else f"{self.source}: {self.file}"


FeatureDtype = Literal["float32", "float16"]  # float16 halves the bytes; reads come back as float32 either way


class ExtractionRecord(BaseModel):
    """Everything that decides what a feature row means, as recorded with the rows."""

    backbone: str
    weights: WeightsRecord
    image_size: int
    pooling: str
    precision: str
    preprocessing: str
    resize: str = Field(default="", description="How images were resized (empty when not recorded).")
    feature_dtype: FeatureDtype = Field(default="float32", description="How the features are stored (float16 rounds).")
    augment: int = Field(default=0, description="Augmented views stored per training image (0: none).")
    augment_recipe: str = Field(default="", description="How a view is made, with its seed (empty: no views).")
    runtime: str = Field(default="tensorflow", description="What ran the backbone (before runtimes: TensorFlow).")
    calibration: str = Field(default="", description="Identity of the int8 calibration images (empty: not int8).")


_SCALARS = ("backbone", "image_size", "pooling", "precision", "preprocessing", "resize", "feature_dtype", "augment",
            "augment_recipe", "runtime", "calibration")


def record_attrs(record: ExtractionRecord) -> dict[str, str | int]:
    """The record as flat attributes (the weights as `weights_source` and `weights_file`)."""
    return {**{name: getattr(record, name) for name in _SCALARS},
            "weights_source": record.weights.source, "weights_file": record.weights.file or ""}


def read_record(attrs: Mapping[str, Any]) -> ExtractionRecord:
    """The record from flat attributes as `record_attrs` writes them, or as the previous version wrote them
    (no `weights_file`: the weights as one "source: file" text). Raises ValueError when incomplete."""
    if "weights_file" in attrs:
        weights = WeightsRecord(source=attrs["weights_source"], file=attrs["weights_file"] or None)
    else:  # the previous layout, read once here
        source, _, file = str(attrs.get("weights_source", "")).partition(": ")
        weights = WeightsRecord(source=source, file=file or None)
    if not weights.source:
        raise ValueError("the extraction record names no weights source (weights_source)")
    return ExtractionRecord.model_validate({**{k: attrs[k] for k in _SCALARS if k in attrs}, "weights": weights})
