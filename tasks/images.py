"""Decode one image file to the network's input: an RGB uint8 array of the requested size.

This is the hot path of feature extraction and runs on a thread pool: it touches no global PIL state, and
every way a file can be broken ends as `UnreadableImageError` with a short reason, never another exception.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from transfer_flow.storage.errors import SettingsError, UnreadableImageError

# The transposition for each EXIF orientation, as in ImageOps.exif_transpose; applied here after the
# resize, where it costs a small fraction of transposing the full-size image.
_ORIENTATION_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATIONS_SWAPPING_AXES = frozenset({5, 6, 7, 8})
# As Image.thumbnail: decode JPEGs at a reduced scale that is still at least this factor above the
# target, and let resize shrink by whole factors first (box filter) until within this factor of it.
_REDUCING_GAP = 2.0
_WHITE = (255, 255, 255, 255)


def parse_image_size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) from a side length or a (height, width) pair."""
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if (
        isinstance(image_size, tuple)
        and len(image_size) == 2
        and all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in image_size)
    ):
        return image_size
    raise SettingsError(f"Expected image_size as a positive int or (height, width) pair, got {image_size!r}")


def decode_image(path: Path | str, image_size: int | tuple[int, int]) -> np.ndarray:
    """Decode the first frame of `path`, EXIF-oriented, resized to `image_size`, as uint8 (height, width, 3) RGB.

    The resize ignores the aspect ratio, as keras `load_img(target_size=...)` does.
    """
    height, width = parse_image_size(image_size)
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        raise UnreadableImageError("unreadable: file not found") from None
    except IsADirectoryError:
        raise UnreadableImageError("unreadable: is a directory") from None
    except PermissionError:
        raise UnreadableImageError("unreadable: permission denied") from None
    except OSError as error:
        raise UnreadableImageError(f"unreadable: {error.strerror or error}") from None
    with file:
        try:
            if os.fstat(file.fileno()).st_size == 0:
                raise UnreadableImageError("empty file")
            return _decode_open_file(file, width, height)
        except UnreadableImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            # The warning arrives as an exception only where the caller's filters make warnings errors;
            # otherwise _decode_open_file's own check against the same limit raises.
            raise UnreadableImageError(f"decompression bomb: {error}") from None
        except UnidentifiedImageError:
            raise UnreadableImageError("not an image: no known image format recognised") from None
        except MemoryError:
            raise  # the machine, not the file: the caller must see it
        except Exception as error:  # noqa: BLE001 - a decoder can fail many ways on a broken file; all mean "skip it"
            message = str(error) or type(error).__name__
            if "truncated" in message.lower() or isinstance(error, EOFError):
                raise UnreadableImageError(f"truncated image: {message}") from None
            raise UnreadableImageError(f"cannot decode: {message}") from None


def _decode_open_file(file: BinaryIO, width: int, height: int) -> np.ndarray:
    image = Image.open(file)  # first frame of an animated file
    pixels = image.width * image.height
    # Same limit as PIL's warning (Image.MAX_IMAGE_PIXELS), which alone would only print a message.
    if Image.MAX_IMAGE_PIXELS is not None and pixels > Image.MAX_IMAGE_PIXELS:
        raise UnreadableImageError(
            f"decompression bomb: {image.width}x{image.height} is over PIL's limit of {Image.MAX_IMAGE_PIXELS} pixels"
        )
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    # Resized before it is transposed (cheaper on the small image), so under a quarter-turn orientation the
    # stored image is resized to the target with its axes swapped.
    stored_size = (height, width) if orientation in _ORIENTATIONS_SWAPPING_AXES else (width, height)
    # JPEG only (a no-op for other formats): decode at 1/2, 1/4 or 1/8 scale straight from the DCT.
    image.draft("RGB", (int(stored_size[0] * _REDUCING_GAP), int(stored_size[1] * _REDUCING_GAP)))

    image = _to_resizable_mode(image)
    image = image.resize(stored_size, Image.Resampling.BILINEAR, reducing_gap=_REDUCING_GAP)
    if orientation in _ORIENTATION_TRANSPOSE:
        image = image.transpose(_ORIENTATION_TRANSPOSE[orientation])
    if image.mode in ("LA", "RGBA"):
        # White, not black: transparent backgrounds of logos and product shots are meant to be seen on a page.
        image = Image.alpha_composite(Image.new("RGBA", image.size, _WHITE), image.convert("RGBA"))
    return np.array(image.convert("RGB"))


def _to_resizable_mode(image: Image.Image) -> Image.Image:
    """The image in L, LA, RGB or RGBA, with values on the 0..255 scale (LA and RGBA are resized premultiplied)."""
    mode = image.mode
    if mode in ("LA", "RGBA") or (mode in ("L", "RGB") and "transparency" not in image.info):
        return image
    if mode.startswith("I;16"):
        # 16-bit samples: keep the top 8 bits (65535 -> 255); convert("L") would clip everything above 255.
        return Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8))
    if mode == "I":
        # 32-bit int: PIL's mode for 16-bit PNG/TIFF data, so read on the 16-bit scale, clipped.
        return Image.fromarray((np.clip(np.asarray(image), 0, 65535) >> 8).astype(np.uint8))
    if mode == "F":
        # Float: PIL's (and keras load_img's) convention is the 0..255 scale; clipped, NaN as 0.
        samples = np.nan_to_num(np.asarray(image), nan=0.0)
        return Image.fromarray(np.clip(np.rint(samples), 0, 255).astype(np.uint8))
    if mode in ("La", "PA", "RGBa") or "transparency" in image.info:  # P, L, RGB with a transparent colour
        return image.convert("RGBA")
    if mode == "1":
        return image.convert("L")
    return image.convert("RGB")  # P, CMYK, YCbCr, HSV, RGBX...


def decode_or_reason(path: Path | str, image_size: int | tuple[int, int]) -> np.ndarray | str:
    """The decoded image, or the reason it cannot be decoded (for a skip row, never an exception)."""
    try:
        return decode_image(path, image_size)
    except UnreadableImageError as error:
        return error.reason


def decoded_batches(paths: Sequence[Path | str], image_size: int | tuple[int, int], batch_size: int, *,
                    threads: int | None = None, ahead: int = 2) -> Iterator[list[np.ndarray | str]]:
    """Decode `paths` in batches on a thread pool that runs `ahead` batches ahead of the consumer.

    Yields one list per batch, in order: each item the image or the reason it was skipped. At most
    `ahead + 1` batches are in memory, whatever the number of paths.
    """
    starts = iter(range(0, len(paths), batch_size))
    with ThreadPoolExecutor(threads or min(8, (os.cpu_count() or 2) * 2)) as pool:
        pending: deque[list[Future]] = deque()

        def submit_next() -> None:
            start = next(starts, None)
            if start is not None:
                pending.append([pool.submit(decode_or_reason, p, image_size) for p in paths[start:start + batch_size]])

        for _ in range(ahead):
            submit_next()
        while pending:
            futures = pending.popleft()
            submit_next()
            yield [future.result() for future in futures]
