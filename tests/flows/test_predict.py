"""Batch prediction under a real Prefect API: a bundle trained by the pipeline labels new folders and files."""
import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.support import FAST, write_colour_images
from transfer_flow.flows.cli import EXIT_USER_ERROR, main
from transfer_flow.flows.pipeline import transfer_learning
from transfer_flow.flows.predict import batch_prediction
from transfer_flow.flows.settings import PipelineSettings, PredictionSettings
from transfer_flow.storage.errors import BundleError, OutputExistsError
from transfer_flow.storage.feature_store import open_store, read_contents, read_features
from transfer_flow.storage.model_bundle import load_bundle, load_head
from transfer_flow.tasks.heads import class_probabilities
from transfer_flow.tasks.prediction import bundle_extractor, predict_images


@pytest.fixture(scope="module")
def trained_run(prefect_api, colour_dataset, tmp_path_factory):
    output = tmp_path_factory.mktemp("trained") / "out"
    transfer_learning(PipelineSettings(dataset=str(colour_dataset), output=str(output), **FAST))
    return output


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_folder_with_broken_files_is_labelled_row_by_row(trained_run, messy_dataset, tmp_path):
    target = tmp_path / "preds.csv"
    summary = batch_prediction(PredictionSettings(bundle=str(trained_run / "model"), paths=[str(messy_dataset)],
                                                  output=str(target), top_k=2, batch_size=4))
    rows = read_csv(target)
    assert list(rows[0]) == ["path", "label", "confidence", "label_2", "confidence_2", "error"]
    by_name = {r["path"].removeprefix(str(messy_dataset) + "/"): r for r in rows}
    # Listed like a dataset: images only, hidden files and text skipped, nested folders recursed.
    assert "README.txt" not in by_name and "blue/.hidden.png" not in by_name and "red/nested/2019/deep.JPG" in by_name
    assert len(rows) == summary.images == 24 + 7
    broken = {name for name, r in by_name.items() if r["error"]}
    assert broken == {"red/empty.jpg", "green/truncated.jpg", "blue/not_really.png"} and summary.failed == 3
    assert all(r["label"] == "" for name, r in by_name.items() if name in broken)
    good = [r for name, r in by_name.items() if name not in broken]
    assert all(r["label"] in {"red", "green", "blue"} and r["label_2"] not in ("", r["label"]) for r in good)
    assert all(1 >= float(r["confidence"]) >= float(r["confidence_2"]) >= 0 for r in good)


def test_new_images_get_the_features_and_scores_training_gave_them(trained_run, colour_dataset):
    """Same decode, preprocessing, backbone and head: predicting a training image reproduces its stored row's scores."""
    bundle = load_bundle(trained_run / "model")
    store = open_store(trained_run / "features.h5")
    contents = read_contents(store)
    expected = class_probabilities(load_head(bundle), read_features(store, np.arange(store.n_rows)))
    rows = predict_images(bundle, [str(colour_dataset / p) for p in contents.paths], top_k=3, batch_size=5)
    names = bundle.metadata.class_names
    for row, scores in zip(rows, expected):
        assert row.labels[0] == names[int(np.argmax(scores))]
        got = dict(zip(row.labels, row.confidences))
        np.testing.assert_allclose([got[n] for n in names], scores, rtol=1e-4, atol=1e-6)


