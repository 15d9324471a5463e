"""The embedded demo dataset: scikit-learn's 1,797 real handwritten digits (UCI), written as PNG class folders.

Nothing is downloaded: the digits ship inside scikit-learn.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from transfer_flow.storage.atomic import atomic_path

DIGITS_SIDE = 64  # the 8×8 originals upscaled (nearest) so that CNN inputs are not mostly interpolation


def write_digits_dataset(target: Path) -> Path:
    """Write the digits to `target/<digit>/digit_NNNN.png` unless a complete copy is already there."""
    from sklearn.datasets import load_digits

    target = Path(target)
    digits = load_digits()
    if target.is_dir() and sum(1 for _ in target.glob("*/*.png")) == len(digits.images):
        return target
    with atomic_path(target, overwrite=True, is_dir=True) as tmp:
        for i, (image, label) in enumerate(zip(digits.images, digits.target)):
            folder = tmp / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (image * (255 / 16)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").resize((DIGITS_SIDE, DIGITS_SIDE), Image.NEAREST).save(
                folder / f"digit_{i:04d}.png"
            )
    return target
