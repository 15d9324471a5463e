"""Helpers shared by test modules (fixtures live in conftest.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_colour_images(folder: Path, colour: tuple[int, int, int], count: int, seed: int, size: int = 40) -> None:
    """`count` noisy images of one colour, alternating JPEG and PNG."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        noise = rng.integers(-25, 26, size=(size, size, 3))
        pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:03d}.{'png' if i % 2 else 'jpg'}")
