"""Model bundles: a trained head plus everything needed to label new images the same way.

The head is stored with skops (no pickle), and its SHA-256 is recorded in bundle.json and checked
before loading, so an altered or swapped file is refused rather than deserialised.
"""
from __future__ import annotations

import datetime as dt
import hashlib
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from storage.atomic import atomic_path
from storage.errors import BundleError, OutputExistsError

HEAD_FILE = "head.skops"
METADATA_FILE = "bundle.json"
_TRUSTED_MODULE_PREFIXES = ("sklearn.", "numpy.", "builtins.")  # what a scikit-learn head may contain


class BundleMetadata(BaseModel):
    backbone: str
    weights_source: str
    image_size: int
    pooling: str
    precision: str
    preprocessing: str
    feature_dim: int
    class_names: list[str]
    head: str
    head_params: dict[str, Any] = Field(default_factory=dict)
    store_fingerprint: str
    stage_key: str = Field(default="", description="Cache key of the training that made this bundle.")
    training_summary: dict[str, Any] = Field(default_factory=dict, description="n_train, best_params, cv_score.")
    head_sha256: str = ""
    created: str = ""
    library_versions: dict[str, str] = Field(default_factory=dict)


class ModelBundle(BaseModel):
    """A saved bundle: where it is and what it holds."""

    path: str
    metadata: BundleMetadata


def _versions() -> dict[str, str]:
    names = ("transfer-flow", "scikit-learn", "keras", "tensorflow-cpu", "numpy", "skops")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def save_bundle(directory: Path, head: Any, bundle_metadata: BundleMetadata, *, overwrite: bool = False) -> ModelBundle:
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise OutputExistsError(f"Model bundle {directory} already exists (pass --overwrite to replace it)")
    import skops.io as sio  # deferred: it imports scikit-learn's whole type registry (seconds)

    payload = sio.dumps(head)
    final = bundle_metadata.model_copy(update={
        "head_sha256": hashlib.sha256(payload).hexdigest(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "library_versions": _versions(),
    })
    with atomic_path(directory, overwrite=overwrite, is_dir=True) as tmp:
        (tmp / HEAD_FILE).write_bytes(payload)
        (tmp / METADATA_FILE).write_text(final.model_dump_json(indent=2), encoding="utf-8")
    return ModelBundle(path=str(directory), metadata=final)


def read_bundle_metadata(directory: Path) -> BundleMetadata:
    source = Path(directory) / METADATA_FILE
    if not source.is_file():
        raise BundleError(f"{directory} is not a model bundle: {METADATA_FILE} is missing")
    return BundleMetadata.model_validate_json(source.read_text(encoding="utf-8"))


def load_head(bundle: ModelBundle) -> Any:
    """The trained head, after checking its hash and that it holds only scikit-learn/numpy types."""
    payload = (Path(bundle.path) / HEAD_FILE).read_bytes()
    if hashlib.sha256(payload).hexdigest() != bundle.metadata.head_sha256:
        raise BundleError(f"{bundle.path}/{HEAD_FILE} does not match the hash recorded in {METADATA_FILE}: refusing to load it")
    import skops.io as sio

    untrusted = sio.get_untrusted_types(data=payload)
    unexpected = [t for t in untrusted if not t.startswith(_TRUSTED_MODULE_PREFIXES)]
    if unexpected:
        raise BundleError(f"{bundle.path}/{HEAD_FILE} contains unexpected types: {', '.join(unexpected)}")
    return sio.loads(payload, trusted=untrusted)


def head_matches(bundle: ModelBundle) -> bool:
    """The head file is there and is the one bundle.json describes."""
    head = Path(bundle.path) / HEAD_FILE
    return head.is_file() and hashlib.sha256(head.read_bytes()).hexdigest() == bundle.metadata.head_sha256


def load_bundle(directory: Path) -> ModelBundle:
    return ModelBundle(path=str(directory), metadata=read_bundle_metadata(directory))
