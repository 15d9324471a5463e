"""The model registry and the promotion rule: first model, better, equal, worse, margin; versions and the pointer."""
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from transfer_flow.storage.errors import BundleError
from transfer_flow.storage.feature_store import create_store, open_store
from transfer_flow.storage.model_bundle import BundleMetadata, save_bundle
from transfer_flow.storage.registry import ModelRegistry, PromotionPolicy, beats
from transfer_flow.tasks.promotion import decide

CLASSES = ["blue", "green", "red"]
CENTRES = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])


def blobs(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n_per_class)
    return (CENTRES[labels] + rng.normal(scale=0.6, size=(len(labels), 2))).astype(np.float32), labels


@pytest.fixture
def store(tmp_path):
    """30 train + 15 test rows of three well-separated classes, with the split and paths a run writes."""
    features, labels = blobs(15, seed=0)
    split = np.where(np.arange(len(labels)) % 3 == 0, "test", "train")
    paths = [f"{CLASSES[y]}/img_{i:03d}.png" for i, y in enumerate(labels)]
    with create_store(
        tmp_path / "features.h5", feature_dim=2, label_names=CLASSES, attrs={"backbone": "fake"}
    ) as writer:
        writer.append(features, labels, paths, list(split))
    return open_store(tmp_path / "features.h5")


def make_run(tmp_path: Path, name: str, *, quality: str, accuracy: float = 0.9, macro_f1: float = 0.9,
             weights_source: str = "path: /weights/mobilenet_v2.weights.h5", C: float = 1.0,
             store: str | None = None) -> dict:
    """A run's bundle and report: `quality` good (true labels) or bad (labels scrambled)."""
    features, labels = blobs(10, seed=1)
    if quality == "bad":
        labels = (labels + 1) % 3  # consistently wrong: scores 0 on any test rows
    head = LogisticRegression(C=C, max_iter=500).fit(features, labels)
    bundle = save_bundle(tmp_path / name / "model", head, BundleMetadata(
        backbone="mobilenet_v2", weights_source=weights_source, image_size=32, pooling="avg", precision="float32",
        preprocessing="mobilenet_v2", feature_dim=2, class_names=CLASSES, head="logreg", head_params={"C": C},
        store_fingerprint=f"store-{store or name}"))
    report = tmp_path / name / "report"
    report.mkdir()
    (report / "report.md").write_text("# transfer-flow report\n")
    (report / "metrics.json").write_text(json.dumps({"accuracy": accuracy, "macro_f1": macro_f1, "n_test": 15}))
    return dict(bundle_dir=Path(bundle.path), report_dir=report, dataset=str(tmp_path / "data"),
                run_output=str(tmp_path / name), metrics={"accuracy": accuracy, "macro_f1": macro_f1}, n_test=15,
                train_rows=[f"path:train_{name}_{i}" for i in range(3)])


def register(registry: ModelRegistry, run: dict):
    entry, _ = registry.register(run["bundle_dir"], run["report_dir"], dataset=run["dataset"],
                                 run_output=run["run_output"], metrics=run["metrics"], n_test=run["n_test"],
                                 train_rows=run["train_rows"])
    return entry


# The rule itself ----------------------------------------------------------------------------------


@pytest.mark.parametrize("challenger, champion, margin, promoted", [
    (0.5, None, 0.0, True),     # first model
    (0.91, 0.90, 0.0, True),    # better
    (0.90, 0.90, 0.0, True),    # equal: at least as good
    (0.89, 0.90, 0.0, False),   # worse
    (0.90, 0.90, 0.01, False),  # equal is not enough with a margin
    (0.81, 0.80, 0.01, True),   # exactly champion + margin (0.80 + 0.01 is 0.8100000000000001 in floats)
])
def test_promotion_rule(challenger, champion, margin, promoted):
    assert beats(challenger, champion, PromotionPolicy(metric="accuracy", margin=margin)) is promoted


def test_policy_refuses_a_margin_outside_0_1():
    with pytest.raises(ValueError):
        PromotionPolicy(margin=-0.1)


# Decisions through the registry, scored on the same held-out rows ----------------------------------


def test_first_model_is_promoted_and_the_decision_is_recorded(tmp_path, store):
    registry = ModelRegistry(tmp_path / "registry")
    assert registry.champion() is None
    entry = register(registry, make_run(tmp_path, "a", quality="bad", macro_f1=0.2))
    decision = decide(registry, entry, store, PromotionPolicy())
    assert decision.promoted and decision.basis == "first-model" and decision.champion is None
    assert decision.challenger_score == 0.2 and decision.champion_score is None
    assert registry.champion().version == entry.version == "v0001"
    assert json.loads((registry.version_dir("v0001") / "decision.json").read_text())["promoted"] is True
    assert "## Promotion" in (registry.version_dir("v0001") / "report" / "report.md").read_text()
    assert [d.challenger for d in registry.decisions()] == ["v0001"]


