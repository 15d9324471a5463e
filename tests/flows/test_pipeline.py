"""The whole flow under a real Prefect API, on a small dataset with broken and odd files."""
import asyncio
import json
import shutil
from pathlib import Path

import pytest

from tests.support import FAST
from transfer_flow.flows.pipeline import transfer_learning
from transfer_flow.flows.settings import PipelineSettings
from transfer_flow.storage.errors import DatasetError, OutputExistsError
from transfer_flow.storage.feature_store import open_store, read_contents
from transfer_flow.tasks.stages import artifact_key


@pytest.fixture(scope="module")
def finished_run(prefect_api, messy_dataset, tmp_path_factory):
    output = tmp_path_factory.mktemp("run") / "out"
    summary = transfer_learning(PipelineSettings(dataset=str(messy_dataset), output=str(output), **FAST))
    return summary, output


def test_run_summary_accounts_for_every_listed_image(finished_run):
    summary, output = finished_run
    on_disk = json.loads((output / "run.json").read_text())
    assert on_disk == json.loads(summary.model_dump_json())
    assert on_disk["images_listed"] == on_disk["images_extracted"] + len(on_disk["images_skipped"])
    assert {s["path"] for s in on_disk["images_skipped"]} == {"red/empty.jpg", "green/truncated.jpg",
                                                               "blue/not_really.png"}
    assert all(s["reason"] for s in on_disk["images_skipped"])
    assert on_disk["images_ignored"] == 3  # README.txt, notes.txt, .hidden.png
    assert on_disk["dropped_classes"] == ["empty_class"]
    assert on_disk["classes"] == ["blue", "green", "red"]
    assert on_disk["weights_source"] == "random" and on_disk["backbone"] == "mobilenet_v2"
    assert set(on_disk["seconds"]) == {"list", "extract", "train", "evaluate", "total"}


