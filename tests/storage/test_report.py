"""The HTML report: well-formed, self-contained (every picture a PNG data URI), escaped, with what it promises."""
import json

import numpy as np

from tests.support import check_html
from transfer_flow.storage.report import read_report_key, write_report
from transfer_flow.storage.report_metrics import Baselines, Misclassified, ReportMetrics, read_metrics


def metrics(names=("cat", "dog <b>", "owl")):
    names = list(names)
    return ReportMetrics(**{"accuracy": 0.5, "macro_f1": 0.45, "n_train": 12, "n_test": 6, "best_params": {"epochs": 4},
            "head": "dense", "backbone": "mobilenet_v2", "weights_source": "random", "image_size": 32,
            "pooling": "avg", "precision": "float32", "feature_dim": 1280, "feature_dtype": "float32",
            "store": "/x/features.h5", "class_names": names,
            "per_class": {n: {"precision": 0.5, "recall": 0.5, "f1-score": 0.5, "support": 2} for n in names},
            "confusion": [[1, 1, 0], [0, 1, 1], [1, 0, 1]], "n_misclassified": 3, "stage_key": "k1"})


def test_html_is_well_formed_and_embeds_every_picture(tmp_path):
    pixels = np.full((96, 96, 3), 200, np.uint8)
    gallery = [(pixels, Misclassified(path="dog/a&b.png", true="dog <b>", predicted="cat", confidence=0.9)),
               (None, Misclassified(path="owl/gone.png", true="owl", predicted="cat", confidence=0.6))]
    history = {"loss": [1.0, 0.6, 0.5], "val_loss": [1.1, 0.8, 0.9], "accuracy": [0.4, 0.7, 0.8],
               "val_accuracy": [0.3, 0.6, 0.6]}
    write_report(tmp_path / "report", metrics(), "text report", overwrite=False, history=history, gallery=gallery)
    page = (tmp_path / "report" / "report.html").read_text()
    checker = check_html(page)
    assert len(checker.sources) == 3  # confusion matrix, curves, one readable thumbnail
    assert "Training curves" in page and "not readable now" in page
    assert "dog &lt;b&gt;" in page and "dog/a&amp;b.png" in page and "<b>dog <b>" not in page
    for name in ("confusion_matrix.png", "training_curves.png", "metrics.json", "report.md"):
        assert (tmp_path / "report" / name).is_file()
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["stage_key"] == "k1"
    assert read_report_key(tmp_path / "report") == "k1"


def test_without_curves_or_mistakes_the_page_says_so(tmp_path):
    write_report(tmp_path / "report", metrics(("a", "b", "c")), "text", overwrite=False)
    page = (tmp_path / "report" / "report.html").read_text()
    assert len(check_html(page).sources) == 1 and "Training curves" not in page
    assert "every test image was labelled correctly" in page
    assert not (tmp_path / "report" / "training_curves.png").exists()
    (tmp_path / "report" / "report.html").unlink()
    assert read_report_key(tmp_path / "report") is None  # an incomplete report is rewritten


def test_metrics_json_reads_back_as_the_record_it_was_written_from(tmp_path):
    written = metrics().model_copy(update={"misclassified": [
        Misclassified(path="owl/x.png", true="owl", predicted="cat", confidence=0.75)]})
    write_report(tmp_path / "report", written, "text", overwrite=False)
    assert read_metrics(tmp_path / "report") == written
    on_disk = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert list(on_disk)[:4] == ["accuracy", "macro_f1", "n_train", "n_test"]  # the file's keys are unchanged
    assert on_disk["misclassified"] == [{"path": "owl/x.png", "true": "owl", "predicted": "cat", "confidence": 0.75,
                                         "heatmap": None}]


def test_headline_shows_the_interval_and_baselines_and_warns_when_raw_pixels_win(tmp_path):
    losing = metrics().model_copy(update={"accuracy": 0.905, "accuracy_ci": (0.874, 0.930),
                                          "baselines": Baselines(majority=0.102, raw_pixels=0.974)})
    write_report(tmp_path / "losing", losing, "text", overwrite=False)
    page = (tmp_path / "losing" / "report.html").read_text()
    check_html(page)
    assert "95% CI 0.874–0.930" in page and "0.1020" in page and "0.9740" in page
    assert "do not beat raw pixels" in page and "fine-tuning" in page
    assert "do not beat raw pixels" in (tmp_path / "losing" / "report.md").read_text()

    winning = losing.model_copy(update={"accuracy": 0.99, "accuracy_ci": (0.97, 1.0)})
    write_report(tmp_path / "winning", winning, "text", overwrite=False)
    assert "do not beat raw pixels" not in (tmp_path / "winning" / "report.html").read_text()


def test_data_checks_draw_the_map_and_warn_of_leakage_on_the_first_screen(tmp_path):
    from transfer_flow.storage.report import DataCheckPictures, FeatureMapPoints
    from transfer_flow.storage.report_metrics import FeatureMapSummary, NearDuplicate, SuspectLabel

    rng = np.random.default_rng(0)
    points = FeatureMapPoints(x=rng.normal(size=30).tolist(), y=rng.normal(size=30).tolist(),
                              labels=[i % 3 for i in range(30)], is_test=[i % 4 == 0 for i in range(30)],
                              is_wrong=[i == 4 for i in range(30)], class_names=["cat", "dog <b>", "owl"])
    suspect = SuspectLabel(path="owl/<odd>.png", label="owl", predicted="cat", confidence=0.93,
                           label_probability=0.02)
    pair = NearDuplicate(paths=["cat/a.png", "cat/a copy.jpg"], similarity=0.991, crosses_split=True)
    checked = metrics().model_copy(update={
        "suspect_labels": [suspect], "n_suspect_labels": 1, "suspect_cutoff": 0.1, "near_duplicates": [pair],
        "n_near_duplicates": 1, "n_near_duplicates_crossing": 1, "near_duplicate_similarity": 0.95,
        "feature_map": FeatureMapSummary(method="t-SNE", points=30, rows=30)})
    pixels = np.full((96, 96, 3), 90, np.uint8)
    write_report(tmp_path / "report", checked, "text", overwrite=False,
                 checks=DataCheckPictures(feature_map=points, suspects=[(pixels, suspect)],
                                          duplicates=[(pixels, None, pair)]))
    page = (tmp_path / "report" / "report.html").read_text()
    assert len(check_html(page).sources) == 4  # confusion matrix, map, the suspect, one readable image of the pair
    assert (tmp_path / "report" / "feature_map.png").read_bytes()[:4] == b"\x89PNG"
    first_screen = page.split("<h2>")[0]
    assert "1 pair(s) of near-identical images sit on both sides of the train/test split" in first_screen
    assert "owl/&lt;odd&gt;.png" in page and "Suspect labels (1)" in page and "0.9910" in page
    assert "1 pair(s) of near-identical" in (tmp_path / "report" / "report.md").read_text()
    assert read_metrics(tmp_path / "report") == checked
