"""What every head's fit receives: the train (and val) rows of a store, readable all at once or in blocks."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class HeadInputs:
    """The rows a head trains on. `read(rows)` returns the features of those store rows; `rows`, `labels`
    and `is_val` are aligned (val rows come from a val/ folder). `map_shape` is the (height, width,
    channels) of an unpooled feature map, for heads that pool it themselves (None otherwise)."""

    rows: np.ndarray
    labels: np.ndarray
    is_val: np.ndarray
    n_classes: int
    read: Callable[[np.ndarray], np.ndarray]
    block_rows: int
    map_shape: tuple[int, int, int] | None = None

    def features(self) -> np.ndarray:
        """All the rows at once (the in-memory heads)."""
        return self.read(self.rows)
