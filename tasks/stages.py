"""The pipeline's stages as Prefect tasks, named for the data they produce.

Each wraps a plain function from this room, so the work stays testable without Prefect.

Caching: every stage function is itself incremental and content-addressed (it reuses its artefact
when the artefact records the same stage key). On top, the stages with an artefact use Prefect's
cache with persisted (JSON) results, keyed by content: the key function returns a key only when
the artefact on disk still exists and records that key, so Prefect never serves a result whose
file was deleted or replaced: it runs the stage instead. Prefect's default policy would hash the
arguments (a path string), not the files behind them.
"""
from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.context import TaskRunContext

from transfer_flow.storage.comparison import HeadScore, write_comparison
from transfer_flow.storage.errors import TransferFlowError
from transfer_flow.storage.explanations import explanations_folder, refuse_existing_explanations
from transfer_flow.storage.manifest import ImageRecord, Manifest
from transfer_flow.storage.model_bundle import ModelBundle
from transfer_flow.storage.output_layout import OutputLayout
from transfer_flow.storage.predictions import refuse_existing_predictions, write_predictions
from transfer_flow.storage.report import (
    HTML_FILE,
    confusion_table_markdown,
    read_report_key,
    summary_markdown,
    write_report,
)
from transfer_flow.storage.report_metrics import ReportMetrics, RunContext, TrainingScore
from transfer_flow.storage.run_summary import RunSummary, SkippedImageRecord
from transfer_flow.tasks.evaluation import (
    Evaluation,
    data_check_pictures,
    evaluate_bundle,
    gallery_thumbnails,
    report_key,
)
from transfer_flow.tasks.extraction import (
    ExtractionPlan,
    ExtractionResult,
    ExtractionSettings,
    assemble_store,
    extract_records,
    plan_extraction,
)
from transfer_flow.tasks.hashing import HashingStats, hash_manifest
from transfer_flow.tasks.heatmaps import ExplanationRow, explain_images, report_heatmaps
from transfer_flow.tasks.listing import list_dataset
from transfer_flow.tasks.logs import stage_logger
from transfer_flow.tasks.prediction import PredictionRow, find_bundle, list_images, predict_images
from transfer_flow.tasks.splitting import split_manifest
from transfer_flow.tasks.training import TrainingResult, TrainingSettings, reusable_bundle, train_head, training_key

CACHED_RESULTS = dict(persist_result=True, result_serializer="json")


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (only a-z, 0-9 and dashes) naming what it is about: `colours-linear-svm-report`.

    Keys are global in Prefect: the Artifacts page shows one history per key, so the dataset and head in
    the key keep the histories of different datasets and heads apart."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-") or "transfer-flow"


def report_artifact_markdown(metrics: ReportMetrics, report_dir: Path, page: Path) -> str:
    """What the report says, readable in the Prefect UI: headline, per-class table, confusion matrix (as a table
    and as the report's picture, embedded: the UI cannot open the file:// report)."""
    per_class = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"] + [
        f"| {name} | {s['precision']:.4f} | {s['recall']:.4f} | {s['f1-score']:.4f} | {int(s['support'])} |"
        for name, s in metrics.per_class.items()]
    picture = report_dir / "confusion_matrix.png"
    embedded = ([f"![confusion matrix](data:image/png;base64,{base64.b64encode(picture.read_bytes()).decode()})", ""]
                if picture.is_file() else [])
    return "\n".join([summary_markdown(metrics), "", "## Per class", "", *per_class, "", "## Confusion matrix", "",
                      confusion_table_markdown(metrics.class_names, metrics.confusion), "", *embedded,
                      f"Full report: `{page}`"])


@task(name="claim output", cache_policy=NONE)
def claimed_output(output: str, dataset: str, store_format: str, overwrite: bool) -> OutputLayout:
    layout = OutputLayout(root=output, store_format=store_format)
    layout.claim(dataset, overwrite=overwrite)
    return layout


@task(name="list images", cache_policy=NONE)
def listed_manifest(
    dataset: str, seed: int, layout: OutputLayout, refresh_hashes: bool
) -> tuple[Manifest, HashingStats]:
    """List the folder and hash what changed since the manifest of the last run in this output."""
    manifest = list_dataset(Path(dataset), seed=seed)
    previous = Manifest.load(layout.manifest) if layout.manifest.is_file() else None
    manifest, stats = hash_manifest(manifest, previous, refresh=refresh_hashes)
    stage_logger().info(
        "list: %d images in %d classes (%d other files ignored%s); hashed %d (%.1f MB) in %.2f s, %d unchanged",
        len(manifest.records),
        len(manifest.class_names),
        sum(manifest.ignored.values()),
        f"; empty classes dropped: {', '.join(manifest.dropped_classes)}" if manifest.dropped_classes else "",
        stats.images_hashed,
        stats.bytes_hashed / 1e6,
        stats.seconds,
        stats.images_reused,
    )
    return manifest, stats


