"""Champion vs challenger: register a run's bundle, score both on the same held-out rows, apply the rule.

The honest comparison scores both heads on the same images, unseen by either: the challenger run's
test rows minus any row the champion was trained on. That needs the champion's head to read the
challenger's features, which holds only when both came from the same feature extractor (backbone,
the same pretrained weights, input size, pooling, precision, preprocessing) and the same classes.
Otherwise the rule falls back to the scores each recorded on its own test split, and says so. A fine-tuned
champion (a whole network, image in) reads the test images themselves, so only the classes need to agree.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from pydantic import BaseModel
from sklearn.metrics import accuracy_score, f1_score

from transfer_flow.storage.extraction_record import WeightsRecord
from transfer_flow.storage.feature_store import FeatureStore, open_store, read_contents, read_features
from transfer_flow.storage.model_bundle import BundleMetadata, ModelBundle, load_head
from transfer_flow.storage.registry import (
    Decision,
    Metric,
    ModelRegistry,
    PromotionPolicy,
    VersionEntry,
    beats,
    decision_markdown,
    now,
)
from transfer_flow.storage.report_metrics import read_metrics
from transfer_flow.storage.run_summary import RunSummary
from transfer_flow.tasks.logs import stage_logger
from transfer_flow.tasks.prediction import image_probabilities


class Scores(BaseModel):
    """Both scores and where they come from (before the rule is applied)."""

    challenger: float
    champion: float | None
    basis: str
    n_rows: int | None = None
    note: str = ""


def _identities(contents) -> list[str]:
    """One identity per row: the image's content hash when the store has it, else its path in the dataset."""
    hashes = getattr(contents, "hashes", None) or [""] * len(contents.paths)
    return [f"sha:{h}" if h else f"path:{p}" for p, h in zip(contents.paths, hashes)]


def row_identities(store: FeatureStore, splits: tuple[str, ...]) -> list[str]:
    """Identities of the store's rows in `splits`."""
    contents = read_contents(store)
    return [ident for ident, s in zip(_identities(contents), contents.split) if s in splits]


def _weights_identity(weights: WeightsRecord) -> str | None:
    """Which pretrained weights produced the features; None when features are not reproducible (random init)."""
    if weights.source == "random":
        return None
    if weights.source == "path":
        return f"path:{weights.file}"
    return "imagenet"  # keras-cache, offline-package and download all resolve to the same ImageNet weights


def why_not_comparable(champion: BundleMetadata, challenger: BundleMetadata) -> str | None:
    """Why the champion's head cannot be scored on the challenger's features (None: it can)."""
    old, new = champion.extraction, challenger.extraction
    if champion.whole_model:  # it reads the images, whatever features the challenger's store holds
        return _classes_differ(champion, challenger)
    if _weights_identity(old.weights) is None or _weights_identity(new.weights) is None:
        return "random-init weights (--weights none) give different features in every run"
    for field in ("backbone", "image_size", "pooling", "precision", "preprocessing", "runtime", "calibration"):
        a, b = getattr(old, field), getattr(new, field)
        if a != b:
            return f"the feature extractors differ ({field}: {a} vs {b})"
    if champion.feature_dim != challenger.feature_dim:
        return f"the feature extractors differ (feature_dim: {champion.feature_dim} vs {challenger.feature_dim})"
    if _weights_identity(old.weights) != _weights_identity(new.weights):
        return f"the pretrained weights differ ({old.weights.describe()} vs {new.weights.describe()})"
    return _classes_differ(champion, challenger)


def _classes_differ(champion: BundleMetadata, challenger: BundleMetadata) -> str | None:
    if champion.class_names != challenger.class_names:
        return f"the classes differ ({', '.join(champion.class_names)} vs {', '.join(challenger.class_names)})"
    return None


def predicted_labels(bundle: ModelBundle, store: FeatureStore, paths: list[str], rows: np.ndarray) -> np.ndarray:
    """The bundle's labels for the store's `rows`: from their features, or (a fine-tuned network) their images."""
    if bundle.metadata.whole_model:
        return np.argmax(image_probabilities(bundle, Path(store.attrs.get("dataset_root", "")),
                                             [paths[i] for i in rows]), axis=1)
    return load_head(bundle).predict(read_features(store, rows))


