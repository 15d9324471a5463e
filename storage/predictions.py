"""Prediction CSVs: one row per image, written atomically, never over an existing file unless asked."""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from transfer_flow.storage.atomic import atomic_path
from transfer_flow.storage.errors import OutputExistsError


def prediction_columns(top_k: int) -> list[str]:
    """path,label,confidence, then label_2,confidence_2 … label_K,confidence_K, then error."""
    columns = ["path", "label", "confidence"]
    for rank in range(2, top_k + 1):
        columns += [f"label_{rank}", f"confidence_{rank}"]
    return [*columns, "error"]


def predictions_csv_text(rows: Sequence[dict], top_k: int) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=prediction_columns(top_k), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def refuse_existing_predictions(target: Path, *, overwrite: bool) -> None:
    if Path(target).is_dir():  # --overwrite cannot help: a folder is never replaced by a CSV
        raise OutputExistsError(f"--output {target} is a folder; give the CSV a file name, such as "
                                f"{Path(target) / 'predictions.csv'}")
    if Path(target).exists() and not overwrite:
        raise OutputExistsError(f"{target} already exists (pass --overwrite to replace it)")


def write_predictions(target: Path, rows: Sequence[dict], top_k: int, *, overwrite: bool = False) -> Path:
    """Write the CSV under a temporary name and rename it into place."""
    target = Path(target)
    refuse_existing_predictions(target, overwrite=overwrite)
    try:
        with atomic_path(target, overwrite=overwrite) as tmp:
            tmp.write_text(predictions_csv_text(rows, top_k), encoding="utf-8")
    except FileExistsError:  # another writer won meanwhile
        raise OutputExistsError(f"{target} already exists (pass --overwrite to replace it)") from None
    return target