@task(name="split train/test", cache_policy=NONE)
def split(manifest: Manifest, test_size: float, seed: int) -> Manifest:
    return split_manifest(manifest, test_size=test_size, seed=seed)


@task(name="plan extraction", cache_policy=NONE)
def extraction_plan(
    manifest: Manifest, layout: OutputLayout, settings: ExtractionSettings, refresh: bool
) -> ExtractionPlan:
    plan = plan_extraction(manifest, layout.store, settings, refresh=refresh)
    stage_logger().info(
        "extract: %d images to extract with %s (%s, %s, %s)%s",
        len(plan.todo),
        settings.backbone,
        plan.settings.runtime,
        plan.settings.precision,
        plan.weights.describe(),
        "; the store is up to date" if plan.complete else "",
    )
    return plan


def worth_retrying(task, task_run, state) -> bool:
    """A retry helps a shard whose worker died or met a passing fault, not one refused for a reason only the user
    can mend (weights not cached, a vanished folder, a full disk): that would show the same error three times."""
    return not isinstance(state.result(raise_on_failure=False), TransferFlowError)


@task(name="extract shard", cache_policy=NONE, retries=2, retry_condition_fn=worth_retrying)
def extracted_shard(records: list[ImageRecord], root: str, plan: ExtractionPlan) -> int:
    """Decode and extract some images into a committed shard; a retry redoes only this shard."""
    return extract_records(records, Path(root), plan)


def _assembly_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    plan: ExtractionPlan = parameters["plan"]
    if not plan.complete:  # the plan checked that the store exists, has these settings and this manifest
        return None
    return f"extract-{parameters['layout'].root}-{plan.key}-{parameters['manifest'].fingerprint()}"


@task(name="write feature store", cache_key_fn=_assembly_cache_key, **CACHED_RESULTS)
def feature_store(manifest: Manifest, layout: OutputLayout, plan: ExtractionPlan) -> ExtractionResult:
    result = assemble_store(manifest, layout.store, plan)
    manifest.save(layout.manifest)
    log = stage_logger()
    log.info("extract: %d images extracted, %d reused, %d skipped → %s", result.images_extracted,
             result.images_reused, len(result.images_skipped), layout.store)
    for skipped in result.images_skipped:
        log.warning("skipped %s: %s", skipped.path, skipped.reason)
    return result


def _training_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    if parameters["refresh"]:
        return None
    key = training_key(parameters["extraction"].store, parameters["settings"])
    layout: OutputLayout = parameters["layout"]
    return f"train-{layout.root}-{key}" if reusable_bundle(layout.model, key) is not None else None


@task(name="train head", cache_key_fn=_training_cache_key, **CACHED_RESULTS)
def trained_bundle(extraction: ExtractionResult, layout: OutputLayout, settings: TrainingSettings,
                   refresh: bool) -> TrainingResult:
    result = train_head(extraction.store, layout.model, settings, refresh=refresh)
    stage_logger().info("train: %s on %d images, best %s (%s %.4f)%s in %.1f s", settings.head,
                        result.n_train, result.best_params, result.score_name, result.cv_score,
                        " (reused)" if result.cached else "", result.seconds)
    return result


def _evaluation_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    # The result itself is the artefact (no file of ours to go stale): the same head on the same rows, by the
    # same code, scores the same, so the key is offered whenever no refresh is asked.
    if parameters["refresh"]:
        return None
    key = report_key(parameters["training"].bundle, parameters["extraction"].store)
    return f"evaluate-{parameters['layout'].root}-{key}"


@task(name="evaluate", cache_key_fn=_evaluation_cache_key, **CACHED_RESULTS)
def evaluation(training: TrainingResult, extraction: ExtractionResult, layout: OutputLayout,
               refresh: bool) -> Evaluation:
    """Score the head on the test rows (reused for the same head on the same rows; `layout` names the run)."""
    return evaluate_bundle(training.bundle, extraction.store, n_train=training.n_train)


def split_description(folder_splits: bool, test_size: float) -> str:
    """How train and test were chosen, in words, for the report."""
    if folder_splits:
        return "train/ and test/ folders, as laid out"
    return f"random by seeded content hash: about {test_size:.0%} of each class held out for testing"


