"""Heatmaps end to end under a real Prefect API: the report's gallery gets them, and `explain` draws them for any
image, with a one-line error for a broken one and never over an existing folder unless asked."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import CLASS_COLOURS
from tests.support import check_html, write_colour_images
from transfer_flow.flows.cli import EXIT_USER_ERROR, main
from transfer_flow.flows.explain import explain_with_heatmaps
from transfer_flow.flows.pipeline import transfer_learning
from transfer_flow.flows.settings import ExplainSettings, PipelineSettings
from transfer_flow.storage.errors import OutputExistsError

# Lite0 with its real (offline) weights at 64 px: a 2x2 feature map, features that tell colours apart.
LITE0 = {"backbone": "efficientnet_lite0", "image_size": 64, "batch_size": 16}


@pytest.fixture(scope="module")
def run_with_a_mistake(prefect_api, tmp_path_factory):
    """train/ and test/ folders of colours; a blue image filed under test/red, which the head must get wrong."""
    root = tmp_path_factory.mktemp("planted")
    for k, (name, colour) in enumerate(CLASS_COLOURS.items()):
        write_colour_images(root / "dataset" / "train" / name, colour, 6, seed=k)
        write_colour_images(root / "dataset" / "test" / name, colour, 3, seed=20 + k)
    write_colour_images(root / "planted", CLASS_COLOURS["blue"], 1, seed=99)
    (root / "planted" / "img_000.jpg").rename(root / "dataset" / "test" / "red" / "actually_blue.jpg")
    output = root / "out"
    transfer_learning(PipelineSettings(dataset=str(root / "dataset"), output=str(output), **LITE0))
    return root / "dataset", output


def test_every_gallery_image_has_a_heatmap_file_in_the_report_and_on_the_page(run_with_a_mistake):
    _, output = run_with_a_mistake
    report = output / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["heatmap_method"] == "cam"
    wrong = metrics["misclassified"]
    assert "test/red/actually_blue.jpg" in [item["path"] for item in wrong]
    correct = metrics["correct_examples"]
    assert correct and all(item["true"] == item["predicted"] for item in correct)
    assert max(np.unique([item["true"] for item in correct], return_counts=True)[1]) <= 2
    for item in wrong + correct:
        picture = report / item["heatmap"]
        assert picture.resolve().is_relative_to(report.resolve()) and picture.is_file()
        with Image.open(picture) as image:
            assert image.format == "PNG" and image.size == (128, 128)
    page = (report / "report.html").read_text()
    check_html(page)
    assert "Where the network looked (exact CAM)" in page
    assert page.count('alt="heatmap of') == len(wrong) + len(correct)


def read_rows(folder):
    with open(folder / "explanations.csv", newline="") as file:
        return list(csv.DictReader(file))


def test_explain_draws_each_image_and_records_a_broken_one(run_with_a_mistake, tmp_path):
    dataset, output = run_with_a_mistake
    broken = tmp_path / "broken.jpg"
    broken.write_bytes((dataset / "test" / "green" / "img_000.jpg").read_bytes()[:200])
    images = [dataset / "test" / "red" / "actually_blue.jpg", dataset / "test" / "green" / "img_001.png", broken]
    target = tmp_path / "why"
    summary = explain_with_heatmaps(ExplainSettings(bundle=str(output), paths=[str(p) for p in images],
                                                    output=str(target)))
    rows = read_rows(target)
    assert [r["path"] for r in rows] == [str(p) for p in images] and summary.failed == 1
    assert [r["label"] for r in rows[:2]] == ["blue", "green"] and rows[2]["label"] == ""
    assert rows[2]["error"].startswith("truncated image") and rows[2]["heatmap"] == ""
    assert all(r["method"] == "cam" and 0.3 < float(r["confidence"]) <= 1 for r in rows[:2])
    assert sorted(p.name for p in target.iterdir()) == ["0000-actually_blue.png", "0001-img_001.png",
                                                        "explanations.csv"]
    with Image.open(target / rows[0]["heatmap"]) as image:
        assert image.size == (64, 64)  # as the network saw it
    # An existing folder is never written over silently.
    with pytest.raises(OutputExistsError, match="--overwrite"):
        explain_with_heatmaps(ExplainSettings(bundle=str(output), paths=[str(images[1])], output=str(target)))
    assert len(read_rows(target)) == 3


def test_explain_command_says_one_line_per_problem(run_with_a_mistake, tmp_path, capsys):
    dataset, output = run_with_a_mistake
    image = str(dataset / "test" / "blue" / "img_000.jpg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    target = tmp_path / "out"
    assert main(["explain", str(output / "model"), image, str(empty), "-o", str(target)]) == 0
    printed = capsys.readouterr().out
    assert f"not explained {empty}: empty file" in printed and "1 of 2 images explained" in printed
    assert main(["explain", str(output), image, "-o", str(target)]) == EXIT_USER_ERROR
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "already exists" in error and "--overwrite" in error
    assert main(["explain", str(output), image, "-o", str(target), "--overwrite"]) == 0
    assert len(read_rows(target)) == 1
    assert main(["explain", str(tmp_path / "no-bundle"), image, "-o", str(tmp_path / "x")]) == EXIT_USER_ERROR
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error
