"""Several heads on one feature store, wiring only: list → split → extract once → (train → evaluate → report) per head
→ a side-by-side table."""
from __future__ import annotations

import time

from prefect import flow
from pydantic import BaseModel

from transfer_flow.flows.pipeline import extracted_features, run_summary_of
from transfer_flow.flows.run_names import training_run_name
from transfer_flow.flows.settings import CompareSettings
from transfer_flow.storage.comparison import HeadScore
from transfer_flow.storage.output_layout import OutputLayout
from transfer_flow.tasks import stages


class ComparisonSummary(BaseModel):
    dataset: str
    store: str
    table_csv: str
    table_markdown: str
    scores: list[HeadScore]


@flow(name="compare-heads", log_prints=True, flow_run_name=training_run_name)
def compare_heads(settings: CompareSettings) -> ComparisonSummary:
    """Extract the features once, train and evaluate every head in `settings.heads` on them, tabulate.

    Each head gets DIR/heads/<head>/model and report; a rerun reuses the store and every unchanged head."""
    started = time.perf_counter()
    with OutputLayout(root=settings.output).locked(wait=settings.wait):
        features = extracted_features(settings)
        layout, extraction = features.layout, features.extraction
        scores, runs = [], []
        split = stages.split_description(features.manifest.folder_splits, settings.test_size)
        for head in settings.heads:
            head_layout = layout.model_copy(update={"root": str(stages.head_folder(layout, head))})
            training = stages.trained_bundle(extraction, head_layout, settings.training(head),
                                             settings.refreshes("train"))
            result = stages.evaluation(training, extraction, head_layout, settings.refreshes("report"))
            metrics, report_cached = stages.report(result, extraction, training, head_layout,
                                                   settings.refreshes("report"), split)
            scores.append(stages.head_score(result, training, head_layout))
            runs.append((result, training, metrics, report_cached, head_layout))
        csv_path, markdown_path = stages.comparison_table(scores, layout, features.manifest.root)
        # run.json describes the best head (by macro F1), so the folder reads as a run on this dataset.
        result, training, metrics, report_cached, head_layout = max(
            runs, key=lambda run: (run[0].macro_f1, run[0].accuracy))
        stages.run_summary(run_summary_of(
            features, training, result, metrics, report_cached, head_layout,
            train_seconds=sum(r[1].seconds for r in runs), evaluate_seconds=sum(r[0].seconds for r in runs),
            total_seconds=time.perf_counter() - started), layout)
        return ComparisonSummary(dataset=features.manifest.root, store=str(layout.store), table_csv=str(csv_path),
                                 table_markdown=str(markdown_path), scores=scores)
