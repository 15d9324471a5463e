"""The whole pipeline, wiring only: list → split → extract → train → evaluate → report."""
from __future__ import annotations

import os
import time

from prefect import flow, unmapped
from prefect.utilities.annotations import quote
from prefect_dask import DaskTaskRunner
from pydantic import BaseModel

from transfer_flow.flows.prefect_api import shared_with_workers
from transfer_flow.flows.run_names import training_run_name
from transfer_flow.flows.settings import PipelineSettings
from transfer_flow.storage.manifest import Manifest
from transfer_flow.storage.output_layout import OutputLayout
from transfer_flow.storage.report_metrics import ReportMetrics
from transfer_flow.storage.run_summary import RunSummary, SkippedImageRecord, StageCached, StageSeconds
from transfer_flow.tasks import stages
from transfer_flow.tasks.evaluation import Evaluation
from transfer_flow.tasks.extraction import ExtractionResult
from transfer_flow.tasks.hashing import HashingStats
from transfer_flow.tasks.training import TrainingResult


def dask_task_runner(settings: PipelineSettings) -> DaskTaskRunner:
    """An existing cluster when given an address, else a local one of `settings.workers` processes.

    Each worker runs one shard at a time with an equal share of the cores for TensorFlow; it keeps
    the backbone loaded between shards. With dask-cuda installed, pass the address of a
    LocalCUDACluster (one GPU per worker) started with `dask cuda worker`.
    """
    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    threads = max(1, (os.cpu_count() or 1) // settings.workers)
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": settings.workers, "threads_per_worker": 1, "processes": True,
        "env": {"TF_NUM_INTRAOP_THREADS": str(threads), "TF_NUM_INTEROP_THREADS": "1"},
    })


class ExtractedFeatures(BaseModel):
    """What the shared front of every training flow hands on: the listed images and their store."""

    layout: OutputLayout
    manifest: Manifest
    hashing: HashingStats
    extraction: ExtractionResult
    list_seconds: float
    extract_seconds: float


def extracted_features(settings: PipelineSettings) -> ExtractedFeatures:
    """list → split → extract (in this process, or as shards on Dask); called inside a flow, under the output lock."""
    started = time.perf_counter()
    layout = stages.claimed_output(settings.output, settings.dataset, settings.store, settings.overwrite)
    manifest, hashing = stages.listed_manifest(settings.dataset, settings.seed, layout, settings.refreshes("hash"))
    # quote(): Prefect would otherwise walk (and rebuild) every image record of a parameter looking for futures,
    # twice per task: seconds at 20,000 images, for values that never hold one.
    manifest = stages.split(quote(manifest), settings.test_size, settings.seed)
    listed = time.perf_counter()
    plan = stages.extraction_plan(quote(manifest), layout, settings.extraction(), settings.refreshes("extract"))
    if settings.distributed() and plan.todo:
        with shared_with_workers(), dask_task_runner(settings) as runner:  # shards as Prefect tasks on Dask workers
            # (Not quoted: map hands an annotation inside unmapped() to the task as is.)
            shards = runner.map(stages.extracted_shard, {"records": plan.shards(settings.shard_images),
                                                         "root": unmapped(manifest.root), "plan": unmapped(plan)})
            shards.result()
    elif plan.todo:
        stages.extracted_shard(quote(plan.todo), manifest.root, quote(plan))  # one stream, decode overlapped, here
    extraction = stages.feature_store(quote(manifest), layout, quote(plan))
    return ExtractedFeatures(layout=layout, manifest=manifest, hashing=hashing, extraction=extraction,
                             list_seconds=listed - started, extract_seconds=time.perf_counter() - listed)


def run_summary_of(features: ExtractedFeatures, training: TrainingResult, result: Evaluation,
                   metrics: ReportMetrics, report_cached: bool, model_layout: OutputLayout, *, train_seconds: float,
                   evaluate_seconds: float, total_seconds: float) -> RunSummary:
    manifest, extraction = features.manifest, features.extraction
    return RunSummary(
        dataset=manifest.root, store=str(features.layout.store), model=str(model_layout.model),
        report=str(model_layout.report), images_listed=len(manifest.records),
        images_extracted=extraction.images_extracted, images_reused=extraction.images_reused,
        images_skipped=[SkippedImageRecord(**s.model_dump()) for s in extraction.images_skipped],
        images_ignored=sum(manifest.ignored.values()), ignored_by_reason=manifest.ignored,
        dropped_classes=manifest.dropped_classes, classes=manifest.class_names,
        backbone=metrics.backbone, weights_source=metrics.weights_source, precision=extraction.precision,
        runtime=metrics.runtime, image_size=metrics.image_size, pooling=metrics.pooling,
        accuracy=result.accuracy, macro_f1=result.macro_f1, images_hashed=features.hashing.images_hashed,
        cached=StageCached(extract=extraction.cached, train=training.cached, report=report_cached),
        seconds=StageSeconds(list=features.list_seconds, extract=features.extract_seconds, train=train_seconds,
                             evaluate=evaluate_seconds, total=total_seconds),
    )


@flow(name="transfer-learning", log_prints=True, flow_run_name=training_run_name)
def transfer_learning(settings: PipelineSettings) -> RunSummary:
    """Extract pretrained-CNN features from a folder of labelled images, train a classifier, write a report.

    Reruns into the same output reuse every stage whose inputs did not change.
    """
    started = time.perf_counter()
    with OutputLayout(root=settings.output).locked(wait=settings.wait):  # one writer per output folder
        features = extracted_features(settings)
        extracted = time.perf_counter()
        training = stages.trained_bundle(features.extraction, features.layout, settings.training(),
                                         settings.refreshes("train"))
        trained = time.perf_counter()
        result = stages.evaluation(training, features.extraction, features.layout, settings.refreshes("report"))
        metrics, report_cached = stages.report(
            result, features.extraction, training, features.layout, settings.refreshes("report"),
            stages.split_description(features.manifest.folder_splits, settings.test_size))
        summary = run_summary_of(features, training, result, metrics, report_cached, features.layout,
                                 train_seconds=trained - extracted, evaluate_seconds=time.perf_counter() - trained,
                                 total_seconds=time.perf_counter() - started)
        return stages.run_summary(summary, features.layout)