def test_store_model_and_report_are_written(finished_run):
    summary, output = finished_run
    store = open_store(output / "features.h5")
    assert store.n_rows == summary.images_extracted
    assert set(read_contents(store).split) == {"train", "test"}
    assert (output / "model" / "bundle.json").is_file() and (output / "model" / "head.skops").is_file()
    metrics = json.loads((output / "report" / "metrics.json").read_text())
    assert metrics["accuracy"] == summary.accuracy
    assert metrics["n_train"] + metrics["n_test"] == summary.images_extracted
    assert set(metrics["per_class"]) == {"blue", "green", "red"} and metrics["best_params"]["C"] > 0
    assert "## Confusion matrix" in (output / "report" / "report.md").read_text()
    assert (output / "report" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert (output / "manifest.json").is_file()


def test_report_is_published_as_prefect_artifacts(finished_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read(key):
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    summary, _ = finished_run
    prefix = artifact_key(Path(summary.dataset).name, "logreg")
    summary_artifacts = asyncio.run(read(f"{prefix}-report"))
    assert any(f"accuracy: **{summary.accuracy:.4f}**" in f"{a.data}" for a in summary_artifacts)
    assert asyncio.run(read(f"{prefix}-per-class"))


def test_output_of_another_dataset_is_refused_without_overwrite(finished_run, colour_dataset):
    _, output = finished_run
    before = (output / "run.json").read_bytes()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        transfer_learning(PipelineSettings(dataset=str(colour_dataset), output=str(output), **FAST))
    assert (output / "run.json").read_bytes() == before


def test_warm_rerun_reuses_every_stage_and_a_deleted_artefact_is_rebuilt(prefect_api, colour_dataset, tmp_path):
    settings = PipelineSettings(dataset=str(colour_dataset), output=str(tmp_path / "out"), **FAST)
    cold = transfer_learning(settings)
    assert cold.images_extracted == 24 and not cold.cached.extract
    for _ in range(2):  # the second warm run is served by Prefect's persisted cache, the first by the stage itself
        warm = transfer_learning(settings)
        assert (warm.images_extracted, warm.images_reused, warm.images_hashed) == (0, 24, 0)
        assert warm.cached.model_dump() == {"extract": True, "train": True, "report": True}
        assert warm.accuracy == cold.accuracy
    (tmp_path / "out" / "features.h5").unlink()
    shutil.rmtree(tmp_path / "out" / "model")
    rebuilt = transfer_learning(settings)
    assert (rebuilt.images_extracted, rebuilt.cached.extract, rebuilt.cached.train) == (24, False, False)
    assert open_store(tmp_path / "out" / "features.h5").n_rows == 24
    assert (tmp_path / "out" / "model" / "head.skops").is_file()
    refreshed = transfer_learning(settings.model_copy(update={"refresh": ["train"]}))
    assert (refreshed.cached.extract, refreshed.cached.train) == (True, False)


def test_zarr_store_in_float16_is_written_reused_and_trained_on(prefect_api, colour_dataset, tmp_path):
    settings = PipelineSettings(dataset=str(colour_dataset), output=str(tmp_path / "out"), store="zarr",
                                feature_dtype="float16", **FAST)
    cold = transfer_learning(settings)
    assert cold.store.endswith("features.zarr") and (tmp_path / "out" / "features.zarr").is_dir()
    store = open_store(tmp_path / "out" / "features.zarr")
    assert store.n_rows == 24 and store.extraction.feature_dtype == "float16"
    warm = transfer_learning(settings)
    assert (warm.images_extracted, warm.images_reused, warm.cached.extract) == (0, 24, True)
    grown = transfer_learning(settings.model_copy(update={"feature_dtype": "float32"}))
    assert grown.images_extracted == 24  # another storage precision never shares rows
    metrics = json.loads((tmp_path / "out" / "report" / "metrics.json").read_text())
    assert metrics["feature_dtype"] == "float32"


def test_dataset_with_one_class_is_a_clear_error(prefect_api, tmp_path):
    from PIL import Image

    (tmp_path / "data" / "only").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / "only" / f"{i}.png")
    with pytest.raises(DatasetError, match="class"):
        transfer_learning(PipelineSettings(dataset=str(tmp_path / "data"), output=str(tmp_path / "out"), **FAST))
    assert not (tmp_path / "out" / "features.h5").exists()


def test_augmented_run_trains_on_every_view_and_evaluates_on_test_images_only(prefect_api, colour_dataset, tmp_path):
    settings = PipelineSettings(dataset=str(colour_dataset), output=str(tmp_path / "out"), augment=3, **FAST)
    cold = transfer_learning(settings)
    contents = read_contents(open_store(tmp_path / "out" / "features.h5"))
    train = [s == "train" for s in contents.split]
    n_test_images = contents.split.count("test")
    assert set(contents.view[train].tolist()) == {0, 1, 2, 3} and n_test_images > 0
    metrics = json.loads((tmp_path / "out" / "report" / "metrics.json").read_text())
    assert metrics["n_test"] == n_test_images and metrics["n_train"] == sum(train) == 4 * (24 - n_test_images)
    warm = transfer_learning(settings)
    assert warm.cached.model_dump() == {"extract": True, "train": True, "report": True}
    assert (cold.images_extracted, warm.images_extracted, warm.accuracy) == (24, 0, cold.accuracy)


def test_finetune_run_reports_both_phases_and_a_warm_rerun_trains_nothing(prefect_api, colour_dataset, tmp_path):
    # Random-init ResNet50: its features still tell colours apart at 32 px (MobileNetV2's shrink to ~1e-13).
    settings = PipelineSettings(dataset=str(colour_dataset), output=str(tmp_path / "out"), backbone="resnet50",
                                weights="none", image_size=32, batch_size=8, head="finetune", epochs=2, unfreeze=12)
    cold = transfer_learning(settings)
    model = tmp_path / "out" / "model"
    bundle = json.loads((model / "bundle.json").read_text())
    assert bundle["head_format"] == "keras-model" and (model / "model.keras").is_file()
    history = bundle["training_summary"]["history"]
    assert len(history["val_loss"]) >= history["fine_tuning_from_epoch"][0] > 1  # both phases' curves
    assert (tmp_path / "out" / "report" / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    on_disk = json.loads((tmp_path / "out" / "run.json").read_text())
    assert on_disk["seconds"]["train"] >= bundle["training_summary"]["fit_seconds"]  # both phases
    warm = transfer_learning(settings)
    assert warm.cached.model_dump() == {"extract": True, "train": True, "report": True}
    assert warm.accuracy == cold.accuracy
    assert json.loads((model / "bundle.json").read_text())["head_sha256"] == bundle["head_sha256"]
