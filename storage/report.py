"""Report files: metrics.json (machine-readable), report.md and confusion_matrix.png, written as one directory."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: never open a window, work without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from storage.atomic import atomic_path  # noqa: E402


def confusion_table_markdown(class_names: list[str], confusion: list[list[int]]) -> str:
    header = "| true \\ predicted | " + " | ".join(class_names) + " |"
    rule = "|---" * (len(class_names) + 1) + "|"
    rows = [f"| **{name}** | " + " | ".join(str(v) for v in row) + " |" for name, row in zip(class_names, confusion)]
    return "\n".join([header, rule, *rows])


def summary_markdown(metrics: dict[str, Any]) -> str:
    """The headline block shared by report.md and the Prefect markdown artifact."""
    return "\n".join([
        f"# transfer-flow report: {metrics['backbone']} + {metrics['head']}",
        "",
        f"- accuracy: **{metrics['accuracy']:.4f}**, macro F1: **{metrics['macro_f1']:.4f}**",
        f"- train / test images: {metrics['n_train']} / {metrics['n_test']}",
        f"- best C: {metrics['best_params'].get('C')}",
        f"- weights: {metrics['weights_source']}; image size {metrics['image_size']}, pooling {metrics['pooling']}, "
        f"precision {metrics['precision']}, features stored as {metrics.get('feature_dtype', 'float32')}",
    ])


def _confusion_png(target: Path, class_names: list[str], confusion: list[list[int]]) -> None:
    side = max(4.0, 0.6 * len(class_names) + 2)
    figure, axes = plt.subplots(figsize=(side, side))
    ConfusionMatrixDisplay(np.asarray(confusion), display_labels=class_names).plot(
        ax=axes, cmap="Blues", colorbar=False, xticks_rotation=45 if len(class_names) > 6 else "horizontal")
    axes.set_title("Confusion matrix (test split)")
    figure.tight_layout()
    figure.savefig(target, dpi=110)
    plt.close(figure)


def read_report_key(report_dir: Path) -> str | None:
    """The stage key recorded in an existing report, or None if there is no complete report."""
    try:
        return json.loads((Path(report_dir) / "metrics.json").read_text())["stage_key"]
    except (OSError, ValueError, KeyError):
        return None


def write_report(report_dir: Path, metrics: dict[str, Any], classification_text: str, *, overwrite: bool) -> Path:
    """Write the report directory atomically; `metrics` must hold class_names and confusion."""
    report_dir = Path(report_dir)
    markdown = "\n".join([
        summary_markdown(metrics), "",
        "## Per-class metrics", "", "```", classification_text.rstrip(), "```", "",
        "## Confusion matrix", "", confusion_table_markdown(metrics["class_names"], metrics["confusion"]), "",
        "![confusion matrix](confusion_matrix.png)", "",
    ])
    with atomic_path(report_dir, overwrite=overwrite, is_dir=True) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(markdown, encoding="utf-8")
        _confusion_png(tmp / "confusion_matrix.png", metrics["class_names"], metrics["confusion"])
    return report_dir
