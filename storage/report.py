"""Report files, written as one directory: metrics.json (machine-readable), report.md, report.html
(self-contained: every picture embedded as a PNG data URI), confusion_matrix.png and, for heads that
train by epochs, training_curves.png."""
from __future__ import annotations

import base64
import functools
import io
import json
from pathlib import Path
from typing import Any

import jinja2
import matplotlib

matplotlib.use("Agg")  # files only: never open a window, work without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from transfer_flow.storage.atomic import atomic_path  # noqa: E402
from transfer_flow.storage.report_metrics import METRICS_FILE, Misclassified, ReportMetrics, metrics_json  # noqa: E402

HTML_FILE = "report.html"
HEATMAP_FOLDER = "heatmaps"  # in the report folder: one PNG per gallery image (GalleryImage.heatmap)
HTML_TEMPLATE = "report.html.j2"  # in templates/ beside this module


def confusion_table_markdown(class_names: list[str], confusion: list[list[int]]) -> str:
    header = "| true \\ predicted | " + " | ".join(class_names) + " |"
    rule = "|---" * (len(class_names) + 1) + "|"
    rows = [f"| **{name}** | " + " | ".join(str(v) for v in row) + " |" for name, row in zip(class_names, confusion)]
    return "\n".join([header, rule, *rows])


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()) or "—"


def _interval_text(metrics: ReportMetrics) -> str:
    interval = metrics.accuracy_ci
    return f" (95% interval {interval[0]:.3f}–{interval[1]:.3f}, Wilson)" if interval else ""


def baseline_lines(metrics: ReportMetrics) -> list[str]:
    """The baselines in a sentence, and a plain warning when the features do not beat raw pixels."""
    compared = metrics.baselines
    if compared is None:
        return []
    raw = compared.raw_pixels
    lines = [f"baselines on the same split: majority class {compared.majority:.4f}, logistic regression on "
             f"16x16 raw pixels " + (f"{raw:.4f}" if raw is not None else "not computed (images unreadable now)")]
    if raw is not None and metrics.accuracy <= raw:
        lines.append(f"these {metrics.backbone} features do not beat raw pixels ({metrics.accuracy:.4f} vs "
                     f"{raw:.4f}): try another backbone, a larger image size, or fine-tuning")
    return lines


def summary_markdown(metrics: ReportMetrics) -> str:
    """The headline block shared by report.md and the Prefect markdown artifact."""
    return "\n".join([
        f"# transfer-flow report: {metrics.backbone} + {metrics.head}",
        "",
        f"- accuracy: **{metrics.accuracy:.4f}**{_interval_text(metrics)}, macro F1: **{metrics.macro_f1:.4f}**",
        *[f"- {line}" for line in baseline_lines(metrics)],
        f"- train / test images: {metrics.n_train} / {metrics.n_test}",
        f"- best {_params_text(metrics.best_params)}",
        f"- weights: {metrics.weights_source}; image size {metrics.image_size}, pooling {metrics.pooling}, "
        f"precision {metrics.precision}, features stored as {metrics.feature_dtype}",
    ])


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def confusion_png(class_names: list[str], confusion: list[list[int]]) -> bytes:
    side = max(4.0, 0.6 * len(class_names) + 2)
    figure, axes = plt.subplots(figsize=(side, side))
    ConfusionMatrixDisplay(np.asarray(confusion), display_labels=class_names).plot(
        ax=axes, cmap="Blues", colorbar=False, xticks_rotation=45 if len(class_names) > 6 else "horizontal")
    axes.set_title("Confusion matrix (test split)")
    figure.tight_layout()
    return _png(figure)


def curves_png(history: dict[str, list[float]]) -> bytes | None:
    """Loss and accuracy per epoch, train and validation side by side; None without a history. A history of two
    phases (finetune: the head alone, then the backbone's top with it) marks where the second begins."""
    panels = [name for name in ("loss", "accuracy") if history.get(name)]
    second_phase = (history.get("fine_tuning_from_epoch") or [None])[0]
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, name in zip(axes[0], panels):
        epochs = np.arange(1, len(history[name]) + 1)
        ax.plot(epochs, history[name], label="train")
        if history.get(f"val_{name}"):
            ax.plot(epochs, history[f"val_{name}"], label="validation")
        if second_phase is not None:
            ax.axvline(second_phase - 0.5, color="grey", linestyle="--", label="fine-tuning starts")
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.tight_layout()
    return _png(figure)


