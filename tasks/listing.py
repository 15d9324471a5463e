"""List a dataset folder into a Manifest: which image files there are, their class and (optional) split.

Layouts understood:

- ``root/<class>/**/<image>``: the class is the first folder level; images may sit deeper.
- ``root/train/<class>/**``, ``root/test/<class>/**`` and optionally ``root/val/<class>/**``: the folders
  define the split (``Manifest.folder_splits``). Only the exact lowercase names are recognised, and only
  when both ``train/`` and ``test/`` are present.

What is skipped is counted in ``Manifest.ignored`` under one of ``IGNORED_REASONS``; a skipped folder counts
once, its content is not looked at.

Symbolic links are followed when their target resolves inside the root (a link pointing outside is not
followed, so a listing never reaches files the root does not contain). Each real folder is read once, and
folders reached without a link are read before any reached through one, so:

- a link to a folder that is already listed, or that contains the link (a loop), is skipped;
- a file reached under several paths is listed once, under the path with the fewest links, then the
  first in path order; a file keeps the class of its real location when that location is itself listed.
"""
from __future__ import annotations

import heapq
import os
import random
from dataclasses import dataclass
from pathlib import Path

from transfer_flow.storage.errors import DatasetError
from transfer_flow.storage.manifest import ImageRecord, Manifest, Split

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)
SPLIT_FOLDERS: tuple[Split, ...] = ("train", "test", "val")
IGNORED_REASONS: tuple[str, ...] = (
    "hidden",  # name starts with '.'
    "not_image",  # extension not in IMAGE_EXTENSIONS
    "top_level",  # not inside a class folder: a file at the root (or directly in a split folder),
    #               or, with train/test folders, any other root entry
    "outside_root_link",  # symbolic link whose target is outside the root
    "broken_link",  # symbolic link whose target does not exist
    "symlink_loop",  # link to a folder that contains it, or a cycle of links
    "duplicate_link",  # folder or file already listed under another path
    "unreadable",  # folder or file that cannot be read or stat'ed (permission denied...)
    "special_file",  # neither a regular file nor a folder (socket, fifo, device)
)


@dataclass(frozen=True)
class _FileFound:
    relative_path: str
    real_path: str
    links_followed: int
    stat: os.stat_result


def list_dataset(root: Path | str, *, seed: int = 42) -> Manifest:
    """List the images under `root`; raise DatasetError if it is not a usable dataset folder."""
    root_path = Path(root)
    real_root = _real_root(root_path)
    _check_readable(root_path, real_root)
    folder_splits = all(_is_folder_inside(real_root, real_root / name) for name in ("train", "test"))

    walk = _Walk(real_root, folder_splits)
    walk.run()

    files_by_real_path: dict[str, _FileFound] = {}
    for found in sorted(walk.files, key=lambda f: (f.links_followed, f.relative_path)):
        if found.real_path in files_by_real_path:
            walk.ignore("duplicate_link")
        else:
            files_by_real_path[found.real_path] = found
    records = [_record(found, folder_splits) for found in files_by_real_path.values()]

    labels_by_split: dict[Split | None, set[str]] = {}
    for record in records:
        labels_by_split.setdefault(record.split, set()).add(record.label)
    class_names = sorted(labels_by_split.get("train" if folder_splits else None, set()))
    if folder_splits:
        _check_eval_classes_in_train(labels_by_split, set(class_names))
    if len(class_names) < 2:
        raise DatasetError(_too_few_classes_message(root_path, class_names, folder_splits))

    labelled = {record.label for record in records}
    dropped_classes = sorted(walk.class_folders - labelled)
    records.sort(key=lambda record: record.path)
    random.Random(seed).shuffle(records)
    return Manifest(
        root=str(real_root),
        class_names=class_names,
        records=records,
        ignored=dict(sorted(walk.ignored.items())),
        dropped_classes=dropped_classes,
        folder_splits=folder_splits,
    )


def _real_root(root: Path) -> Path:
    try:
        real_root = Path(os.path.realpath(root, strict=True))
    except FileNotFoundError:
        raise DatasetError(f"Dataset folder not found: {root}") from None
    except OSError as error:
        raise DatasetError(f"Dataset folder cannot be read: {root} ({error.strerror})") from None
    if not real_root.is_dir():
        raise DatasetError(f"Dataset path is not a folder: {root}")
    return real_root


def _check_readable(root: Path, real_root: Path) -> None:
    """An unreadable root is an error (not an 'unreadable' count, as a sub-folder would be)."""
    try:
        os.listdir(real_root)
    except OSError as error:
        raise DatasetError(f"Dataset folder cannot be read: {root} ({error.strerror})") from None


