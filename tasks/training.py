"""Training: a FeatureStore's train rows → a fitted head, saved as a ModelBundle."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from transfer_flow.storage.content_keys import content_key, package_version
from transfer_flow.storage.errors import BundleError, DatasetError, SettingsError, StoreError
from transfer_flow.storage.extraction_record import ExtractionRecord
from transfer_flow.storage.feature_store import (
    FeatureStore,
    read_contents,
    read_features,
    rows_per_chunk,
)
from transfer_flow.storage.model_bundle import BundleMetadata, ModelBundle, head_matches, load_bundle, save_bundle
from transfer_flow.tasks.backbones import BACKBONES, get_backbone, recorded_weights
from transfer_flow.tasks.extraction import recorded_extractor
from transfer_flow.tasks.heads import HEADS, HeadInputs, HeadName, TrainingImages, heads_help
from transfer_flow.tasks.heads.sgd import SGD_FEWEST_EPOCHS, SGD_MOST_EPOCHS, SGD_ROW_UPDATES
from transfer_flow.tasks.logs import stage_logger

CLASSIC_C_GRID = [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0]  # the classic recipe's grid
# sgd's default block: 8 row chunks (~8 MiB of features, so memory stays flat). One chunk (204 rows of 1,280-d)
# made 16k rows 80 partial_fit calls an epoch, each one classifier per class: Python overhead, not arithmetic.
SGD_BLOCK_CHUNKS = 8

__all__ = ["HeadName", "TrainingResult", "TrainingSettings", "train_head", "training_key"]


class TrainingSettings(BaseModel):
    head: HeadName = Field(
        default="logreg",
        description=f"Classifier trained on the frozen features: {heads_help()}.",
    )
    c_grid: list[float] = Field(
        default_factory=lambda: list(CLASSIC_C_GRID),
        description="Values of C searched by cross-validation (logreg, linear-svm).",
    )
    cv_folds: int = Field(
        default=3, ge=2, description="Cross-validation folds for the search over C (when no val/ folder)."
    )
    max_iter: int = Field(default=1000, ge=1)
    seed: int = 42
    sgd_alpha: float = Field(default=3e-4, gt=0, description="sgd: regularisation strength.")
    sgd_epochs: int | None = Field(
        default=None, ge=1,
        description=f"sgd: passes over the store; empty: enough for ~{SGD_ROW_UPDATES:,} row updates, "
        f"{SGD_FEWEST_EPOCHS} to {SGD_MOST_EPOCHS} passes (more rows need fewer).",
    )
    sgd_block_rows: int | None = Field(
        default=None, ge=1, description="sgd: rows read at a time; empty: 8 of the store's row chunks (~8 MiB)."
    )
    epochs: int | None = Field(
        default=None, ge=1,
        description="Most epochs of a head trained by epochs (early stopping usually ends sooner); empty: the head's "
        "default (dense, gap: 100; finetune: 20 of fine-tuning, after its head's own training on the features).",
    )
    patience: int = Field(
        default=8, ge=1, description="dense, gap, finetune: epochs without a better validation loss before stopping."
    )
    validation_fraction: float = Field(
        default=0.2,
        gt=0,
        lt=1,
        description="dense, gap, finetune: share of train carved off for early stopping (when no val/ folder).",
    )
    dense_batch_size: int = Field(default=32, ge=1, description="dense, gap, finetune: rows per gradient step.")
    learning_rate: float | None = Field(
        default=None, gt=0,
        description="Adam's learning rate of a head trained by epochs; empty: the head's default (dense, gap: 0.001; "
        "finetune: 0.0001 for the backbone's top layers with the head).",
    )
    unfreeze: int | None = Field(
        default=None, ge=0,
        description="finetune: the backbone's top layers trained with the head (BatchNormalization layers stay "
        "frozen); empty: the backbone's default ("
        + ", ".join(f"{name}: {spec.finetune_layers}" for name, spec in BACKBONES.items()) + ").",
    )
    flip: bool = Field(
        default=False,
        description="finetune: also mirror training images left-right on the fly (photos; not digits or text, "
        "where a mirrored symbol is another one).",
    )

    def resolved(self) -> TrainingSettings:
        """These settings with the head's own defaults where none was given (what its fit receives)."""
        spec = HEADS[self.head]
        return self.model_copy(update={"epochs": self.epochs or spec.epochs,
                                       "learning_rate": self.learning_rate or spec.learning_rate})

    def head_settings(self) -> dict:
        """The settings that decide this head (what the stage key and the bundle record)."""
        own, resolved = HEADS[self.head].settings, self.resolved()
        return {"head": self.head, "seed": self.seed, **{name: getattr(resolved, name) for name in own}}


class TrainingResult(BaseModel):
    bundle: ModelBundle
    n_train: int
    best_params: dict[str, float]
    cv_score: float
    score_name: str = "cv accuracy"
    history: dict[str, list[float]] = Field(default_factory=dict,
                                            description="Per-epoch curves (dense, gap; finetune: both phases).")
    fit_seconds: float = Field(
        default=0.0, description="How long the fit took when the bundle was made (also when reused)."
    )
    cached: bool = False
    seconds: float


# Bump when the same store and settings give another head (3: sgd blocks; 4: dense refit; 5: sgd passes by rows).
TRAINING_CODE_VERSION = 5


