"""The whole pipeline, wiring only: list → split → extract → train → evaluate → report."""
from __future__ import annotations

import os
import time

from prefect import flow, unmapped
from prefect_dask import DaskTaskRunner

from flows.settings import PipelineSettings
from storage.output_layout import OutputLayout
from storage.run_summary import RunSummary, SkippedImageRecord, StageCached, StageSeconds
from tasks import stages


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


@flow(name="transfer-learning", log_prints=True)
def transfer_learning(settings: PipelineSettings) -> RunSummary:
    """Extract pretrained-CNN features from a folder of labelled images, train a classifier, write a report.

    Reruns into the same output reuse every stage whose inputs did not change.
    """
    started = time.perf_counter()
    with OutputLayout(root=settings.output).locked(wait=settings.wait):  # one writer per output folder
        layout = stages.claimed_output(settings.output, settings.dataset, settings.store, settings.overwrite)
        manifest, hashing = stages.listed_manifest(settings.dataset, settings.seed, layout, settings.refreshes("hash"))
        manifest = stages.split(manifest, settings.test_size, settings.seed)
        listed = time.perf_counter()
        plan = stages.extraction_plan(manifest, layout, settings.extraction(), settings.refreshes("extract"))
        if settings.distributed() and plan.todo:
            with dask_task_runner(settings) as runner:  # shards as Prefect tasks on Dask workers
                shards = runner.map(stages.extracted_shard, {"records": plan.shards(settings.shard_images),
                                                             "root": unmapped(manifest.root), "plan": unmapped(plan)})
                shards.result()
        elif plan.todo:
            stages.extracted_shard(plan.todo, manifest.root, plan)  # one stream, decode overlapped, in this process
        extraction = stages.feature_store(manifest, layout, plan)
        extracted = time.perf_counter()
        training = stages.trained_bundle(extraction, layout, settings.training(), settings.refreshes("train"))
        trained = time.perf_counter()
        result = stages.evaluation(training, extraction)
        metrics, report_cached = stages.report(result, extraction, training, layout, settings.refreshes("report"))
        evaluated = time.perf_counter()
        return stages.run_summary(RunSummary(
            dataset=manifest.root, store=str(layout.store), model=str(layout.model), report=str(layout.report),
            images_listed=len(manifest.records), images_extracted=extraction.images_extracted,
            images_reused=extraction.images_reused,
            images_skipped=[SkippedImageRecord(**s.model_dump()) for s in extraction.images_skipped],
            images_ignored=sum(manifest.ignored.values()), ignored_by_reason=manifest.ignored,
            dropped_classes=manifest.dropped_classes, classes=manifest.class_names,
            backbone=metrics["backbone"], weights_source=metrics["weights_source"], precision=extraction.precision,
            image_size=metrics["image_size"], pooling=metrics["pooling"],
            accuracy=result.accuracy, macro_f1=result.macro_f1, images_hashed=hashing.images_hashed,
            cached=StageCached(extract=extraction.cached, train=training.cached, report=report_cached),
            seconds=StageSeconds(list=listed - started, extract=extracted - listed, train=trained - extracted,
                                 evaluate=evaluated - trained, total=time.perf_counter() - started),
        ), layout)