def test_existing_csv_is_refused_without_overwrite(trained_run, colour_dataset, tmp_path):
    target = tmp_path / "preds.csv"
    target.write_text("keep me")
    image = str(colour_dataset / "red" / "img_000.jpg")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        batch_prediction(PredictionSettings(bundle=str(trained_run), paths=[image], output=str(target)))
    assert target.read_text() == "keep me"
    batch_prediction(PredictionSettings(bundle=str(trained_run), paths=[image], output=str(target), overwrite=True,
                                        top_k=5))
    rows = read_csv(target)
    # --top-k 5 on a 3-class bundle: three labels, not two more empty column pairs
    assert len(rows) == 1 and rows[0]["label_3"] and "label_4" not in rows[0]
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_prints_csv_and_refuses_to_overwrite(trained_run, colour_dataset, tmp_path, capsys):
    image = str(colour_dataset / "green" / "img_001.png")
    assert main(["predict", str(trained_run), image, "--top-k", "1"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0] == "path,label,confidence,error" and printed[1].startswith(f"{image},")
    target = tmp_path / "out.csv"
    assert main(["predict", str(trained_run), image, "-o", str(target)]) == 0
    assert main(["predict", str(trained_run), image, "-o", str(target)]) == EXIT_USER_ERROR
    assert "--overwrite" in capsys.readouterr().err


def test_bundle_for_another_feature_dimension_is_a_clear_error(trained_run, tmp_path):
    shutil.copytree(trained_run / "model", tmp_path / "model")
    meta = tmp_path / "model" / "bundle.json"
    meta.write_text(meta.read_text().replace('"feature_dim": 1280', '"feature_dim": 512'))
    with pytest.raises(BundleError, match="1280-d"):
        bundle_extractor(load_bundle(tmp_path / "model"))


def _hostile_metadata(meta, damage: str) -> None:
    if damage == "a feature dtype we never write":
        meta.write_text(meta.read_text().replace('"feature_dtype": "float32"', '"feature_dtype": "int8"'))
    elif damage == "not JSON":
        meta.write_bytes(b"\xff\xfe not json")
    else:  # oversized: read whole, it would fill memory first
        meta.write_text(meta.read_text() + " " * (5 * 2**20))


@pytest.mark.parametrize("damage", ["a feature dtype we never write", "not JSON", "oversized"])
def test_a_bundle_whose_metadata_is_hostile_is_one_line_naming_it(trained_run, colour_dataset, tmp_path, capsys,
                                                                   damage):
    shutil.copytree(trained_run / "model", tmp_path / "model")
    meta = tmp_path / "model" / "bundle.json"
    assert '"feature_dtype": "float32"' in meta.read_text()
    _hostile_metadata(meta, damage)
    code = main(["predict", str(tmp_path / "model"), str(colour_dataset / "red" / "img_000.jpg")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("transfer-flow: error:")]
    assert code == EXIT_USER_ERROR and len(errors) == 1 and "Traceback" not in err
    assert str(meta) in errors[0] and "--" not in errors[0].split(str(meta))[0]  # the file, not a flag, is named


@pytest.mark.slow
def test_predict_says_what_matters_once_and_prefects_chatter_only_with_verbose(trained_run, colour_dataset, tmp_path):
    """A user's terminal: the stage lines and the CSV; no telemetry error, no TensorFlow banner, no per-task
    `Finished in state Completed()` unless --verbose (those stay in the run's log in the UI)."""
    from prefect.server.api.server import SubprocessASGIServer

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TF_CPP"))}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_API_URL=SubprocessASGIServer().api_url)  # the harness's
    image = str(colour_dataset / "red" / "img_000.jpg")
    command = [sys.executable, "-m", "transfer_flow.flows.cli", "predict", str(trained_run), image]
    quiet = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert quiet.stdout.startswith("path,label,confidence,label_2")
    assert "predict: 1 images" in quiet.stderr and not task_completions(quiet.stderr)
    assert not [line for line in quiet.stderr.splitlines() if "ERROR" in line or "oneDNN" in line]
    verbose = subprocess.run([*command, "--verbose"], env=env, capture_output=True, text=True, timeout=300)
    assert verbose.returncode == 0 and task_completions(verbose.stderr)


def task_completions(text: str) -> list[str]:
    """Prefect's line for each task run that completed (the flow run's own final line stays on the terminal)."""
    return [line for line in text.splitlines() if "Task run" in line and "Finished in state Completed()" in line]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_an_output_folder_is_refused_with_advice_that_helps(trained_run, colour_dataset, tmp_path, capsys, overwrite):
    """It was an IsADirectoryError traceback with --overwrite, and advice to pass --overwrite without it."""
    image = str(colour_dataset / "red" / "img_000.jpg")
    assert main(["predict", str(trained_run), image, "-o", str(tmp_path), *overwrite]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "is a folder" in err and str(tmp_path / "predictions.csv") in err and "Traceback" not in err
    assert "pass --overwrite" not in err and tmp_path.is_dir()


def test_a_folder_without_images_is_one_line_not_an_empty_csv(trained_run, tmp_path, capsys):
    (tmp_path / "inbox").mkdir()
    code = main(["predict", str(trained_run), str(tmp_path / "inbox"), "-o", str(tmp_path / "p.csv")])
    assert code == EXIT_USER_ERROR
    assert "No images to label under" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


@pytest.fixture(scope="module")
def float16_run_and_a_red_image(prefect_api, tmp_path_factory, compiled_models):
    """A float16 store of grey images from VGG16 scaled so that their features fit float16 and a red image's do
    not (its biases start at zero, so its features scale with its last kernel). Its converted models (~220 MB each)
    go to the module's own cache, not the user's."""
    import keras

    from transfer_flow.tasks.backbones import get_backbone
    from transfer_flow.tasks.images import decoded_batches

    root = tmp_path_factory.mktemp("float16")
    for k, (name, colour) in enumerate({"grey": (124, 117, 104), "slate": (104, 117, 124)}.items()):
        write_colour_images(root / "data" / name, colour, 8, seed=k)
    write_colour_images(root / "new", (220, 30, 30), 1, seed=5)
    red = str(next((root / "new").iterdir()))
    keras.utils.set_random_seed(0)
    spec = get_backbone("vgg16")
    model = spec.build_base((32, 32, 3), None)

    def peak(paths):
        images = np.stack(next(decoded_batches(paths, 32, len(paths))))
        return float(np.abs(np.asarray(model(spec.preprocess(images))).mean(axis=(1, 2))).max())

    trained, new = peak(sorted(str(p) for p in (root / "data").rglob("img_*"))), peak([red])
    assert new > 2 * trained, (trained, new)
    kernel, bias = model.get_layer("block5_conv3").get_weights()
    model.get_layer("block5_conv3").set_weights([kernel * float(np.finfo(np.float16).max) / np.sqrt(trained * new),
                                                 bias])
    model.save_weights(root / "scaled.weights.h5")
    transfer_learning(PipelineSettings(dataset=str(root / "data"), output=str(root / "out"), backbone="vgg16",
                                       weights=str(root / "scaled.weights.h5"), image_size=32, batch_size=8,
                                       feature_dtype="float16"))
    return root / "out", red, str(root / "data" / "grey" / "img_000.jpg")


def test_an_image_beyond_the_stores_dtype_is_an_error_row_in_predict_and_explain(float16_run_and_a_red_image,
                                                                                 tmp_path):
    from transfer_flow.tasks.heatmaps import explain_images

    output, red, grey = float16_run_and_a_red_image
    bundle = load_bundle(output / "model")
    predicted = {row.path: row for row in predict_images(bundle, [red, grey])}
    assert "beyond float16's range" in predicted[red].error and not predicted[red].labels
    assert predicted[grey].labels[0] == "grey" and not predicted[grey].error
    explained = {row.path: row for row in explain_images(bundle, [red, grey], lambda i, path, pixels: f"{i}.png")}
    assert "beyond float16's range" in explained[red].error and not explained[red].heatmap
    assert explained[grey].label == "grey" and explained[grey].heatmap == "1.png"
