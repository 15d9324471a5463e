import os
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageOps

from transfer_flow.storage.errors import SettingsError, UnreadableImageError
from transfer_flow.tasks.images import decode_image, parse_image_size

running_as_root = hasattr(os, "geteuid") and os.geteuid() == 0
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def saved(image: Image.Image, path: Path, **save_options) -> Path:
    image.save(path, **save_options)
    return path


def colour_at(pixels: np.ndarray, row: int, column: int) -> tuple[int, ...]:
    return tuple(int(v) for v in pixels[row, column])


def stored_mode_and_frames(path: Path) -> tuple[str, int]:
    with Image.open(path) as image:
        return image.mode, getattr(image, "n_frames", 1)


def assert_close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 0) -> None:
    assert np.abs(np.subtract(actual, expected)).max() <= tolerance, f"{actual} != {expected}"


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares `width` x `height` with no pixel data: enough for the size checks at open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


def test_output_is_uint8_rgb_of_the_requested_height_and_width(tmp_path: Path) -> None:
    path = saved(Image.new("RGB", (100, 50), GREEN), tmp_path / "wide.png")

    square = decode_image(path, 32)
    tall = decode_image(str(path), (40, 20))  # aspect ratio is not preserved

    assert (square.shape, square.dtype) == ((32, 32, 3), np.uint8)
    assert tall.shape == (40, 20, 3)
    assert colour_at(tall, 39, 19) == GREEN


@pytest.mark.parametrize("bad_size", [0, -3, (10,), (10, 0), "224", 224.0, True, [224, 224]])
def test_image_size_must_be_positive_int_or_pair(bad_size: object) -> None:
    with pytest.raises(SettingsError, match="Expected image_size"):
        parse_image_size(bad_size)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        pytest.param(Image.new("L", (8, 8), 100), (100, 100, 100), id="L"),
        pytest.param(Image.new("1", (8, 8), 1), WHITE, id="1"),
        pytest.param(Image.new("LA", (8, 8), (60, 255)), (60, 60, 60), id="LA-opaque"),
        pytest.param(Image.new("LA", (8, 8), (60, 0)), WHITE, id="LA-transparent"),
        pytest.param(Image.new("RGBA", (8, 8), (10, 20, 30, 0)), WHITE, id="RGBA-transparent"),
        pytest.param(Image.new("RGBA", (8, 8), (0, 0, 255, 255)), BLUE, id="RGBA-opaque"),
        pytest.param(Image.new("RGBA", (8, 8), (0, 0, 0, 128)), (127, 127, 127), id="RGBA-half-black-on-white"),
    ],
)
def test_modes_become_rgb_with_transparency_on_white(tmp_path: Path, image: Image.Image, expected: tuple) -> None:
    pixels = decode_image(saved(image, tmp_path / "image.png"), 4)

    assert_close(colour_at(pixels, 2, 2), expected, tolerance=1)


def test_palette_image_without_transparency_keeps_its_colours(tmp_path: Path) -> None:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([*RED, *GREEN] + [0] * (254 * 3))

    assert colour_at(decode_image(saved(image, tmp_path / "p.png"), 8), 3, 3) == GREEN


def test_palette_image_with_transparent_index_gets_white_there(tmp_path: Path) -> None:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([*RED, *GREEN] + [0] * (254 * 3))
    image.paste(1, (0, 0, 8, 4))  # top half green, bottom half index 0 (transparent red)
    path = saved(image, tmp_path / "p.gif", transparency=0)

    pixels = decode_image(path, 8)

    assert colour_at(pixels, 0, 0) == GREEN
    assert colour_at(pixels, 7, 7) == WHITE


def test_cmyk_pure_cyan_is_cyan(tmp_path: Path) -> None:
    path = saved(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), tmp_path / "cyan.tif")

    assert colour_at(decode_image(path, 4), 1, 1) == (0, 255, 255)


def test_16_bit_samples_are_scaled_not_clipped(tmp_path: Path) -> None:
    samples = np.zeros((8, 8), np.uint16)
    samples[:, 2:4], samples[:, 4:6], samples[:, 6:] = 65535, 32768, 257
    image = Image.fromarray(samples)
    assert image.mode == "I;16"
    path = saved(image, tmp_path / "deep.png")

    pixels = decode_image(path, 8)

    assert [int(pixels[0, column, 0]) for column in (0, 2, 4, 6)] == [0, 255, 128, 1]


def test_32_bit_int_samples_are_read_on_the_16_bit_scale(tmp_path: Path) -> None:
    samples = np.zeros((8, 8), np.int32)
    samples[:, 2:4], samples[:, 4:6], samples[:, 6:] = 70_000, 100 * 256, -5
    path = saved(Image.fromarray(samples), tmp_path / "int.tif")
    assert stored_mode_and_frames(path) == ("I", 1)

    pixels = decode_image(path, 8)

    assert [int(pixels[0, column, 0]) for column in (0, 2, 4, 6)] == [0, 255, 100, 0]


def test_float_samples_are_read_on_the_0_255_scale(tmp_path: Path) -> None:
    samples = np.zeros((8, 8), np.float32)
    samples[:, 2:4], samples[:, 4:6], samples[:, 6:] = 127.6, 300.0, np.nan
    path = saved(Image.fromarray(samples), tmp_path / "float.tif")
    assert stored_mode_and_frames(path) == ("F", 1)

    pixels = decode_image(path, 8)

    assert [int(pixels[0, column, 1]) for column in (0, 2, 4, 6)] == [0, 128, 255, 0]