def run_context(result: Evaluation, extraction: ExtractionResult, training: TrainingResult, split: str) -> RunContext:
    """The report's context: dataset, date, version, seed, split, counts, skipped images, this flow run."""
    from datetime import datetime, timezone

    from prefect.context import FlowRunContext
    from prefect.utilities.urls import url_for

    from transfer_flow.storage.content_keys import package_version

    flow_run = getattr(FlowRunContext.get(), "flow_run", None)
    return RunContext(
        dataset=str(extraction.store.attrs.get("dataset_root", "")),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), version=package_version(),
        seed=int(training.bundle.metadata.head_params.get("seed", 0)), split=split,
        class_counts=result.class_counts,
        skipped=[SkippedImageRecord(path=s.path, reason=s.reason) for s in extraction.images_skipped],
        flow_run_id=str(flow_run.id) if flow_run else None,
        flow_run_url=url_for(flow_run) if flow_run else None,  # None without a UI (a temporary server)
    )


@task(name="write report", cache_policy=NONE)
def report(result: Evaluation, extraction: ExtractionResult, training: TrainingResult, layout: OutputLayout,
           refresh: bool, split: str) -> tuple[ReportMetrics, bool]:
    """Write the report (unless the same head on the same rows already has one) and publish artifacts.
    `split`: how train and test were chosen (split_description).

    Returns the metrics and whether the existing report was kept."""
    spec = training.bundle.metadata
    record = spec.extraction
    key = report_key(training.bundle, extraction.store)
    metrics = ReportMetrics(
        accuracy=result.accuracy, accuracy_ci=result.accuracy_ci, baselines=result.baselines,
        macro_f1=result.macro_f1, n_train=result.n_train, n_test=result.n_test,
        best_params=result.best_params, head=spec.head, backbone=record.backbone,
        weights_source=extraction.weights.describe(), image_size=record.image_size, pooling=record.pooling,
        precision=record.precision, runtime=record.runtime, feature_dim=spec.feature_dim,
        feature_dtype=record.feature_dtype,
        store=str(extraction.store.path), class_names=result.class_names, per_class=result.per_class,
        confusion=result.confusion, training_score=TrainingScore(name=training.score_name, value=training.cv_score),
        n_misclassified=result.n_misclassified, misclassified=result.misclassified,
        correct_examples=result.correct_examples,
        **result.checks.model_dump(exclude={"feature_map_points"}),
        context=run_context(result, extraction, training, split),
        average_precision={name: curve.average_precision for name, curve in result.precision_recall.items()},
        stage_key=key,
    )
    kept = not refresh and read_report_key(layout.report) == key  # same head on the same rows: the report stands
    if not kept:
        root = Path(extraction.store.attrs.get("dataset_root", ""))
        thumbnails = gallery_thumbnails(root, result.misclassified)
        metrics, heatmaps = gallery_heatmaps(training.bundle, root, metrics)
        write_report(layout.report, metrics, result.classification_report, overwrite=True, history=training.history,
                     gallery=list(zip(thumbnails, metrics.misclassified)), heatmaps=heatmaps,
                     checks=data_check_pictures(root, result.checks),
                     precision_recall={name: (curve.recall, curve.precision, curve.average_precision)
                                       for name, curve in result.precision_recall.items()})
    prefix = artifact_key(Path(extraction.store.attrs.get("dataset_root", "")).name, spec.head)
    page = (layout.report / HTML_FILE).resolve()
    create_markdown_artifact(key=f"{prefix}-report", markdown=report_artifact_markdown(metrics, layout.report, page),
                             description=f"{record.backbone} + {spec.head}: headline, per class, confusion matrix")
    create_table_artifact(key=f"{prefix}-per-class", description="Per-class precision, recall, F1 and support",
                          table=[{"class": name, **{k: round(v, 4) for k, v in scores.items()}}
                                 for name, scores in result.per_class.items()])
    create_link_artifact(
        key=f"{prefix}-report-file",
        link=page.as_uri(),
        link_text=f"report: {record.backbone} + {spec.head}",
        description="The self-contained HTML report on the machine that ran the flow (a file:// URL: open it there)",
    )
    stage_logger().info("report: accuracy %.4f, macro F1 %.4f → %s", result.accuracy, result.macro_f1, page)
    return metrics, kept


def head_folder(layout: OutputLayout, head: str) -> Path:
    """Where `compare` puts one head's model/ and report/."""
    return Path(layout.root) / "heads" / head


def gallery_heatmaps(bundle: ModelBundle, root: Path, metrics: ReportMetrics) -> tuple[ReportMetrics, dict]:
    """The report's heatmaps, or none (and a warning) when the bundle's backbone cannot be rebuilt here now: the
    rest of the report stands without them."""
    try:
        return report_heatmaps(bundle, root, metrics)
    except TransferFlowError as error:
        stage_logger().warning("report: no heatmaps: %s", error)
        return metrics, {}


