"""What every head's fit receives: the train (and val) rows of a store, readable all at once or in blocks, and
for a head that trains the backbone too (finetune), the images those rows came from."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfer_flow.storage.extraction_record import ExtractionRecord


@dataclass(frozen=True)
class TrainingImages:
    """Where each training row's image is and how its features were made (the backbone, its weights, image size,
    pooling and preprocessing), so a head can decode the images again the way extraction did. `paths` (relative to
    `root`) and `views` are aligned with HeadInputs.rows; view 0 is the image itself, 1..K its augmented views."""

    root: Path
    paths: list[str]
    views: np.ndarray
    extraction: ExtractionRecord


@dataclass(frozen=True)
class HeadInputs:
    """The rows a head trains on. `read(rows)` returns the features of those store rows; `rows`, `labels`
    and `is_val` are aligned (val rows come from a val/ folder). `map_shape` is the (height, width,
    channels) of an unpooled feature map, for heads that pool it themselves (None otherwise); `images`
    the rows' images, for heads that read them (HeadSpec.reads_images; None otherwise). `groups`, aligned
    with `rows`, names the image each row shows (its content hash): an image's augmented views share it, and
    cross-validation keeps a group in one fold (None: every row its own image)."""

    rows: np.ndarray
    labels: np.ndarray
    is_val: np.ndarray
    n_classes: int
    read: Callable[[np.ndarray], np.ndarray]
    block_rows: int
    map_shape: tuple[int, int, int] | None = None
    images: TrainingImages | None = None
    groups: np.ndarray | None = None

    def features(self) -> np.ndarray:
        """All the rows at once (the in-memory heads)."""
        return self.read(self.rows)
