"""Shared fixtures: a real Prefect API for the session, and small real image datasets built on disk."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Prefect binds its console log handler to sys.stderr when first imported; do it now, on pytest's own
# stream, rather than inside some test's capsys (whose stream is closed when that test ends).
import prefect.main  # noqa: E402,F401

from tests.support import write_colour_images  # noqa: E402

# Three visually distinct classes, so that even random-weight features separate them.
CLASS_COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


# A test that uses one of these needs a Prefect server: it is `slow` (`make test-fast` leaves it out).
SERVER_FIXTURES = {"prefect_api", "real_server"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def prefect_api():
    """A real (temporary) Prefect API for every test that runs a flow; started once, ~20 s."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session", autouse=True)
def compiled_models_of_the_session(tmp_path_factory):
    """Models the tests convert go to the session's temporary folder, never the user's cache (~/.keras): tests
    convert backbones with weights files made per run, and a converted VGG16 is ~220 MB."""
    folder = tmp_path_factory.mktemp("compiled-models-of-the-session")
    previous = os.environ.get("TRANSFER_FLOW_COMPILED_MODELS")
    os.environ["TRANSFER_FLOW_COMPILED_MODELS"] = str(folder)
    yield folder
    if previous is None:
        del os.environ["TRANSFER_FLOW_COMPILED_MODELS"]
    else:
        os.environ["TRANSFER_FLOW_COMPILED_MODELS"] = previous


@pytest.fixture(scope="module")
def compiled_models(tmp_path_factory):
    """A compiled-model cache of the test module's own: the first test that needs a model converts it, the others
    reuse it. The process's extractors (one per extraction key, each holding the model it compiled) are dropped on
    the way in and out, so none compiled from another module's cache serves this module: `make test` runs several
    modules in one process, in an order that varies."""
    from transfer_flow.tasks import extraction

    folder = tmp_path_factory.mktemp("compiled-models")
    previous = os.environ.get("TRANSFER_FLOW_COMPILED_MODELS")
    os.environ["TRANSFER_FLOW_COMPILED_MODELS"] = str(folder)
    extraction._EXTRACTORS.clear()
    yield folder
    extraction._EXTRACTORS.clear()
    if previous is None:
        del os.environ["TRANSFER_FLOW_COMPILED_MODELS"]
    else:
        os.environ["TRANSFER_FLOW_COMPILED_MODELS"] = previous


@pytest.fixture(scope="session")
def colour_dataset(tmp_path_factory) -> Path:
    """3 classes × 8 good images (mixed JPEG/PNG)."""
    root = tmp_path_factory.mktemp("colours")
    for k, (name, colour) in enumerate(CLASS_COLOURS.items()):
        write_colour_images(root / name, colour, 8, seed=k)
    return root


@pytest.fixture(scope="session")
def messy_dataset(tmp_path_factory) -> Path:
    """The colour dataset plus broken files, odd image modes and files that are not images."""
    root = tmp_path_factory.mktemp("messy")
    for k, (name, colour) in enumerate(CLASS_COLOURS.items()):
        write_colour_images(root / name, colour, 8, seed=10 + k)
    red, green, blue = root / "red", root / "green", root / "blue"
    (red / "empty.jpg").write_bytes(b"")
    good = (green / "img_000.jpg").read_bytes()
    (green / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (blue / "not_really.png").write_text("this is text, not a PNG")
    # Odd but valid images: they must decode to RGB and produce rows.
    Image.new("RGBA", (30, 30), (220, 30, 30, 128)).save(red / "rgba.png")
    Image.new("CMYK", (30, 30), (0, 200, 200, 0)).save(red / "cmyk.jpg")
    Image.new("L", (30, 30), 120).convert("P").save(blue / "palette.gif")
    (red / "nested" / "2019").mkdir(parents=True)
    Image.new("RGB", (30, 30), CLASS_COLOURS["red"]).save(red / "nested" / "2019" / "deep.JPG")
    # Files that are not listed at all.
    (root / "README.txt").write_text("top-level file")
    (green / "notes.txt").write_text("not an image")
    (blue / ".hidden.png").write_bytes(b"")
    (root / "empty_class").mkdir()
    return root
