"""Several heads on one feature store, wiring only: list → split → extract once → (train → evaluate → report) per head
→ a side-by-side table."""
from __future__ import annotations

import time

from prefect import flow
from pydantic import BaseModel

from flows.settings import CompareSettings
from storage.comparison import HeadScore
from storage.output_layout import OutputLayout
from storage.run_summary import RunSummary, SkippedImageRecord, StageCached, StageSeconds
from tasks import stages


class ComparisonSummary(BaseModel):
    dataset: str
    store: str
    table_csv: str
    table_markdown: str
    scores: list[HeadScore]


@flow(name="compare-heads", log_prints=True)
def compare_heads(settings: CompareSettings) -> ComparisonSummary:
    """Extract the features once, train and evaluate every head in `settings.heads` on them, tabulate.

    Each head gets DIR/heads/<head>/model and report; a rerun reuses the store and every unchanged head."""
    started = time.perf_counter()
    with OutputLayout(root=settings.output).locked(wait=settings.wait):
        layout = stages.claimed_output(settings.output, settings.dataset, settings.store, settings.overwrite)
        manifest, hashing = stages.listed_manifest(settings.dataset, settings.seed, layout, settings.refreshes("hash"))
        manifest = stages.split(manifest, settings.test_size, settings.seed)
        listed = time.perf_counter()
        plan = stages.extraction_plan(manifest, layout, settings.extraction(), settings.refreshes("extract"))
        if plan.todo:
            stages.extracted_shard(plan.todo, manifest.root, plan)
        extraction = stages.feature_store(manifest, layout, plan)
        extracted = time.perf_counter()
        scores, runs = [], []
        for head in settings.heads:
            head_layout = layout.model_copy(update={"root": str(stages.head_folder(layout, head))})
            training = stages.trained_bundle(extraction, head_layout, settings.training(head),
                                             settings.refreshes("train"))
            result = stages.evaluation(training, extraction)
            metrics, report_cached = stages.report(result, extraction, training, head_layout,
                                                   settings.refreshes("report"))
            scores.append(stages.head_score(result, training, head_layout))
            runs.append((result, training, metrics, report_cached, head_layout))
        csv_path, markdown_path = stages.comparison_table(scores, layout, manifest.root)
        # run.json describes the best head (by macro F1), so the folder reads as a run on this dataset.
        result, training, metrics, report_cached, head_layout = max(
            runs, key=lambda run: (run[0].macro_f1, run[0].accuracy))
        stages.run_summary(RunSummary(
            dataset=manifest.root, store=str(layout.store), model=str(head_layout.model),
            report=str(head_layout.report), images_listed=len(manifest.records),
            images_extracted=extraction.images_extracted, images_reused=extraction.images_reused,
            images_skipped=[SkippedImageRecord(**s.model_dump()) for s in extraction.images_skipped],
            images_ignored=sum(manifest.ignored.values()), ignored_by_reason=manifest.ignored,
            dropped_classes=manifest.dropped_classes, classes=manifest.class_names,
            backbone=metrics["backbone"], weights_source=metrics["weights_source"], precision=extraction.precision,
            image_size=metrics["image_size"], pooling=metrics["pooling"],
            accuracy=result.accuracy, macro_f1=result.macro_f1, images_hashed=hashing.images_hashed,
            cached=StageCached(extract=extraction.cached, train=training.cached, report=report_cached),
            seconds=StageSeconds(list=listed - started, extract=extracted - listed,
                                 train=sum(r[1].seconds for r in runs), evaluate=sum(r[0].seconds for r in runs),
                                 total=time.perf_counter() - started),
        ), layout)
        return ComparisonSummary(dataset=manifest.root, store=str(layout.store), table_csv=str(csv_path),
                                 table_markdown=str(markdown_path), scores=scores)