def training_key(store: FeatureStore, settings: TrainingSettings) -> str:
    # Only the chosen head's own settings: changing the dense head's epochs keeps a logreg bundle valid.
    return content_key(store.fingerprint(), settings.head_settings(), TRAINING_CODE_VERSION, package_version())


def reusable_bundle(bundle_dir: Path, key: str) -> ModelBundle | None:
    """The bundle in `bundle_dir` if training `key` made it and its head file is intact."""
    try:
        bundle = load_bundle(bundle_dir)
    except (BundleError, ValueError):
        return None
    return bundle if bundle.metadata.stage_key == key and head_matches(bundle) else None


def extraction_of(store: FeatureStore) -> ExtractionRecord:
    """The store's extraction record, which a bundle must carry to label new images the same way."""
    if store.extraction is None:
        raise StoreError(f"{store.path} records no extraction (backbone, weights, image size, pooling...): "
                         "train on a store written by transfer-flow extract")
    return store.extraction


def carried_backbone(store: FeatureStore, record: ExtractionRecord) -> Path | None:
    """The converted model a bundle of these rows carries: int8's, from the compiled-model cache (it cannot be made
    again without the training images); None for other precisions, or, with a warning, when the cache lacks it
    (then the bundle predicts only where the cache has it)."""
    if record.runtime != "openvino" or record.precision != "int8":
        return None
    from transfer_flow.tasks.runtimes.openvino_runtime import cached_entry

    weights = recorded_weights(record.weights, f"Store {store.path}", StoreError)
    folder = cached_entry(recorded_extractor(record, weights).forward_request())
    if folder is None:
        stage_logger().warning("train: the int8 model of %s is not in the compiled-model cache: the bundle cannot "
                               "carry it, and predicts only where the cache has it", store.path)
    return folder


def feature_map_shape(store: FeatureStore, head: str) -> tuple[int, int, int]:
    """(height, width, channels) of the unpooled map a `--pooling flatten` store holds, for a head that pools
    it itself (gap)."""
    record = extraction_of(store)
    if record.pooling != "flatten":
        raise SettingsError(f"--head {head} pools the backbone's feature map itself: it needs a store of unpooled "
                            f"maps (--pooling flatten), this one is pooled with {record.pooling}")
    spec = get_backbone(record.backbone)
    side = spec.feature_side(record.image_size)
    if side * side * spec.channels != store.feature_dim:
        raise StoreError(f"{store.path}: {store.feature_dim}-d rows are not a {side}x{side}x{spec.channels} map")
    return side, side, spec.channels


def train_head(
    store: FeatureStore, bundle_dir: Path, settings: TrainingSettings, *, refresh: bool = False
) -> TrainingResult:
    """Fit the head on the store's train (and val) rows and save it in `bundle_dir`, unless the bundle there
    was made from the same rows and settings (then it is returned as is)."""
    started = time.perf_counter()
    key = training_key(store, settings)
    previous = None if refresh else reusable_bundle(bundle_dir, key)
    if previous is not None:
        return TrainingResult(bundle=previous, **previous.metadata.training_summary, cached=True,
                              seconds=time.perf_counter() - started)
    record = extraction_of(store)  # before any work: the bundle cannot be written without it
    contents = read_contents(store)
    split = np.asarray(contents.split)
    rows = np.flatnonzero(np.isin(split, ["train", "val"]))
    labels = contents.labels[rows]
    present = np.bincount(labels, minlength=len(contents.label_names))
    thin = [name for name, n in zip(contents.label_names, present) if n < 2]
    if thin:
        raise DatasetError("After skipping unreadable images, these classes have fewer than 2 training images: "
                           + ", ".join(thin))
    is_val = split[rows] == "val"
    spec = HEADS[settings.head]
    # An image's views share its content hash (a store without hashes: its path, which views share too).
    groups = np.array([contents.hashes[i] or contents.paths[i] for i in rows])
    inputs = HeadInputs(rows=rows, labels=labels, is_val=is_val, n_classes=len(contents.label_names), groups=groups,
                        read=lambda some: read_features(store, some),
                        block_rows=settings.sgd_block_rows or SGD_BLOCK_CHUNKS * rows_per_chunk(store.feature_dim),
                        map_shape=feature_map_shape(store, spec.name) if spec.needs_pooling == "flatten" else None,
                        images=TrainingImages(root=Path(store.attrs.get("dataset_root", "")),
                                              paths=[contents.paths[i] for i in rows], views=contents.view[rows],
                                              extraction=record) if spec.reads_images else None)
    fit_started = time.perf_counter()
    head, summary = spec.fit(inputs, settings.resolved())
    bundle = save_bundle(bundle_dir, head, BundleMetadata(
        extraction=record, feature_dim=store.feature_dim, class_names=contents.label_names,
        head=settings.head, head_format=spec.head_format,
        head_params={**settings.head_settings(), **summary["best_params"]}, store_fingerprint=store.fingerprint(),
        stage_key=key,
        training_summary={"n_train": len(rows), **summary, "fit_seconds": time.perf_counter() - fit_started},
    ), overwrite=True, backbone=carried_backbone(store, record))
    return TrainingResult(bundle=bundle, **bundle.metadata.training_summary, seconds=time.perf_counter() - started)
