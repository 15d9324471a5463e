"""The Manifest: what a dataset folder holds, as one value that can be saved, reloaded and fingerprinted."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from transfer_flow.storage.atomic import write_text

Split = Literal["train", "test", "val"]


class ImageRecord(BaseModel):
    """One image file of the dataset."""

    path: str = Field(description="Path relative to the dataset root, with '/' separators.")
    label: str = Field(description="Class name: the first folder level under the root (or under train/, test/, val/).")
    size: int = Field(description="File size in bytes.")
    mtime_ns: int = Field(description="Modification time in nanoseconds.")
    ctime_ns: int = Field(default=0, description="Inode change time: moves on any write, even when mtime is set back.")
    content_hash: str = Field(
        default="", description="BLAKE2b of the file's bytes (hex, 128 bits); empty until hashed."
    )
    split: Split | None = Field(
        default=None, description="Split given by the folder layout, or assigned by the split task."
    )


class Manifest(BaseModel):
    """Every image of a dataset folder, in the (seeded, shuffled) order rows will be stored."""

    root: str = Field(description="Absolute path of the dataset folder.")
    class_names: list[str] = Field(description="Sorted class names; a label's index here is its integer label.")
    records: list[ImageRecord]
    ignored: dict[str, int] = Field(default_factory=dict, description="Files not listed, counted by reason.")
    dropped_classes: list[str] = Field(default_factory=list, description="Class folders with no image, dropped.")
    folder_splits: bool = Field(default=False, description="True when train/ and test/ folders define the split.")

    def fingerprint(self) -> str:
        """Content fingerprint: changes when any image's bytes, path, class or split change (not its mtime)."""
        digest = hashlib.sha256()
        digest.update("\0".join(self.class_names).encode())
        for r in sorted(self.records, key=lambda r: r.path):
            digest.update(f"\n{r.path}\0{r.label}\0{r.content_hash}\0{r.split}".encode())
        return digest.hexdigest()[:16]

    def label_index(self, label: str) -> int:
        return self.class_names.index(label)

    def save(self, target: Path) -> Path:
        return write_text(Path(target), self.model_dump_json(indent=1))

    @classmethod
    def load(cls, source: Path) -> "Manifest":
        return cls.model_validate_json(Path(source).read_text(encoding="utf-8"))
