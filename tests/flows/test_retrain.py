"""train-and-promote under a real Prefect API: first model, an unchanged rerun, a grown dataset, the artifact."""
import asyncio
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from transfer_flow.flows.retrain import RegistrySettings, train_and_promote
from transfer_flow.flows.settings import PipelineSettings
from transfer_flow.storage.registry import ModelRegistry


@pytest.fixture(scope="module")
def fixed_weights(tmp_path_factory):
    """MobileNetV2 weights saved once, so that every run extracts the same features (unlike --weights none)."""
    import keras

    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_32.weights.h5"
    keras.utils.set_random_seed(0)
    keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(path)
    return str(path)


@pytest.fixture(scope="module")
def runs(prefect_api, colour_dataset, fixed_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("retrain")
    registry = RegistrySettings(registry=str(root / "registry"), metric="accuracy")

    def run(dataset, name):
        return train_and_promote(
            PipelineSettings(
                dataset=str(dataset),
                output=str(root / name),
                backbone="mobilenet_v2",
                weights=fixed_weights,
                image_size=32,
                batch_size=8,
            ),
            registry,
        )

    first = run(colour_dataset, "nightly")
    unchanged = run(colour_dataset, "nightly")  # the next night, no new images: every stage is reused
    grown = root / "grown"
    shutil.copytree(colour_dataset, grown)
    rng = np.random.default_rng(7)
    for name, colour in {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}.items():
        for i in range(4):
            pixels = np.clip(np.array(colour) + rng.integers(-25, 26, size=(40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(grown / name / f"new_{i}.png")
    later = run(grown, "grown-run")
    return first, unchanged, later, ModelRegistry(registry.registry)


def test_first_model_is_registered_and_promoted(runs):
    first, _, _, registry = runs
    assert first.version == "v0001" and first.champion == "v0001"
    assert first.decision.promoted and first.decision.basis == "first-model"
    assert first.decision.challenger_score == first.run.accuracy
    entry = registry.entry("v0001")
    assert entry.metrics["accuracy"] == first.run.accuracy and entry.backbone == "mobilenet_v2"
    assert (registry.version_dir("v0001") / "bundle" / "head.skops").is_file()
    assert "## Promotion" in (registry.version_dir("v0001") / "report" / "report.md").read_text()


def test_nightly_rerun_on_unchanged_data_reuses_the_caches_and_adds_no_version(runs):
    _, unchanged, _, registry = runs
    assert unchanged.version == "v0001" and unchanged.champion == "v0001"
    assert unchanged.run.cached.extract and unchanged.run.cached.train  # the stage caches did the work
    assert unchanged.decision.basis == "same-model" and not unchanged.decision.promoted


def test_grown_dataset_is_compared_with_the_champion_on_the_same_rows(runs):
    _, _, later, registry = runs
    decision = later.decision
    assert later.version == "v0002" and decision.champion == "v0001"
    assert decision.basis == "same-test-rows" and decision.n_rows >= 1
    assert decision.champion_score is not None
    assert decision.promoted == (decision.challenger_score >= decision.champion_score)
    assert registry.champion().version == later.champion
    on_disk = json.loads((registry.version_dir("v0002") / "decision.json").read_text())
    assert on_disk["challenger_score"] == decision.challenger_score
    assert on_disk["champion_score"] == decision.champion_score
    assert [d.challenger for d in registry.decisions()] == ["v0001", "v0001", "v0002"]


def test_decision_is_published_as_a_prefect_artifact(runs):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["promotion-decision"])))

    artifacts = asyncio.run(read())
    assert artifacts
    assert any("v0002" in str(a.data) and "champion" in str(a.data) for a in artifacts)
