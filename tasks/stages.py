"""The pipeline's stages as Prefect tasks, named for the data they produce.

Each wraps a plain function from this room, so the work stays testable without Prefect.
Caching is off until stage keys are content fingerprints (see issue #4): Prefect's default
policy hashes arguments (a path string), not the files behind them, and would serve stale output.
"""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from storage.manifest import Manifest
from storage.output_layout import OutputLayout
from storage.report import summary_markdown, write_report
from storage.run_summary import RunSummary
from tasks.evaluation import Evaluation, evaluate_bundle
from tasks.extraction import ExtractionResult, ExtractionSettings, extract_features
from tasks.listing import list_dataset
from tasks.logs import stage_logger
from tasks.splitting import split_manifest
from tasks.training import TrainingResult, TrainingSettings, train_head


@task(name="claim output", cache_policy=NONE)
def claimed_output(output: str, overwrite: bool) -> OutputLayout:
    layout = OutputLayout(root=output)
    layout.claim(overwrite=overwrite)
    return layout


@task(name="list images", cache_policy=NONE)
def listed_manifest(dataset: str, seed: int) -> Manifest:
    manifest = list_dataset(Path(dataset), seed=seed)
    stage_logger().info("list: %d images in %d classes (%d other files ignored%s)", len(manifest.records),
                        len(manifest.class_names), sum(manifest.ignored.values()),
                        f"; empty classes dropped: {', '.join(manifest.dropped_classes)}" if manifest.dropped_classes else "")
    return manifest


@task(name="split train/test", cache_policy=NONE)
def split(manifest: Manifest, test_size: float, seed: int) -> Manifest:
    return split_manifest(manifest, test_size=test_size, seed=seed)


@task(name="extract features", cache_policy=NONE)
def feature_store(manifest: Manifest, layout: OutputLayout, settings: ExtractionSettings,
                  overwrite: bool) -> ExtractionResult:
    result = extract_features(manifest, layout.store, settings, overwrite=overwrite)
    manifest.save(layout.manifest)
    log = stage_logger()
    log.info("extract: %d images in %.1f s (%.1f img/s), %d skipped; weights: %s", result.images_extracted,
             result.seconds, result.images_extracted / max(result.seconds, 1e-9), len(result.images_skipped),
             result.weights.describe())
    for skipped in result.images_skipped:
        log.warning("skipped %s: %s", skipped.path, skipped.reason)
    return result


@task(name="train head", cache_policy=NONE)
def trained_bundle(extraction: ExtractionResult, layout: OutputLayout, settings: TrainingSettings,
                   overwrite: bool) -> TrainingResult:
    result = train_head(extraction.store, layout.model, settings, overwrite=overwrite)
    stage_logger().info("train: %s on %d images, best %s (cv accuracy %.4f) in %.1f s", settings.head,
                        result.n_train, result.best_params, result.cv_score, result.seconds)
    return result


@task(name="evaluate", cache_policy=NONE)
def evaluation(training: TrainingResult, extraction: ExtractionResult) -> Evaluation:
    return evaluate_bundle(training.bundle, extraction.store, n_train=training.n_train)


@task(name="write report", cache_policy=NONE)
def report(result: Evaluation, extraction: ExtractionResult, training: TrainingResult, layout: OutputLayout,
           overwrite: bool) -> dict:
    spec = training.bundle.metadata
    metrics = {
        "accuracy": result.accuracy, "macro_f1": result.macro_f1, "n_train": result.n_train, "n_test": result.n_test,
        "best_params": result.best_params, "head": spec.head, "backbone": spec.backbone,
        "weights_source": extraction.weights.describe(), "image_size": spec.image_size, "pooling": spec.pooling,
        "precision": spec.precision, "feature_dim": spec.feature_dim, "class_names": result.class_names,
        "per_class": result.per_class, "confusion": result.confusion,
    }
    write_report(layout.report, metrics, result.classification_report, overwrite=overwrite)
    create_markdown_artifact(key="evaluation-summary", markdown=summary_markdown(metrics),
                             description="Headline metrics of the evaluation")
    create_table_artifact(key="per-class-metrics", description="Per-class precision, recall, F1 and support",
                          table=[{"class": name, **{k: round(v, 4) for k, v in scores.items()}}
                                 for name, scores in result.per_class.items()])
    stage_logger().info("report: accuracy %.4f, macro F1 %.4f → %s", result.accuracy, result.macro_f1,
                        layout.report / "report.md")
    return metrics


@task(name="write run summary", cache_policy=NONE)
def run_summary(summary: RunSummary, layout: OutputLayout) -> RunSummary:
    summary.save(layout.run_summary)
    return summary