def thumbnail_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def heatmap_file(kind: str, index: int) -> str:
    """Where the heatmap of a gallery image goes, relative to the report folder: a name made of the gallery it is
    in and its place there (never of the image's own path), so it is safe on any file system and unique."""
    return f"{HEATMAP_FOLDER}/{kind}-{index:03d}.png"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def report_html(metrics: ReportMetrics, pictures: dict[str, bytes],
                gallery: list[tuple[bytes | None, Misclassified]], heatmaps: dict[str, bytes] | None = None) -> str:
    """One self-contained page (templates/report.html.j2): every picture is a data URI, nothing is fetched
    from anywhere. Void elements are self-closed, so the page is well-formed XML too (xml.etree reads it);
    every value is escaped by the template (autoescape), paths and class names included."""
    interval = metrics.accuracy_ci
    accuracy_label = f"accuracy (95% CI {interval[0]:.3f}–{interval[1]:.3f})" if interval else "accuracy"
    cards = [(accuracy_label, f"{metrics.accuracy:.4f}"), ("macro F1", f"{metrics.macro_f1:.4f}"),
             ("train images", str(metrics.n_train)), ("test images", str(metrics.n_test))]
    if metrics.baselines is not None:
        cards.append(("baseline: majority class", f"{metrics.baselines.majority:.4f}"))
        if metrics.baselines.raw_pixels is not None:
            cards.append(("baseline: raw 16x16 pixels + logreg", f"{metrics.baselines.raw_pixels:.4f}"))
    settings = [("head", metrics.head), ("best", _params_text(metrics.best_params)),
                ("backbone", metrics.backbone), ("weights", metrics.weights_source),
                ("image size", metrics.image_size), ("pooling", metrics.pooling),
                ("precision", metrics.precision), ("features", f"{metrics.feature_dim}-d, stored as "
                                                                   f"{metrics.feature_dtype}"),
                ("feature store", metrics.store)]
    return _templates().get_template(HTML_TEMPLATE).render(
        m=metrics, cards=cards, notes=baseline_lines(metrics)[1:], settings=settings,
        pictures=pictures, gallery=gallery, heatmaps=heatmaps or {})


@functools.cache
def _templates() -> jinja2.Environment:
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
                                     autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    environment.filters["data_uri"] = _data_uri
    return environment


def read_report_key(report_dir: Path) -> str | None:
    """The stage key recorded in an existing report, or None if there is no complete report."""
    try:
        if not (Path(report_dir) / HTML_FILE).is_file():
            return None
        return json.loads((Path(report_dir) / METRICS_FILE).read_text())["stage_key"]
    except (OSError, ValueError, KeyError):
        return None


def write_report(report_dir: Path, metrics: ReportMetrics, classification_text: str, *, overwrite: bool,
                 history: dict[str, list[float]] | None = None,
                 gallery: list[tuple[np.ndarray | None, Misclassified]] | None = None,
                 heatmaps: dict[str, np.ndarray] | None = None) -> Path:
    """Write the report directory atomically.

    `history`: per-epoch curves (drawn when present); `gallery`: (thumbnail pixels or None, item with
    path, true, predicted, confidence) of misclassified test images, embedded in report.html; `heatmaps`:
    overlay pixels by the file name the metrics' gallery items give (heatmap_file), written there and embedded."""
    report_dir = Path(report_dir)
    pictures = {"confusion_matrix": confusion_png(metrics.class_names, metrics.confusion)}
    curves = curves_png(history or {})
    if curves is not None:
        pictures["training_curves"] = curves
    thumbnails = [(None if pixels is None else thumbnail_png(pixels), item) for pixels, item in gallery or []]
    heatmap_pngs = {name: thumbnail_png(pixels) for name, pixels in (heatmaps or {}).items()}
    markdown = "\n".join([
        summary_markdown(metrics), "",
        "## Per-class metrics", "", "```", classification_text.rstrip(), "```", "",
        "## Confusion matrix", "", confusion_table_markdown(metrics.class_names, metrics.confusion), "",
        "![confusion matrix](confusion_matrix.png)", "",
        *(["## Training curves", "", "![training curves](training_curves.png)", ""] if curves else []),
        f"The misclassified test images are shown in [{HTML_FILE}]({HTML_FILE}).", "",
        *([f"Heatmaps ({metrics.heatmap_method}) of the predicted class over each gallery image: "
           f"[{HEATMAP_FOLDER}/]({HEATMAP_FOLDER}/), named in metrics.json.", ""] if heatmap_pngs else []),
    ])
    with atomic_path(report_dir, overwrite=overwrite, is_dir=True) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / METRICS_FILE).write_text(metrics_json(metrics), encoding="utf-8")
        (tmp / "report.md").write_text(markdown, encoding="utf-8")
        for name, png in pictures.items():
            (tmp / f"{name}.png").write_bytes(png)
        if heatmap_pngs:
            (tmp / HEATMAP_FOLDER).mkdir()
        for name, png in heatmap_pngs.items():
            (tmp / name).write_bytes(png)
        (tmp / HTML_FILE).write_text(report_html(metrics, pictures, thumbnails, heatmap_pngs), encoding="utf-8")
    return report_dir
