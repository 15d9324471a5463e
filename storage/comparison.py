"""The side-by-side table of heads trained on one feature store: comparison.csv and comparison.md."""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel

from transfer_flow.storage.atomic import write_text

COLUMNS = ["head", "accuracy", "macro_f1", "train_seconds", "best_params", "training_score", "bundle", "report"]


class HeadScore(BaseModel):
    head: str
    accuracy: float
    macro_f1: float
    train_seconds: float
    best_params: dict[str, float]
    training_score: str
    bundle: str
    report: str

    def cells(self) -> dict[str, str]:
        params = ", ".join(f"{k}={v:g}" for k, v in self.best_params.items())
        return {"head": self.head, "accuracy": f"{self.accuracy:.4f}", "macro_f1": f"{self.macro_f1:.4f}",
                "train_seconds": f"{self.train_seconds:.2f}", "best_params": params,
                "training_score": self.training_score, "bundle": self.bundle, "report": self.report}


def comparison_markdown(scores: Sequence[HeadScore], title: str) -> str:
    best = max(scores, key=lambda s: (s.macro_f1, s.accuracy)).head if scores else None
    lines = [f"# {title}", "", "| head | accuracy | macro F1 | train s | best params | training score |",
             "|---|---:|---:|---:|---|---|"]
    for score in scores:
        cells = score.cells()
        name = f"**{score.head}**" if score.head == best else score.head
        lines.append(f"| {name} | {cells['accuracy']} | {cells['macro_f1']} | {cells['train_seconds']} | "
                     f"{cells['best_params']} | {cells['training_score']} |")
    return "\n".join([*lines, "", "Best by macro F1 in bold; train seconds are the fit's own time, also when the "
                      "bundle was reused.", ""])


def write_comparison(directory: Path, scores: Sequence[HeadScore], title: str) -> tuple[Path, Path]:
    """comparison.csv and comparison.md, each written atomically (replacing an earlier comparison)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(score.cells() for score in scores)
    directory = Path(directory)
    return (write_text(directory / "comparison.csv", buffer.getvalue()),
            write_text(directory / "comparison.md", comparison_markdown(scores, title)))
