"""Report files, written as one directory: metrics.json (machine-readable), report.md, report.html
(self-contained: every picture embedded as a PNG data URI), confusion_matrix.png, feature_map.png and, for
heads that train by epochs, training_curves.png."""
from __future__ import annotations

import base64
import functools
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import matplotlib

matplotlib.use("Agg")  # files only: never open a window, work without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from pydantic import BaseModel  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from transfer_flow.storage.atomic import atomic_path  # noqa: E402
from transfer_flow.storage.report_metrics import (  # noqa: E402
    METRICS_FILE,
    Baselines,
    Misclassified,
    NearDuplicate,
    ReportMetrics,
    SuspectLabel,
    metrics_json,
)

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


def sampled_text(compared: Baselines) -> str:
    scored, total = compared.raw_pixels_test_images, compared.test_images
    if compared.raw_pixels is None or not scored or not total or scored >= total:
        return ""
    return f" (on a sample of {scored:,} of the {total:,} test images)"


def baseline_lines(metrics: ReportMetrics) -> list[str]:
    """The baselines in a sentence, and a plain warning when the features do not beat raw pixels."""
    compared = metrics.baselines
    if compared is None:
        return []
    raw = compared.raw_pixels
    lines = [f"baselines on the same split: majority class {compared.majority:.4f}, logistic regression on "
             f"16x16 raw pixels " + (f"{raw:.4f}" if raw is not None else "not computed (images unreadable now)")
             + sampled_text(compared)]
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
        *[f"- {line}" for line in data_check_lines(metrics)],
        f"- train / test images: {metrics.n_train} / {metrics.n_test}",
        f"- best {_params_text(metrics.best_params)}",
        f"- weights: {metrics.weights_source}; image size {metrics.image_size}, pooling {metrics.pooling}, "
        f"runtime {metrics.runtime}, precision {metrics.precision}, features stored as {metrics.feature_dtype}",
    ])


def context_markdown(metrics: ReportMetrics) -> list[str]:
    """The run's context for report.md: where the data came from, how it was split, what was skipped."""
    context = metrics.context
    if context is None:
        return []
    run = f"[{context.flow_run_id}]({context.flow_run_url})" if context.flow_run_url else context.flow_run_id
    return [
        "## Run context", "",
        f"- dataset: `{context.dataset}`; written {context.created} by transfer-flow {context.version}, "
        f"seed {context.seed}",
        f"- split: {context.split}", *([f"- Prefect flow run: {run}"] if run else []), "",
        "| class | train | test |", "|---|---:|---:|",
        *[f"| {name} | {counts.train} | {counts.test} |" for name, counts in context.class_counts.items()], "",
        f"Skipped images: {len(context.skipped)}", "",
        *[f"- `{skipped.path}`: {skipped.reason}" for skipped in context.skipped], "",
    ]


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def confusion_png(class_names: list[str], confusion: list[list[int]]) -> bytes:
    """Counts, and beside them each true class's row as shares (recall on the diagonal): a small class's
    mistakes are visible even when its counts are."""
    counts = np.asarray(confusion)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = max(4.0, 0.6 * len(class_names) + 2)
    figure, axes = plt.subplots(1, 2, figsize=(2 * side, side))
    rotation = 45 if len(class_names) > 6 else "horizontal"
    ConfusionMatrixDisplay(counts, display_labels=class_names).plot(
        ax=axes[0], cmap="Blues", colorbar=False, xticks_rotation=rotation)
    ConfusionMatrixDisplay(shares, display_labels=class_names).plot(
        ax=axes[1], cmap="Blues", colorbar=False, xticks_rotation=rotation, values_format=".2f")
    axes[0].set_title("Confusion matrix (test split): counts")
    axes[1].set_title("normalised by true class")
    figure.tight_layout()
    return _png(figure)