def score(predicted: np.ndarray, truth: np.ndarray, metric: Metric, n_classes: int) -> float:
    if metric == "accuracy":
        return float(accuracy_score(truth, predicted))
    return float(f1_score(truth, predicted, labels=list(range(n_classes)), average="macro", zero_division=0))


def compare(challenger: VersionEntry, challenger_bundle: ModelBundle, store: FeatureStore,
            champion: VersionEntry | None, champion_bundle: ModelBundle | None, champion_train_rows: set[str],
            metric: Metric) -> Scores:
    """Score challenger and champion on the held-out rows neither was trained on, when that is possible."""
    if champion is None or champion_bundle is None:
        return Scores(challenger=challenger.metrics[metric], champion=None, basis="first-model")
    reason = why_not_comparable(champion_bundle.metadata, challenger_bundle.metadata)
    if reason is None:
        contents = read_contents(store)
        test = [i for i, (s, v) in enumerate(zip(contents.split, contents.view)) if s == "test" and v == 0]
        identities = _identities(contents)
        rows = np.array([i for i in test if identities[i] not in champion_train_rows], dtype=np.int64)
        if len(rows):
            truth = contents.labels[rows]
            n_classes = len(challenger_bundle.metadata.class_names)
            left_out = len(test) - len(rows)
            return Scores(
                challenger=score(predicted_labels(challenger_bundle, store, contents.paths, rows), truth, metric,
                                 n_classes),
                champion=score(predicted_labels(champion_bundle, store, contents.paths, rows), truth, metric,
                               n_classes),
                basis="same-test-rows", n_rows=len(rows),
                note=f"{left_out} of this run's {len(test)} test rows left out: the champion was trained on them"
                if left_out else "")
        reason = "the champion was trained on every test row of this run"
    return Scores(challenger=challenger.metrics[metric], champion=champion.metrics[metric], basis="recorded-metrics",
                  note=f"not scored on the same rows: {reason}")


def decide(registry: ModelRegistry, challenger: VersionEntry, store: FeatureStore, policy: PromotionPolicy) -> Decision:
    """Compare with the current champion and record the decision, all under the registry's lock."""
    with registry.locked():
        pointer = registry.champion()
        if pointer is not None and pointer.version == challenger.version:
            return registry.record(Decision(
                challenger=challenger.version, champion=pointer.version, metric=policy.metric, margin=policy.margin,
                challenger_score=challenger.metrics[policy.metric], champion_score=challenger.metrics[policy.metric],
                basis="same-model", note="this run produced the champion's bundle again (nothing changed)",
                promoted=False, decided_at=now()))
        champion = registry.entry(pointer.version) if pointer else None
        scores = compare(challenger, registry.bundle(challenger.version), store, champion,
                         registry.bundle(champion.version) if champion else None,
                         registry.train_rows(champion.version) if champion else set(), policy.metric)
        return registry.record(Decision(
            challenger=challenger.version, champion=champion.version if champion else None, metric=policy.metric,
            margin=policy.margin, challenger_score=scores.challenger, champion_score=scores.champion,
            basis=scores.basis, n_rows=scores.n_rows, note=scores.note,
            promoted=beats(scores.challenger, scores.champion, policy), decided_at=now()))


# Prefect tasks ------------------------------------------------------------------------------------


@task(name="register challenger", cache_policy=NONE)
def registered_challenger(summary: RunSummary, output: str, registry: str) -> VersionEntry:
    store = open_store(Path(summary.store))
    metrics = read_metrics(Path(summary.report))
    entry, is_new = ModelRegistry(registry).register(
        Path(summary.model), Path(summary.report), dataset=summary.dataset, run_output=output,
        metrics={"accuracy": metrics.accuracy, "macro_f1": metrics.macro_f1}, n_test=metrics.n_test,
        train_rows=row_identities(store, ("train", "val")))
    stage_logger().info("registry: %s %s in %s", "registered" if is_new else "unchanged bundle, already",
                        entry.version, registry)
    return entry


@task(name="decide promotion", cache_policy=NONE)
def promotion_decision(challenger: VersionEntry, summary: RunSummary, registry: str,
                       policy: PromotionPolicy) -> Decision:
    decision = decide(ModelRegistry(registry), challenger, open_store(Path(summary.store)), policy)
    stage_logger().info("promotion: %s", decision.sentence())
    create_markdown_artifact(key="promotion-decision", markdown=decision_markdown(decision),
                             description=f"Champion/challenger decision for {challenger.version}")
    return decision
