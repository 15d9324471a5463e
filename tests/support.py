"""Helpers shared by test modules (fixtures live in conftest.py): fast settings, images, stores, HTML checks."""

from __future__ import annotations

import base64
import os
import pickle
import re
import signal
import subprocess
import zipfile
from html.parser import HTMLParser
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
from PIL import Image

# Code that makes TensorFlow absent from a process, as on a machine without it: not found (importlib.util.find_spec
# gives None), `import tensorflow` fails, and no "tensorflow" key lands in sys.modules (Keras reads one there as
# TensorFlow loaded, and then needs it). Run first in a process, or as its sitecustomize.py.
WITHOUT_TENSORFLOW = """
import sys
from importlib.machinery import PathFinder


class PathFinderWithoutTensorFlow(PathFinder):
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        return None if fullname.partition(".")[0] == "tensorflow" else super().find_spec(fullname, path, target)


sys.meta_path[:] = [PathFinderWithoutTensorFlow if finder is PathFinder else finder for finder in sys.meta_path]
"""

# The cheapest real pipeline: a random-weight MobileNetV2 on 32-pixel images (no download, seconds per run).
FAST = {"backbone": "mobilenet_v2", "weights": "none", "image_size": 32, "batch_size": 8}

# Extraction attributes a store written by a real run carries; heads and evaluation read them.
STORE_ATTRS = {
    "backbone": "vgg16",
    "weights_source": "random",
    "image_size": 32,
    "pooling": "avg",
    "precision": "float32",
    "preprocessing": "caffe",
}


def write_colour_images(folder: Path, colour: tuple[int, int, int], count: int, seed: int, size: int = 40) -> None:
    """`count` noisy images of one colour, alternating JPEG and PNG."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        noise = rng.integers(-25, 26, size=(size, size, 3))
        pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:03d}.{'png' if i % 2 else 'jpg'}")


def make_separable_store(
    path, *, n_per_class=20, dim=8, names=("cat", "dog", "owl"), seed=0, attrs=STORE_ATTRS, split_of=None
):
    """Three well-separated clusters; every fourth row is a test row unless `split_of(i)` says otherwise.

    The backend follows the suffix of `path` (.h5 or .zarr)."""
    from transfer_flow.storage.feature_store import create_store, open_store

    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(names)), n_per_class)
    rng.shuffle(labels)
    centres = rng.normal(scale=6.0, size=(len(names), dim))
    features = (centres[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32)
    split = [split_of(i) if split_of else ("test" if i % 4 == 0 else "train") for i in range(len(labels))]
    with create_store(path, feature_dim=dim, label_names=list(names), attrs=attrs) as writer:
        writer.append(features, labels, [f"{names[label]}/{i}.png" for i, label in enumerate(labels)], split)
    return open_store(path)


VOID = {"meta", "img", "br", "hr", "link", "input"}


class Checker(HTMLParser):
    """Tags balanced and properly nested; every src/href collected."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.sources, self.links = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "src" in attrs:
            self.sources.append(attrs["src"])
        if "href" in attrs:
            self.links.append(attrs["href"])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):  # <img/>: opens and closes itself
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def check_html(text):
    """A self-contained report: tags balanced and nested, every picture a PNG data URI, nothing external."""
    checker = Checker()
    checker.feed(text)
    checker.close()
    assert text.startswith("<!DOCTYPE html>")
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    assert checker.sources and all(s.startswith("data:image/png;base64,") for s in checker.sources)
    for source in checker.sources:
        assert base64.b64decode(source.split(",", 1)[1])[:4] == b"\x89PNG"
    # Nothing to fetch; the one link to follow is the Prefect UI's page of the flow run that wrote the report.
    assert all(re.fullmatch(r"https?://\S+/runs/flow-run/[0-9a-f-]{36}", link) for link in checker.links), checker.links
    root = ElementTree.fromstring(text.removeprefix("<!DOCTYPE html>"))  # also well-formed XML
    assert root.tag == "html" and [img.get("src") for img in root.iter("img")] == checker.sources
    return checker


# --- torch checkpoints written by hand (torch's zip layout), so hostile geometries need no torch -------------------


def _fragment(value) -> bytes:
    """The pickle opcodes of a plain value, without the protocol header and STOP."""
    return pickle.dumps(value, protocol=2)[2:-1]


def _tensor_pickle(tensors: dict[str, tuple[str, int, int, tuple, tuple]]) -> bytes:
    """data.pkl of a state dict: name → (storage key, storage numel, offset, shape, stride), float32 storages."""
    body = b"\x80\x02" + b"ccollections\nOrderedDict\n)R("  # OrderedDict(), then MARK for SETITEMS
    for name, (key, numel, offset, shape, stride) in tensors.items():
        storage = (b"(" + _fragment("storage") + b"ctorch\nFloatStorage\n" + _fragment(key) + _fragment("cpu")
                   + _fragment(numel) + b"tQ")  # the persistent id tuple, then BINPERSID
        body += (_fragment(name) + b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + _fragment(offset)
                 + _fragment(shape) + _fragment(stride) + b"\x89tR")  # NEWFALSE for requires_grad
    return body + b"u."


def write_torch_checkpoint(path: Path, tensors: dict, storages: dict[str, bytes]) -> Path:
    """A torch checkpoint in the zip layout, written by hand (no torch needed): float32 storages by key."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", _tensor_pickle(tensors))
        archive.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            archive.writestr(f"archive/data/{key}", data)
    return path


def stop_with_ctrl_c(process: subprocess.Popen) -> None:
    """Stop a command as a user would (SIGINT); kill its whole session if it has not ended within 30 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
