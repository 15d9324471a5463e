"""The images an int8 model is calibrated on: a few hundred training images of the dataset, never test or val.

Chosen by content hash (the smallest ones), so the same training images give the same set whatever their
names or order, and identified by those hashes: the identity is part of the extraction key and of the
compiled model's cache key.
"""
from __future__ import annotations

from pydantic import BaseModel, Field

from transfer_flow.storage.content_keys import content_key
from transfer_flow.storage.errors import DatasetError
from transfer_flow.storage.manifest import Manifest

CALIBRATION_IMAGES = 300  # NNCF's default subset size; more moved neither accuracy nor speed measurably
MIN_CALIBRATION_IMAGES = 8


class CalibrationImages(BaseModel):
    root: str = Field(description="The dataset folder the paths are relative to.")
    paths: list[str]
    hashes: list[str] = Field(description="Content hashes of `paths`, in the same order.")

    def identity(self) -> str:
        return "calibration-" + content_key("int8 calibration", self.hashes)


def calibration_images(manifest: Manifest, count: int = CALIBRATION_IMAGES) -> CalibrationImages:
    """Up to `count` distinct training images, smallest content hash first."""
    train: dict[str, str] = {}
    for record in manifest.records:
        if record.split == "train" and record.content_hash:
            train.setdefault(record.content_hash, record.path)
    if len(train) < MIN_CALIBRATION_IMAGES:
        raise DatasetError(f"--precision int8 calibrates on training images: expected at least "
                           f"{MIN_CALIBRATION_IMAGES}, the dataset has {len(train)}")
    hashes = sorted(train)[:count]
    return CalibrationImages(root=manifest.root, paths=[train[h] for h in hashes], hashes=hashes)