def test_better_challenger_is_promoted_on_the_same_rows(tmp_path, store):
    registry = ModelRegistry(tmp_path / "registry")
    decide(registry, register(registry, make_run(tmp_path, "a", quality="bad")), store, PromotionPolicy())
    challenger = register(registry, make_run(tmp_path, "b", quality="good"))
    decision = decide(registry, challenger, store, PromotionPolicy(metric="accuracy"))
    assert decision.basis == "same-test-rows" and decision.n_rows == 15
    assert decision.challenger_score == 1.0 and decision.champion_score == 0.0
    assert decision.promoted and registry.champion().version == "v0002"
    assert registry.champion().score == 1.0 and registry.champion().metric == "accuracy"


def test_worse_challenger_is_kept_out(tmp_path, store):
    registry = ModelRegistry(tmp_path / "registry")
    decide(registry, register(registry, make_run(tmp_path, "a", quality="good")), store, PromotionPolicy())
    challenger = register(registry, make_run(tmp_path, "b", quality="bad"))
    decision = decide(registry, challenger, store, PromotionPolicy())
    assert not decision.promoted and decision.champion == "v0001"
    assert decision.challenger_score < decision.champion_score
    assert registry.champion().version == "v0001"
    report = (registry.version_dir("v0002") / "report" / "report.md").read_text()
    assert "Not promoted" in report and "v0001" in report
    assert [d.promoted for d in registry.decisions()] == [True, False]


@pytest.mark.parametrize("margin, promoted", [(0.0, True), (0.05, False)])
def test_equal_challenger_is_promoted_unless_a_margin_is_asked(tmp_path, store, margin, promoted):
    registry = ModelRegistry(tmp_path / "registry")
    decide(registry, register(registry, make_run(tmp_path, "a", quality="good", C=1.0)), store, PromotionPolicy())
    challenger = register(registry, make_run(tmp_path, "b", quality="good", C=10.0))  # another head, same predictions
    decision = decide(registry, challenger, store, PromotionPolicy(margin=margin))
    assert decision.challenger_score == decision.champion_score == 1.0
    assert decision.promoted is promoted
    assert registry.champion().version == ("v0002" if promoted else "v0001")


def test_recorded_metrics_are_compared_when_features_differ_and_the_decision_says_so(tmp_path, store):
    registry = ModelRegistry(tmp_path / "registry")
    first = register(registry, make_run(tmp_path, "a", quality="good", macro_f1=0.7, weights_source="random"))
    decide(registry, first, store, PromotionPolicy())
    challenger = register(registry, make_run(tmp_path, "b", quality="good", macro_f1=0.8, weights_source="random"))
    decision = decide(registry, challenger, store, PromotionPolicy())
    assert decision.basis == "recorded-metrics" and "random-init" in decision.note
    assert (decision.challenger_score, decision.champion_score) == (0.8, 0.7) and decision.promoted
    assert "each on its own test split" in decision.sentence()


# Registry mechanics ------------------------------------------------------------------------------


def test_the_same_model_trained_again_is_not_a_new_version_nor_promoted_over_itself(tmp_path, store):
    registry = ModelRegistry(tmp_path / "registry")
    entry = register(registry, make_run(tmp_path, "a", quality="good"))
    decide(registry, entry, store, PromotionPolicy())
    rerun = make_run(tmp_path, "nightly", quality="good", store="a")  # same rows, same fit, a new skops file
    again, is_new = registry.register(
        rerun["bundle_dir"],
        rerun["report_dir"],
        dataset=rerun["dataset"],
        run_output=rerun["run_output"],
        metrics=rerun["metrics"],
        n_test=15,
        train_rows=[],
    )
    assert not is_new and again.version == "v0001" and len(registry.versions()) == 1
    decision = decide(registry, again, store, PromotionPolicy())
    assert decision.basis == "same-model" and not decision.promoted
    assert registry.champion().version == "v0001"


def test_versions_are_numbered_complete_and_never_collide(tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    runs = [make_run(tmp_path, f"r{i}", quality="good", C=float(i + 1)) for i in range(4)]
    threads = [threading.Thread(target=register, args=(registry, run)) for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    versions = registry.versions()
    assert [v.version for v in versions] == ["v0001", "v0002", "v0003", "v0004"]
    assert len({v.head_sha256 for v in versions}) == 4
    for version in versions:
        folder = registry.version_dir(version.version)
        assert (folder / "bundle" / "bundle.json").is_file() and (folder / "bundle" / "head.skops").is_file()
        assert registry.train_rows(version.version) and registry.bundle(version.version).metadata.feature_dim == 2
    leftovers = [p.name for p in (registry.root / "versions").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_unknown_version_is_a_clear_error(tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    with pytest.raises(BundleError, match="no version v0007"):
        registry.entry("v0007")
    with pytest.raises(BundleError, match="Expected a version"):
        registry.version_dir("../etc")