def _is_folder_inside(real_root: Path, path: Path) -> bool:
    try:
        real_path = Path(os.path.realpath(path, strict=True))
    except OSError:
        return False
    return real_path.is_dir() and real_path.is_relative_to(real_root)


class _Walk:
    """Reads every listed folder once, in (links followed, path) order, collecting candidate image files."""

    def __init__(self, real_root: Path, folder_splits: bool):
        self.real_root = real_root
        self.folder_splits = folder_splits
        # Depth of the class level in path parts: root/<class> or root/<split>/<class>.
        self.class_depth = 1 if folder_splits else 0
        self.files: list[_FileFound] = []
        self.ignored: dict[str, int] = {}
        self.class_folders: set[str] = set()
        self._visited_real_folders: set[str] = set()
        # (links followed, relative parts, real path): heap order puts plain folders before linked ones.
        self._pending: list[tuple[int, tuple[str, ...], str]] = [(0, (), str(real_root))]

    def ignore(self, reason: str) -> None:
        self.ignored[reason] = self.ignored.get(reason, 0) + 1

    def run(self) -> None:
        while self._pending:
            links_followed, parts, real_folder = heapq.heappop(self._pending)
            if real_folder in self._visited_real_folders:
                self.ignore("duplicate_link")
                continue
            self._visited_real_folders.add(real_folder)
            if len(parts) == self.class_depth + 1:
                self.class_folders.add(parts[-1])
            self._read_folder(links_followed, parts, real_folder)

    def _read_folder(self, links_followed: int, parts: tuple[str, ...], real_folder: str) -> None:
        try:
            with os.scandir(real_folder) as scanned:
                entries = sorted(scanned, key=lambda entry: entry.name)
        except OSError:
            self.ignore("unreadable")
            return
        for entry in entries:
            if entry.name.startswith("."):
                self.ignore("hidden")
                continue
            entry_parts = (*parts, entry.name)
            if not parts and self.folder_splits and entry.name not in SPLIT_FOLDERS:
                self.ignore("top_level")
                continue
            self._read_entry(entry, entry_parts, links_followed, real_folder)

    def _read_entry(
        self, entry: os.DirEntry[str], parts: tuple[str, ...], links_followed: int, real_folder: str
    ) -> None:
        is_link = entry.is_symlink()
        if is_link:
            try:
                real_path = os.path.realpath(entry.path, strict=True)
            except FileNotFoundError:
                self.ignore("broken_link")
                return
            except OSError:  # ELOOP: a cycle of links
                self.ignore("symlink_loop")
                return
            if not Path(real_path).is_relative_to(self.real_root):
                self.ignore("outside_root_link")
                return
        else:
            real_path = os.path.join(real_folder, entry.name)
        try:
            stat = entry.stat()  # follows the link: size and mtime of the target
        except OSError:
            self.ignore("unreadable")
            return

        if entry.is_dir():
            if is_link and Path(real_folder).is_relative_to(real_path):
                self.ignore("symlink_loop")
                return
            heapq.heappush(self._pending, (links_followed + is_link, parts, real_path))
        elif not entry.is_file():
            self.ignore("special_file")
        elif len(parts) <= self.class_depth + 1:
            self.ignore("top_level")
        elif os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
            self.ignore("not_image")
        else:
            self.files.append(_FileFound("/".join(parts), real_path, links_followed + is_link, stat))


def _record(found: _FileFound, folder_splits: bool) -> ImageRecord:
    parts = found.relative_path.split("/")
    return ImageRecord(
        path=found.relative_path,
        label=parts[1] if folder_splits else parts[0],
        size=found.stat.st_size,
        mtime_ns=found.stat.st_mtime_ns,
        ctime_ns=found.stat.st_ctime_ns,
        split=parts[0] if folder_splits else None,
    )


def _check_eval_classes_in_train(labels_by_split: dict[Split | None, set[str]], train_classes: set[str]) -> None:
    for split in ("test", "val"):
        missing = sorted(labels_by_split.get(split, set()) - train_classes)
        if missing:
            raise DatasetError(
                f"Classes in {split}/ with no image in train/: {', '.join(missing)}; "
                "every class to evaluate must also be trained on."
            )


def _too_few_classes_message(root: Path, class_names: list[str], folder_splits: bool) -> str:
    found = f"{len(class_names)} class{'es' if len(class_names) != 1 else ''} with images"
    if class_names:
        found += f" ({', '.join(class_names)})"
    where = f"in {root / 'train'}" if folder_splits else f"in {root}"
    layout = (
        "train/<class>/<image> and test/<class>/<image>"
        if folder_splits
        else "<class>/<image> (one folder per class), or train/<class>/... and test/<class>/..."
    )
    return f"Found {found} {where}; at least 2 are needed, laid out as {layout}."
