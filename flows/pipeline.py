"""The whole pipeline, wiring only: list → split → extract → train → evaluate → report."""
from __future__ import annotations

import time

from prefect import flow

from flows.settings import PipelineSettings
from storage.run_summary import RunSummary, SkippedImageRecord, StageSeconds
from tasks import stages


@flow(name="transfer-learning", log_prints=True)
def transfer_learning(settings: PipelineSettings) -> RunSummary:
    """Extract pretrained-CNN features from a folder of labelled images, train a classifier, write a report."""
    started = time.perf_counter()
    layout = stages.claimed_output(settings.output, settings.overwrite)
    manifest = stages.listed_manifest(settings.dataset, settings.seed)
    manifest = stages.split(manifest, settings.test_size, settings.seed)
    listed = time.perf_counter()
    extraction = stages.feature_store(manifest, layout, settings.extraction(), settings.overwrite)
    training = stages.trained_bundle(extraction, layout, settings.training(), settings.overwrite)
    trained = time.perf_counter()
    result = stages.evaluation(training, extraction)
    metrics = stages.report(result, extraction, training, layout, settings.overwrite)
    evaluated = time.perf_counter()
    return stages.run_summary(RunSummary(
        dataset=manifest.root, store=str(layout.store), model=str(layout.model), report=str(layout.report),
        images_listed=len(manifest.records), images_extracted=extraction.images_extracted,
        images_skipped=[SkippedImageRecord(**s.model_dump()) for s in extraction.images_skipped],
        images_ignored=sum(manifest.ignored.values()), ignored_by_reason=manifest.ignored,
        dropped_classes=manifest.dropped_classes, classes=manifest.class_names,
        backbone=metrics["backbone"], weights_source=metrics["weights_source"], precision=extraction.precision,
        image_size=metrics["image_size"], pooling=metrics["pooling"],
        accuracy=result.accuracy, macro_f1=result.macro_f1,
        seconds=StageSeconds(list=listed - started, extract=extraction.seconds, train=training.seconds,
                             evaluate=evaluated - trained, total=time.perf_counter() - started),
    ), layout)
