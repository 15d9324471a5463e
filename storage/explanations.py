"""An explanation folder: one heatmap overlay PNG per image and explanations.csv naming them, written under a
temporary name and renamed into place as a whole; an existing folder with anything in it is kept unless asked."""
from __future__ import annotations

import contextlib
import csv
import io
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from transfer_flow.storage.atomic import atomic_path
from transfer_flow.storage.errors import OutputExistsError

EXPLANATIONS_FILE = "explanations.csv"
EXPLANATION_COLUMNS = ["path", "label", "confidence", "method", "heatmap", "error"]


def refuse_existing_explanations(folder: Path, *, overwrite: bool) -> None:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():  # --overwrite cannot help: a file is never replaced by a folder
        raise OutputExistsError(f"--output {folder} is a file; give a folder for the heatmaps")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise OutputExistsError(f"{folder} already exists and is not empty (pass --overwrite to replace it)")


def overlay_name(index: int, path: str) -> str:
    """`0007-cat_photo.png`: the image's place in the list (unique, even for two `a.jpg` from different
    folders) and its name reduced to safe characters (readable)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem).strip("._-")[:60] or "image"
    return f"{index:04d}-{stem}.png"


class ExplanationsFolder:
    """Fills the temporary folder: overlays as they are made, then the CSV."""

    def __init__(self, folder: Path):
        self.folder = folder

    def add_overlay(self, index: int, path: str, pixels: np.ndarray) -> str:
        name = overlay_name(index, path)
        Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(self.folder / name, format="PNG", optimize=True)
        return name

    def write_rows(self, rows: Sequence[dict]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=EXPLANATION_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        (self.folder / EXPLANATIONS_FILE).write_text(buffer.getvalue(), encoding="utf-8")


@contextlib.contextmanager
def explanations_folder(folder: Path, *, overwrite: bool) -> Iterator[ExplanationsFolder]:
    """Yield a writer into a temporary folder beside `folder`, renamed to `folder` when the block ends well."""
    folder = Path(folder)
    refuse_existing_explanations(folder, overwrite=overwrite)
    replace = folder.is_dir()  # only an empty one, or one the user asked to replace
    try:
        with atomic_path(folder, overwrite=replace, is_dir=True) as tmp:
            tmp.mkdir(parents=True, exist_ok=True)
            yield ExplanationsFolder(tmp)
    except FileExistsError:  # another writer won meanwhile
        raise OutputExistsError(f"{folder} already exists (pass --overwrite to replace it)") from None