@pytest.mark.parametrize("extension", ["gif", "webp"])
def test_animated_image_gives_its_first_frame(tmp_path: Path, extension: str) -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, GREEN, BLUE)]
    path = saved(frames[0], tmp_path / f"animated.{extension}", save_all=True, append_images=frames[1:],
                 duration=100, loop=0, lossless=True)
    assert stored_mode_and_frames(path)[1] == 3

    assert_close(colour_at(decode_image(path, 8), 4, 4), RED, tolerance=2)


def quadrants(width: int, height: int) -> Image.Image:
    """Four distinct colours, so any flip or rotation shows."""
    image = Image.new("RGB", (width, height), RED)
    image.paste(GREEN, (width // 2, 0, width, height // 2))
    image.paste(BLUE, (0, height // 2, width // 2, height))
    image.paste(WHITE, (width // 2, height // 2, width, height))
    return image


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_imageops_exif_transpose(tmp_path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    path = saved(quadrants(12, 6), tmp_path / "oriented.png", exif=exif)
    with Image.open(path) as stored:
        expected = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))

    pixels = decode_image(path, expected.shape[:2])  # same size: no resampling blurs the comparison

    np.testing.assert_array_equal(pixels, expected)


def test_rotated_large_jpeg_is_upright_after_reduced_decoding(tmp_path: Path) -> None:
    stored = Image.new("RGB", (800, 400), RED)
    stored.paste(BLUE, (400, 0, 800, 400))  # stored: red left, blue right
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # shown turned 90 degrees clockwise: red on top
    path = saved(stored, tmp_path / "phone.jpg", exif=exif, quality=95)

    pixels = decode_image(path, (40, 20))

    assert pixels.shape == (40, 20, 3)
    assert_close(colour_at(pixels, 5, 10), RED, tolerance=6)
    assert_close(colour_at(pixels, 35, 10), BLUE, tolerance=6)


def test_reduced_jpeg_decoding_stays_close_to_full_decoding(tmp_path: Path) -> None:
    rows, columns = np.mgrid[0:600, 0:800]
    gradient = np.stack([columns * 255 // 799, rows * 255 // 599, (rows + columns) % 256], axis=-1).astype(np.uint8)
    path = saved(Image.fromarray(gradient), tmp_path / "large.jpg", quality=95)
    with Image.open(path) as stored:
        reference = np.asarray(stored.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR), np.int16)

    pixels = decode_image(path, 64)

    assert np.abs(pixels.astype(np.int16) - reference).mean() < 3


def test_decoding_from_threads_gives_the_serial_results(tmp_path: Path) -> None:
    paths = [saved(quadrants(60 + 10 * index, 40), tmp_path / f"{index}.jpg") for index in range(8)]
    serial = [decode_image(path, 24) for path in paths]

    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda path: decode_image(path, 24), paths * 3))

    for index, pixels in enumerate(threaded):
        np.testing.assert_array_equal(pixels, serial[index % len(paths)])


def broken_files(tmp_path: Path) -> dict[str, Path]:
    jpeg = saved(quadrants(64, 64), tmp_path / "whole.jpg").read_bytes()
    files = {
        "empty file": tmp_path / "empty.jpg",
        "truncated image: ": tmp_path / "truncated.jpg",
        "not an image: ": tmp_path / "text.jpg",
        "unreadable: file not found": tmp_path / "missing.jpg",
        "unreadable: is a directory": tmp_path / "folder.jpg",
    }
    files["empty file"].write_bytes(b"")
    files["truncated image: "].write_bytes(jpeg[: len(jpeg) // 2])
    files["not an image: "].write_text("label,path\n")
    files["unreadable: is a directory"].mkdir()
    return files


def test_each_broken_file_gives_its_reason(tmp_path: Path) -> None:
    for reason, path in broken_files(tmp_path).items():
        with pytest.raises(UnreadableImageError) as raised:
            decode_image(path, 32)
        assert raised.value.reason.startswith(reason), (path.name, raised.value.reason)


@pytest.mark.skipif(running_as_root, reason="root opens files whatever their permissions")
def test_file_without_read_permission_is_unreadable(tmp_path: Path) -> None:
    path = saved(Image.new("RGB", (8, 8)), tmp_path / "locked.png")
    path.chmod(0)

    with pytest.raises(UnreadableImageError, match="unreadable: permission denied"):
        decode_image(path, 8)


@pytest.mark.parametrize("warnings_as", ["ignore", "error"])
@pytest.mark.parametrize(("width", "height"), [(10_000, 9_000), (20_000, 20_000)])
def test_decompression_bomb_is_unreadable_at_pils_default_limit(
    tmp_path: Path, width: int, height: int, warnings_as: str
) -> None:
    """Over MAX_IMAGE_PIXELS PIL only warns, over twice it raises: both are refused, whatever the warning filters."""
    assert Image.MAX_IMAGE_PIXELS == 89_478_485 < width * height
    path = png_header_only(tmp_path / "bomb.png", width, height)

    with warnings.catch_warnings():
        warnings.simplefilter(warnings_as, Image.DecompressionBombWarning)
        with pytest.raises(UnreadableImageError, match="^decompression bomb: "):
            decode_image(path, 8)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485