def precision_recall_png(curves: dict[str, tuple[list[float], list[float], float]]) -> bytes | None:
    """One precision-recall curve per class (one against the rest, test scores); None without curves."""
    if not curves:
        return None
    figure, axes = plt.subplots(figsize=(6.5, 5))
    colours = plt.get_cmap("tab20" if len(curves) > 10 else "tab10")
    for k, (name, (recall, precision, average)) in enumerate(curves.items()):
        axes.step(recall, precision, where="post", color=colours(k % colours.N), label=f"{name} (AP {average:.3f})")
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_xlim(0, 1.01)
    axes.set_ylim(0, 1.02)
    axes.set_title("Precision-recall per class (test split)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="lower left", ncol=2 if len(curves) > 8 else 1)
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


class FeatureMapPoints(BaseModel):
    """The 2-D positions of the images drawn on the feature map, with what colours and marks them."""

    x: list[float]
    y: list[float]
    labels: list[int]
    is_test: list[bool]
    is_wrong: list[bool]
    class_names: list[str]


def feature_map_png(points: FeatureMapPoints) -> bytes:
    """Training images as dots and test images as triangles, coloured by class; misclassified test images ringed."""
    xy, labels = np.column_stack([points.x, points.y]), np.asarray(points.labels)
    is_test, is_wrong = np.asarray(points.is_test, bool), np.asarray(points.is_wrong, bool)
    colours = plt.get_cmap("tab10" if len(points.class_names) <= 10 else "tab20")
    figure, axes = plt.subplots(figsize=(7.5, 6.5))
    for k, name in enumerate(points.class_names):
        colour = colours(k % colours.N)
        train = (labels == k) & ~is_test
        test = (labels == k) & is_test
        axes.scatter(*xy[train].T, s=9, color=colour, alpha=0.45, linewidths=0, label=name)
        axes.scatter(*xy[test].T, s=30, color=colour, marker="^", edgecolors="black", linewidths=0.4)
    if is_wrong.any():
        axes.scatter(*xy[is_wrong].T, s=140, facecolors="none", edgecolors="#b00020", linewidths=1.4,
                     label="misclassified (test)")
    axes.scatter([], [], s=30, color="grey", marker="^", edgecolors="black", linewidths=0.4, label="test image")
    axes.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False, markerscale=1.2)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(f"Map of the features ({len(labels)} images; dots train, triangles test)")
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


@dataclass
class DataCheckPictures:
    """What the data-check sections draw: the feature map's points and the flagged images' thumbnails (pixels as
    the network saw them, None when an image cannot be read now)."""

    feature_map: FeatureMapPoints | None = None
    suspects: list[tuple[np.ndarray | None, SuspectLabel]] = field(default_factory=list)
    duplicates: list[tuple[np.ndarray | None, np.ndarray | None, NearDuplicate]] = field(default_factory=list)


def data_check_lines(metrics: ReportMetrics) -> list[str]:
    """The data checks in a sentence each, the leakage warning first (it belongs on the first screen)."""
    lines = []
    if metrics.n_near_duplicates_crossing:
        lines.append(f"{metrics.n_near_duplicates_crossing} pair(s) of near-identical images sit on both sides of "
                     "the train/test split: the test score is optimistic (see Near-duplicates)")
    if metrics.feature_map is not None:
        lines.append(f"data checks: {metrics.n_suspect_labels} suspect label(s) among the training images, "
                     f"{metrics.n_near_duplicates} near-duplicate pair(s)")
    return lines


def _png_or_none(pixels: np.ndarray | None) -> bytes | None:
    return None if pixels is None else thumbnail_png(pixels)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def report_html(metrics: ReportMetrics, pictures: dict[str, bytes],
                gallery: list[tuple[bytes | None, Misclassified]],
                heatmaps: dict[str, bytes] | None = None, checks: DataCheckPictures | None = None) -> str:
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
            sampled = " (sampled)" if sampled_text(metrics.baselines) else ""
            cards.append((f"baseline: raw 16x16 pixels + logreg{sampled}", f"{metrics.baselines.raw_pixels:.4f}"))
    settings = [("head", metrics.head), ("best", _params_text(metrics.best_params)),
                ("backbone", metrics.backbone), ("weights", metrics.weights_source),
                ("image size", metrics.image_size), ("pooling", metrics.pooling),
                ("runtime", metrics.runtime), ("precision", metrics.precision),
                ("features", f"{metrics.feature_dim}-d, stored as {metrics.feature_dtype}"),
                ("feature store", metrics.store)]
    return _templates().get_template(HTML_TEMPLATE).render(
        m=metrics, cards=cards, notes=baseline_lines(metrics)[1:], settings=settings,
        pictures=pictures, gallery=gallery, heatmaps=heatmaps or {},
        leakage=data_check_lines(metrics)[:1] if metrics.n_near_duplicates_crossing else [],
        suspects=[(_png_or_none(pixels), item) for pixels, item in (checks.suspects if checks else [])],
        duplicates=[(_png_or_none(a), _png_or_none(b), pair) for a, b, pair in (checks.duplicates if checks else [])])


