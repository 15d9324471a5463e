"""Standardising CNN features without blowing up the near-constant ones.

A pretrained backbone on a small or unusual dataset leaves many features (about half of Lite0's 1,280
on the digits) constant or nearly so on the training rows: ReLU units that almost never fire. Plain
standardisation divides them by a standard deviation of ~1e-7 to ~1e-3, so a test image on which such
a unit fires gets z-scores of 1e3 to 1e5 and swamps every other feature. Flooring the deviation at a
typical column's keeps the informative columns standardised and bounds what a rare activation can do.
"""
from __future__ import annotations

import numpy as np

# The floor, as a multiple of the median deviation of the columns that vary at all. 3 measured best on
# Lite0 digits features for the dense and sgd heads (BENCHMARKS.md); much lower lets rare units dominate.
FLOOR_OF_MEDIAN = 3.0


def floored_std(std: np.ndarray) -> np.ndarray:
    """Each column's standard deviation, floored at FLOOR_OF_MEDIAN × the median of the varying columns'."""
    std = np.asarray(std, dtype=np.float64)
    varying = std[std > 1e-6 * max(float(std.max()), 1e-30)]
    floor = FLOOR_OF_MEDIAN * float(np.median(varying)) if varying.size else 1.0
    return np.maximum(std, floor)
