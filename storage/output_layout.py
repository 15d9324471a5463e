"""Where a run's outputs live under the user's --output directory."""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from storage.errors import OutputExistsError


class OutputLayout(BaseModel):
    root: str

    @property
    def store(self) -> Path:
        return Path(self.root) / "features.h5"

    @property
    def manifest(self) -> Path:
        return Path(self.root) / "manifest.json"

    @property
    def model(self) -> Path:
        return Path(self.root) / "model"

    @property
    def report(self) -> Path:
        return Path(self.root) / "report"

    @property
    def run_summary(self) -> Path:
        return Path(self.root) / "run.json"

    def outputs(self) -> list[Path]:
        return [self.store, self.manifest, self.model, self.report, self.run_summary]

    def claim(self, *, overwrite: bool) -> None:
        """Refuse before any work if a previous run's outputs are there and overwriting was not asked for."""
        root = Path(self.root)
        if root.exists() and not root.is_dir():
            raise OutputExistsError(f"--output {root} exists and is not a directory")
        existing = [p.name for p in self.outputs() if p.exists()]
        if existing and not overwrite:
            raise OutputExistsError(f"{root} already holds {', '.join(existing)} from an earlier run "
                                    "(pass --overwrite to replace them, or choose another --output)")
