"""A dense-head run end to end: its HTML report embeds curves, confusion matrix and misclassified images,
is linked as a Prefect artifact, and a warm rerun reuses every stage."""
import asyncio
import json
from pathlib import Path

import pytest

from tests.support import FAST, check_html
from transfer_flow.flows.pipeline import transfer_learning
from transfer_flow.flows.settings import PipelineSettings


@pytest.fixture(scope="module")
def dense_run(prefect_api, messy_dataset, tmp_path_factory, compiled_models):
    # The module's own compiled-model cache: no other process can republish the converted backbone (same key,
    # "last rename wins") between this run's extraction and the prediction compared with it below.
    output = tmp_path_factory.mktemp("dense") / "out"
    settings = PipelineSettings(dataset=str(messy_dataset), output=str(output), head="dense", **FAST)
    return settings, transfer_learning(settings), output


def test_dense_report_is_self_contained_html_with_curves_and_gallery(dense_run):
    _, summary, output = dense_run
    report = output / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["head"] == "dense" and metrics["best_params"]["epochs"] >= 1
    assert (output / "model" / "head.keras").is_file() and not (output / "model" / "head.skops").exists()
    page = (report / "report.html").read_text()
    sources = check_html(page).sources
    assert "Training curves" in page and (report / "training_curves.png").is_file()
    assert (report / "confusion_matrix.png").is_file()
    heatmaps = [item["heatmap"] for item in metrics["misclassified"] + metrics["correct_examples"] if item["heatmap"]]
    assert metrics["heatmap_method"] == "grad-cam" and len(heatmaps) == len(metrics["misclassified"]) + len(
        metrics["correct_examples"])
    # Curves, confusion matrix, feature map, precision-recall; thumbnails of the test images it got wrong, the
    # gallery's heatmaps, thumbnails of the suspect labels and of both images of each near-duplicate pair.
    wrong, suspects, pairs = (min(metrics[f"n_{name}"], 48) for name in ("misclassified", "suspect_labels",
                                                                         "near_duplicates"))
    assert len(sources) == 4 + wrong + len(heatmaps) + suspects + 2 * pairs
    assert (report / "feature_map.png").is_file()
    assert metrics["feature_map"]["rows"] == summary.images_listed - len(summary.images_skipped)
    for item in metrics["misclassified"]:
        assert item["path"] in page and item["true"] != item["predicted"] and 0 <= item["confidence"] <= 1
    assert f"{summary.accuracy:.4f}" in page


def test_metrics_carry_an_interval_and_baselines_on_the_same_split(dense_run):
    _, _, output = dense_run
    metrics = json.loads((output / "report" / "metrics.json").read_text())
    low, high = metrics["accuracy_ci"]
    assert 0 <= low <= metrics["accuracy"] <= high <= 1 and high - low > 0.05  # a few dozen test images
    majority = max(metrics["per_class"].values(), key=lambda scores: scores["support"])["support"] / metrics["n_test"]
    # The most frequent train class need not be the most frequent test class: at most that share.
    assert 0 < metrics["baselines"]["majority"] <= majority
    # Plain colours: 16x16 raw pixels separate them almost perfectly.
    assert metrics["baselines"]["raw_pixels"] >= 0.9
    page = (output / "report" / "report.html").read_text()
    assert "baseline: raw 16x16 pixels" in page and f"{metrics['baselines']['raw_pixels']:.4f}" in page


def test_report_gives_the_run_context_counts_skipped_images_and_precision_recall(dense_run):
    import html

    settings, _, output = dense_run
    report = output / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    context = metrics["context"]
    assert Path(context["dataset"]).resolve() == Path(settings.dataset).resolve()
    assert context["seed"] == settings.seed and context["version"] and context["created"].endswith("+00:00")
    assert context["split"].startswith("random") and f"{settings.test_size:.0%}" in context["split"]
    counts = context["class_counts"]
    assert list(counts) == metrics["class_names"]
    assert sum(c["test"] for c in counts.values()) == metrics["n_test"]
    assert [c["test"] for c in counts.values()] == [int(metrics["per_class"][n]["support"]) for n in counts]
    assert sum(c["train"] for c in counts.values()) == metrics["n_train"]
    # The messy dataset's broken files: each named with its reason.
    skipped = {Path(item["path"]).name: item["reason"] for item in context["skipped"]}
    assert {"empty.jpg", "truncated.jpg", "not_really.png"} <= set(skipped) and all(skipped.values())
    assert context["flow_run_id"]

    page = (report / "report.html").read_text()
    for name, c in counts.items():
        assert f"<tr><td>{html.escape(name)}</td><td>{c['train']}</td><td>{c['test']}</td></tr>" in page
    for item in context["skipped"]:
        assert f"<tr><td>{html.escape(item['path'])}</td><td>{html.escape(item['reason'])}</td></tr>" in page
    assert context["flow_run_id"] in page and html.escape(context["split"]) in page
    if context["flow_run_url"]:
        assert f'href="{html.escape(context["flow_run_url"])}"' in page

    assert (report / "precision_recall.png").is_file() and "Precision-recall per class" in page
    assert set(metrics["average_precision"]) == set(metrics["class_names"])
    assert all(0 <= v <= 1 for v in metrics["average_precision"].values())
    assert "Run context" in (report / "report.md").read_text()


def test_report_link_artifact_points_at_the_html(dense_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from transfer_flow.tasks.stages import artifact_key

    settings, _, output = dense_run
    key = artifact_key(Path(settings.dataset).name, "dense", "report-file")

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    links = [str(a.data) for a in asyncio.run(read())]
    assert any((output / "report" / "report.html").resolve().as_uri() in link for link in links)


def test_warm_dense_rerun_reuses_every_stage(dense_run):
    settings, cold, output = dense_run
    warm = transfer_learning(settings)
    assert warm.cached.model_dump() == {"extract": True, "train": True, "report": True}
    assert warm.accuracy == cold.accuracy


def test_a_dense_bundle_labels_new_images_like_its_evaluation(dense_run, messy_dataset):
    import numpy as np

    from transfer_flow.storage.feature_store import open_store, read_contents, read_features
    from transfer_flow.storage.model_bundle import load_bundle, load_head
    from transfer_flow.tasks.heads import class_probabilities
    from transfer_flow.tasks.prediction import predict_images

    settings, _, output = dense_run
    bundle = load_bundle(output / "model")
    store = open_store(output / "features.h5")
    paths = read_contents(store).paths[:6]
    expected = class_probabilities(load_head(bundle), read_features(store, np.arange(6)))
    # Identical by construction, so compared exactly: the same decode, the same converted model compiled for the
    # same batch shape (the extraction's), the same head on six rows. A tolerance could not tell images apart here:
    # this head on random-weight features scores every image about 1/3, images differing by ~1e-4 relative, while
    # even TensorFlow float32 instead of OpenVINO bfloat16 features (1.6% apart) moves the scores by under 2e-6.
    rows = predict_images(bundle, [str(messy_dataset / p) for p in paths] + [str(messy_dataset / "red/empty.jpg")],
                          batch_size=settings.batch_size)
    assert rows[-1].error == "empty file" and not rows[-1].labels
    for row, scores in zip(rows, expected):
        got = dict(zip(row.labels, row.confidences))
        np.testing.assert_array_equal([got[n] for n in bundle.metadata.class_names], scores)
