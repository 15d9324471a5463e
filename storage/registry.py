"""The model registry: every trained bundle as a numbered version, one `champion` pointer, and the promotion rule.

```
REGISTRY/
  champion.json                  the pointer: {"version": "v0003", "metric": ..., "score": ..., "promoted_at": ...}
  versions/v0001/
    bundle/                      copy of the run's model bundle (bundle.json + head.skops)
    report/                      copy of the run's report (+ a "Promotion" section once decided)
    entry.json                   what was registered: dataset, run folder, metrics, feature extractor
    train_rows.json              identities of the rows the head was trained on (content hashes, else paths)
    decision.json                the promotion decision taken when this version was the challenger
  decisions/                     every decision, one file each (a version registered twice is decided twice)
  .lock                          flock held while registering and deciding, so two retrains never interleave
```

A version folder is assembled under a temporary name and renamed into place complete; the pointer is
replaced with an atomic rename, so a reader sees the old champion or the new one, never a mix.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from transfer_flow.storage.atomic import chmod_as_new, file_lock, write_json, write_text
from transfer_flow.storage.errors import BundleError
from transfer_flow.storage.model_bundle import ModelBundle, load_bundle, load_head

Metric = Literal["accuracy", "macro_f1"]
Basis = Literal["first-model", "same-test-rows", "recorded-metrics", "same-model"]

VERSIONS = "versions"
DECISIONS = "decisions"
POINTER = "champion.json"
_VERSION_NAME = re.compile(r"^v(\d{4,})$")
_TOLERANCE = 1e-9  # scores are fractions of a test set: this only absorbs float rounding of champion + margin


class PromotionPolicy(BaseModel):
    """When a challenger replaces the champion."""

    metric: Metric = Field(
        default="macro_f1",
        description="Score compared: accuracy, or macro F1 (each class counts the same, whatever its size).",
    )
    margin: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="The challenger is promoted when its score is at least the champion's plus this margin.",
    )


class VersionEntry(BaseModel):
    """One registered version (entry.json)."""

    version: str
    registered: str
    dataset: str = Field(description="Dataset folder the run read.")
    run_output: str = Field(description="The run's --output folder.")
    backbone: str
    weights_source: str
    feature_dim: int
    class_names: list[str]
    head_sha256: str
    model_fingerprint: str = Field(description="Hash of the fitted head's parameters and arrays (skops files embed "
                                               "timestamps, so equal models have different file hashes).")
    store_fingerprint: str
    metrics: dict[str, float] = Field(description="accuracy and macro_f1 on the run's own test split.")
    n_test: int


class ChampionPointer(BaseModel):
    """champion.json."""

    version: str
    metric: Metric
    score: float
    promoted_at: str


class Decision(BaseModel):
    """One champion/challenger decision, with both scores and how they were obtained."""

    challenger: str
    champion: str | None = Field(description="The champion before the decision (None: there was none).")
    metric: Metric
    margin: float
    challenger_score: float
    champion_score: float | None
    basis: Basis = Field(
        description="first-model | same-test-rows (both heads scored on the same held-out rows) | "
        "recorded-metrics (each scored on its own test split) | same-model (identical bundle)"
    )
    n_rows: int | None = Field(default=None, description="Held-out rows both were scored on (same-test-rows only).")
    note: str = ""
    promoted: bool
    decided_at: str

    def sentence(self) -> str:
        if self.basis == "first-model":
            return f"{self.challenger} promoted: first model ({self.metric} {self.challenger_score:.4f})."
        if self.basis == "same-model":
            return f"{self.challenger} is the same model as the champion {self.champion}; nothing to promote."
        verdict = "promoted" if self.promoted else "not promoted"
        rule = f"{self.challenger_score:.4f} {'≥' if self.promoted else '<'} {self.champion_score:.4f}"
        rule += f" + {self.margin:g}" if self.margin else ""
        where = (f"on the same {self.n_rows} held-out rows" if self.basis == "same-test-rows"
                 else "from recorded metrics (each on its own test split)")
        return f"{self.challenger} {verdict} over {self.champion}: {self.metric} {rule}, {where}."


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def beats(challenger_score: float, champion_score: float | None, policy: PromotionPolicy) -> bool:
    """The promotion rule: no champion, or challenger ≥ champion + margin."""
    if champion_score is None:
        return True
    return challenger_score >= champion_score + policy.margin - _TOLERANCE


class ModelRegistry:
    """A registry folder (created on first use)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    # Reading --------------------------------------------------------------------------------------

    def versions(self) -> list[VersionEntry]:
        folder = self.root / VERSIONS
        if not folder.is_dir():
            return []
        names = sorted((p.name for p in folder.iterdir() if _VERSION_NAME.match(p.name)), key=_version_number)
        return [self.entry(name) for name in names]

    def entry(self, version: str) -> VersionEntry:
        source = self.version_dir(version) / "entry.json"
        if not source.is_file():
            raise BundleError(f"Registry {self.root} has no version {version}")
        return VersionEntry.model_validate_json(source.read_text(encoding="utf-8"))

    def version_dir(self, version: str) -> Path:
        if not _VERSION_NAME.match(version):
            raise BundleError(f"Expected a version like v0001, got {version!r}")
        return self.root / VERSIONS / version

    def bundle(self, version: str) -> ModelBundle:
        return load_bundle(self.version_dir(version) / "bundle")

    def train_rows(self, version: str) -> set[str]:
        return set(json.loads((self.version_dir(version) / "train_rows.json").read_text(encoding="utf-8")))

    def champion(self) -> ChampionPointer | None:
        source = self.root / POINTER
        if not source.is_file():
            return None
        return ChampionPointer.model_validate_json(source.read_text(encoding="utf-8"))

    def decisions(self) -> list[Decision]:
        folder = self.root / DECISIONS
        if not folder.is_dir():
            return []
        return [Decision.model_validate_json(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]

    # Writing --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the registry's lock (an OS lock: it dies with its process, never goes stale)."""
        with file_lock(self.root / ".lock"):
            yield

    def register(self, bundle_dir: Path, report_dir: Path | None, *, dataset: str, run_output: str,
                 metrics: dict[str, float], n_test: int, train_rows: Sequence[str]) -> tuple[VersionEntry, bool]:
        """Copy a run's bundle (and report) in as the next version; returns (entry, is_new).

        A bundle equal to a registered one (same fitted head, same feature rows) is not copied
        again: that version is returned with is_new=False.
        """
        bundle = load_bundle(Path(bundle_dir))
        meta = bundle.metadata
        fingerprint = model_fingerprint(bundle)
        with self.locked():
            for existing in self.versions():
                if existing.model_fingerprint == fingerprint and existing.store_fingerprint == meta.store_fingerprint:
                    return existing, False
            versions = self.root / VERSIONS
            versions.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".new-version.", suffix=".tmp", dir=versions))
            try:
                shutil.copytree(bundle_dir, tmp / "bundle")
                if report_dir is not None and Path(report_dir).is_dir():
                    shutil.copytree(report_dir, tmp / "report")
                (tmp / "train_rows.json").write_text(json.dumps(sorted(set(train_rows))) + "\n", encoding="utf-8")
                number = max((_version_number(e.version) for e in self.versions()), default=0) + 1
                entry = VersionEntry(
                    version=f"v{number:04d}", registered=now(), dataset=str(dataset), run_output=str(run_output),
                    backbone=meta.extraction.backbone, weights_source=meta.extraction.weights.describe(),
                    feature_dim=meta.feature_dim,
                    class_names=meta.class_names, head_sha256=meta.head_sha256, model_fingerprint=fingerprint,
                    store_fingerprint=meta.store_fingerprint,
                    metrics={k: float(metrics[k]) for k in ("accuracy", "macro_f1")}, n_test=int(n_test),
                )
                (tmp / "entry.json").write_text(entry.model_dump_json(indent=2) + "\n", encoding="utf-8")
                chmod_as_new(tmp)
                os.rename(tmp, versions / entry.version)  # fails rather than replace: versions are never rewritten
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            return entry, True

    def record(self, decision: Decision) -> Decision:
        """Write the decision; move the champion pointer when it says so. Call under `locked()`."""
        folder = self.root / DECISIONS
        stamp = decision.decided_at.replace(":", "-")
        write_json(folder / f"{stamp}-{decision.challenger}-{uuid.uuid4().hex[:6]}.json",
                   decision.model_dump(mode="json"), overwrite=False)
        version_dir = self.version_dir(decision.challenger)
        if decision.basis != "same-model":
            write_json(version_dir / "decision.json", decision.model_dump(mode="json"))
            report = version_dir / "report" / "report.md"
            if report.is_file():
                write_text(report, report.read_text(encoding="utf-8").rstrip() + "\n\n" + decision_markdown(decision))
        if decision.promoted:
            write_json(self.root / POINTER, ChampionPointer(
                version=decision.challenger, metric=decision.metric, score=decision.challenger_score,
                promoted_at=decision.decided_at).model_dump(mode="json"))
        return decision


