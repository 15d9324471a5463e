"""Augmented views of a decoded training image: a random flip, rotation, zoom and shift, the same every time.

View `v` of an image is fixed by (its content hash, v, seed): a rerun, a resumed run or a grown dataset
makes exactly the same pixels, so a view's feature row is cached and reused like the image's own row.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field


class AugmentRecipe(BaseModel, frozen=True):
    """The random transforms of a view (Keras' RandomFlip, RandomRotation, RandomZoom, RandomTranslation)."""

    flip: bool = Field(default=True, description="Mirror left-right with probability 1/2.")
    rotation_degrees: float = Field(default=15.0, description="Rotate by up to this many degrees either way.")
    zoom: float = Field(default=0.1, description="Scale by a factor in 1 ± zoom.")
    shift: float = Field(default=0.1, description="Shift by up to this fraction of the side, on each axis.")
    version: int = Field(default=1, description="Bump when the same parameters would give other pixels.")

    def describe(self, seed: int) -> str:
        """Recorded with the store and in the extraction key: what decides the pixels of a view."""
        return (f"flip={self.flip} rotation={self.rotation_degrees}deg zoom={self.zoom} shift={self.shift} "
                f"fill=edge-median v{self.version} seed={seed}")


AUGMENT_RECIPE = AugmentRecipe()


def view_rng(content_hash: str, view: int, seed: int) -> np.random.Generator:
    digest = hashlib.blake2b(f"{seed}:{content_hash}:{view}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "big"))


def augmented_view(image: np.ndarray, content_hash: str, view: int, seed: int,
                   recipe: AugmentRecipe = AUGMENT_RECIPE) -> np.ndarray:
    """View `view` (>= 1) of a decoded uint8 (height, width, 3) image, same shape; view 0 is the image itself."""
    if view == 0:
        return image
    rng = view_rng(content_hash, view, seed)
    flip = recipe.flip and rng.random() < 0.5
    angle = math.radians(rng.uniform(-recipe.rotation_degrees, recipe.rotation_degrees))
    scale = rng.uniform(1 - recipe.zoom, 1 + recipe.zoom)
    height, width = image.shape[:2]
    dx, dy = rng.uniform(-recipe.shift, recipe.shift, size=2) * (width, height)
    # PIL's affine maps output to input pixels: the inverse of "rotate and scale about the centre, then shift".
    cx, cy = width / 2, height / 2
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    ox, oy = cx + dx, cy + dy
    inverse = (cos, sin, cx - cos * ox - sin * oy, -sin, cos, cy + sin * ox - cos * oy)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    fill = tuple(int(c) for c in np.median(border, axis=0))  # the background, whatever its colour
    picture = Image.fromarray(image)
    if flip:
        picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    picture = picture.transform((width, height), Image.Transform.AFFINE, inverse, Image.Resampling.BILINEAR,
                                fillcolor=fill)
    return np.asarray(picture)