@functools.cache
def _templates() -> jinja2.Environment:
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
                                     autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    environment.filters["data_uri"] = _data_uri
    return environment


def data_checks_markdown(metrics: ReportMetrics, shown: int = 20) -> list[str]:
    """report.md's data-check sections: the map, and the first suspect labels and near-duplicates as tables."""
    if metrics.feature_map is None:
        return []
    lines = ["## Map of the features", "", f"{metrics.feature_map.method}, {metrics.feature_map.points} of "
             f"{metrics.feature_map.rows} images.", "", f"![feature map]({metrics.feature_map.file})", "",
             f"## Suspect labels ({metrics.n_suspect_labels})", ""]
    if metrics.suspect_labels:
        lines += ["| image | given label | predicted | p(given) | p(predicted) |", "|---|---|---|---|---|"]
        lines += [f"| {s.path} | {s.label} | {s.predicted} | {s.label_probability:.3f} | {s.confidence:.3f} |"
                  for s in metrics.suspect_labels[:shown]]
    lines += ["", f"## Near-duplicates ({metrics.n_near_duplicates}, {metrics.n_near_duplicates_crossing} across "
              "train/test)", ""]
    if metrics.near_duplicates:
        lines += ["| image | image | similarity | crosses train/test |", "|---|---|---|---|"]
        lines += [f"| {d.paths[0]} | {d.paths[1]} | {d.similarity:.4f} | {'yes' if d.crosses_split else 'no'} |"
                  for d in metrics.near_duplicates[:shown]]
    return [*lines, ""]


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
                 heatmaps: dict[str, np.ndarray] | None = None,
                 checks: DataCheckPictures | None = None,
                 precision_recall: dict[str, tuple[list[float], list[float], float]] | None = None) -> Path:
    """Write the report directory atomically.

    `history`: per-epoch curves (drawn when present); `gallery`: (thumbnail pixels or None, item with
    path, true, predicted, confidence) of misclassified test images, embedded in report.html; `heatmaps`:
    overlay pixels by the file name the metrics' gallery items give (heatmap_file), written there and embedded;
    `checks`: the feature map and the suspect-label and near-duplicate thumbnails; `precision_recall`: per class,
    (recall, precision, average precision) of its test curve."""
    report_dir = Path(report_dir)
    pictures = {"confusion_matrix": confusion_png(metrics.class_names, metrics.confusion)}
    if checks is not None and checks.feature_map is not None:
        pictures["feature_map"] = feature_map_png(checks.feature_map)
    curves_by_class = precision_recall_png(precision_recall or {})
    if curves_by_class is not None:
        pictures["precision_recall"] = curves_by_class
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
        *(["## Precision-recall per class", "", "![precision-recall](precision_recall.png)", ""]
          if curves_by_class else []),
        *context_markdown(metrics),
        *(["## Training curves", "", "![training curves](training_curves.png)", ""] if curves else []),
        f"The misclassified test images are shown in [{HTML_FILE}]({HTML_FILE}).", "",
        *([f"Heatmaps ({metrics.heatmap_method}) of the predicted class over each gallery image: "
           f"[{HEATMAP_FOLDER}/]({HEATMAP_FOLDER}/), named in metrics.json.", ""] if heatmap_pngs else []),
        *data_checks_markdown(metrics),
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
        page = report_html(metrics, pictures, thumbnails, heatmap_pngs, checks)
        (tmp / HTML_FILE).write_text(page, encoding="utf-8")
    return report_dir