def decision_markdown(decision: Decision) -> str:
    """The "Promotion" section of the report and the body of the Prefect artifact."""
    def score(value: float | None) -> str:
        return "—" if value is None else f"{value:.4f}"

    basis = {
        "first-model": "no champion yet",
        "same-test-rows": f"both scored on the same {decision.n_rows} held-out rows",
        "recorded-metrics": "recorded metrics, each from its own test split (not the same rows)",
        "same-model": "identical bundle",
    }[decision.basis]
    lines = [
        "## Promotion", "",
        f"**{'Promoted' if decision.promoted else 'Not promoted'}**: {decision.sentence()}", "",
        f"| | version | {decision.metric} |", "|---|---|---|",
        f"| challenger | {decision.challenger} | {score(decision.challenger_score)} |",
        f"| champion before | {decision.champion or '—'} | {score(decision.champion_score)} |", "",
        f"- rule: challenger ≥ champion + {decision.margin:g} ({decision.metric})",
        f"- basis: {basis}",
    ]
    if decision.note:
        lines.append(f"- note: {decision.note}")
    return "\n".join(lines) + "\n"


def model_fingerprint(bundle: ModelBundle) -> str:
    """What the head computes: its class, hyper-parameters and fitted arrays (the `*_` attributes)."""
    head = load_head(bundle)
    digest = hashlib.sha256(type(head).__qualname__.encode())
    params = head.get_params(deep=False) if hasattr(head, "get_params") else {}
    digest.update(json.dumps(params, sort_keys=True, default=str).encode())
    for name in sorted(vars(head)):
        if not name.endswith("_") or name.startswith("_"):
            continue
        value = getattr(head, name)
        digest.update(f"\n{name}\0".encode())
        if isinstance(value, np.ndarray) and value.dtype != object:
            digest.update(f"{value.dtype.str}{value.shape}".encode() + np.ascontiguousarray(value).tobytes())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()[:16]


def _version_number(name: str) -> int:
    match = _VERSION_NAME.match(name)
    return int(match.group(1)) if match else 0