@task(name="score head", cache_policy=NONE)
def head_score(result: Evaluation, training: TrainingResult, layout: OutputLayout) -> HeadScore:
    return HeadScore(head=training.bundle.metadata.head, accuracy=result.accuracy, macro_f1=result.macro_f1,
                     train_seconds=training.fit_seconds, best_params=result.best_params,
                     training_score=f"{training.score_name} {training.cv_score:.4f}", bundle=str(layout.model),
                     report=str(layout.report / HTML_FILE))


@task(name="write comparison", cache_policy=NONE)
def comparison_table(scores: list[HeadScore], layout: OutputLayout, dataset: str) -> tuple[str, str]:
    csv_path, markdown_path = write_comparison(Path(layout.root), scores, f"Heads compared on {dataset}")
    markdown = markdown_path.read_text(encoding="utf-8")
    create_markdown_artifact(key=artifact_key(Path(dataset).name, "head-comparison"), markdown=markdown,
                             description="Heads trained on one feature store")
    stage_logger().info("compare: %s → %s", "; ".join(f"{s.head} {s.accuracy:.4f}/{s.macro_f1:.4f}" for s in scores),
                        csv_path)
    return str(csv_path), str(markdown_path)


@task(name="write run summary", cache_policy=NONE)
def run_summary(summary: RunSummary, layout: OutputLayout) -> RunSummary:
    summary.save(layout.run_summary)
    return summary


# --- batch prediction ---------------------------------------------------------------------------------


@task(name="check predictions output", cache_policy=NONE)
def free_predictions_output(output: str | None, overwrite: bool) -> None:
    if output:
        refuse_existing_predictions(Path(output), overwrite=overwrite)


@task(name="load bundle", cache_policy=NONE)
def prediction_bundle(path: str) -> ModelBundle:
    bundle = find_bundle(Path(path))
    meta, record = bundle.metadata, bundle.metadata.extraction
    stage_logger().info("predict: %s head on %s (%s, %d px, %s pooling), classes %s", meta.head, record.backbone,
                        record.weights.describe(), record.image_size, record.pooling, ", ".join(meta.class_names))
    return bundle


@task(name="list images to label", cache_policy=NONE)
def listed_images(paths: list[str]) -> list[str]:
    images = list_images(paths)
    stage_logger().info("predict: %d images under %s", len(images), ", ".join(paths))
    return images


@task(name="predict labels", cache_policy=NONE)
def predictions(bundle: ModelBundle, images: list[str], top_k: int, batch_size: int) -> list[PredictionRow]:
    rows = predict_images(bundle, images, top_k=top_k, batch_size=batch_size)
    log = stage_logger()
    for row in rows:
        if row.error:
            log.warning("predict: %s: %s", row.path, row.error)
    run_folder = Path(bundle.path).resolve().parent.name  # DIR of DIR/model: the run that trained the bundle
    create_table_artifact(key=artifact_key(run_folder, bundle.metadata.head, "predictions"),
                          description=f"Predicted labels (first 100 of {len(rows)})",
                          table=[{"path": r.path, "label": r.labels[0] if r.labels else "",
                                  "confidence": round(r.confidences[0], 4) if r.confidences else None,
                                  "error": r.error} for r in rows[:100]])
    return rows


@task(name="write predictions", cache_policy=NONE)
def predictions_csv(rows: list[PredictionRow], output: str, top_k: int, overwrite: bool) -> str:
    write_predictions(Path(output), [r.csv_row(top_k) for r in rows], top_k, overwrite=overwrite)
    stage_logger().info("predict: %d rows (%d failed) → %s", len(rows), sum(1 for r in rows if r.error), output)
    return output


# --- heatmaps for any image ---------------------------------------------------------------------------


@task(name="check explanations output", cache_policy=NONE)
def free_explanations_output(output: str, overwrite: bool) -> None:
    refuse_existing_explanations(Path(output), overwrite=overwrite)


@task(name="explain images", cache_policy=NONE)
def explanations(bundle: ModelBundle, images: list[str], output: str, batch_size: int,
                 overwrite: bool) -> list[ExplanationRow]:
    """Heatmap overlays written as they are made into the output folder (renamed into place at the end)."""
    with explanations_folder(Path(output), overwrite=overwrite) as folder:
        rows = explain_images(bundle, images, folder.add_overlay, batch_size=batch_size)
        folder.write_rows([{**row.model_dump(), "confidence": "" if row.confidence is None
                            else f"{row.confidence:.6f}"} for row in rows])
    log = stage_logger()
    for row in rows:
        if row.error:
            log.warning("explain: %s: %s", row.path, row.error)
    log.info("explain: %d images (%d unreadable), %s → %s", len(rows), sum(1 for r in rows if r.error),
             next((r.method for r in rows if r.method), "no heatmap"), output)
    return rows
