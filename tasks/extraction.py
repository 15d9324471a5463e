"""Extraction: images of a Manifest → rows of a FeatureStore, batched, with decoding run ahead of inference.

With `augment` K > 0 every training image also gets K augmented views (tasks/augmentation.py), each one more
row (its `view` column 1..K, same path, hash, label and split): cached per (content hash, view) like any row.
"""
from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field, model_validator
from tqdm import tqdm

from transfer_flow.storage.content_keys import content_key, package_version
from transfer_flow.storage.errors import DatasetError, OutputExistsError, StoreError
from transfer_flow.storage.extraction_record import ExtractionRecord, record_attrs
from transfer_flow.storage.feature_store import (
    FeatureDtype,
    FeatureStore,
    FeatureWriter,
    SkippedImages,
    append_journal,
    appending_to_store,
    create_store,
    is_local,
    open_store,
    read_contents,
    read_skipped,
    rows_per_chunk,
    store_exists,
)
from transfer_flow.storage.manifest import ImageRecord, Manifest
from transfer_flow.storage.row_cache import RowCache, row_key
from transfer_flow.tasks.augmentation import AUGMENT_RECIPE, augmented_view
from transfer_flow.tasks.backbones import (
    DEFAULT_BACKBONE,
    BackboneName,
    Pooling,
    Precision,
    ResolvedWeights,
    get_backbone,
    resolve_weights,
)
from transfer_flow.tasks.images import decoded_batches
from transfer_flow.tasks.logs import stage_logger
from transfer_flow.tasks.runtimes import (
    AUTO_RULE,
    RUNTIMES,
    ForwardRequest,
    RuntimeChoice,
    get_runtime,
    resolve_runtime,
    resolve_runtime_precision,
)
from transfer_flow.tasks.runtimes.calibration import CalibrationImages, calibration_images


class ExtractionSettings(BaseModel):
    """Everything that decides the values of a feature row (PipelineSettings inherits these fields)."""

    backbone: BackboneName = Field(
        default=DEFAULT_BACKBONE,
        description="Pretrained CNN used as a fixed feature extractor (see `transfer-flow backbones`).",
    )
    weights: str = Field(
        default="imagenet",
        description="imagenet (Keras cache, then an installed offline package, then download), none (random init), "
        "or the path of a .weights.h5/.h5 file.",
    )
    image_size: int | None = Field(
        default=None, ge=16, description="Square input side in pixels; empty: the backbone's native size."
    )
    pooling: Pooling = Field(
        default="avg",
        description="How the last feature map becomes a vector: flatten (the classic recipe; VGG16 at 224: 25,088-d), "
        "avg or max.",
    )
    runtime: RuntimeChoice = Field(
        default="auto",
        description=f"What runs the backbone: auto ({AUTO_RULE}), "
        + ", ".join(f"{name} ({spec.description})" for name, spec in RUNTIMES.items()) + ".",
    )
    precision: Precision | None = Field(
        default=None,
        description="Compute precision; empty: the fastest measured for the backbone and runtime (see BENCHMARKS.md). "
        "int8 (OpenVINO only): quantised after calibrating on a few hundred training images.",
    )
    batch_size: int = Field(default=32, ge=1, le=4096, description="Images per inference call.")
    feature_dtype: FeatureDtype = Field(
        default="float32", description="How features are stored; float16 halves the bytes."
    )
    augment: int = Field(
        default=0, ge=0, le=64,
        description="Augmented views stored per training image (random flip, rotation, zoom, shift; never of "
        "test or val images); heads train on all of them.",
    )
    seed: int = Field(default=42, description="Seed of the augmented views (and, in a pipeline, of the split).")

    def augment_recipe(self) -> str:
        """What decides the pixels of a view (empty without views): part of the extraction key and record."""
        return AUGMENT_RECIPE.describe(self.seed) if self.augment else ""

    def resolved_size(self) -> int:
        return self.image_size or get_backbone(self.backbone).native_size

    def resolved_runtime(self) -> str:
        return resolve_runtime(self.runtime)

    def resolved_precision(self) -> Precision:
        return resolve_runtime_precision(get_backbone(self.backbone), self.precision, self.resolved_runtime())

    @model_validator(mode="after")
    def _precision_the_runtime_has(self):
        # Checked here so an impossible pair fails at once, before a server starts (auto is checked once resolved).
        if self.runtime != "auto" and self.precision is not None:
            if self.precision not in get_runtime(self.runtime).precisions:
                raise ValueError(f"--precision {self.precision} is not available with --runtime {self.runtime} "
                                 f"(it has {', '.join(get_runtime(self.runtime).precisions)})")
        return self


class SkippedImage(BaseModel):
    path: str
    reason: str


class ExtractionResult(BaseModel):
    store: FeatureStore
    images_extracted: int = Field(description="Images decoded and run through the backbone by this run.")
    images_reused: int = Field(description="Images whose rows were taken from an earlier run with the same settings.")
    images_skipped: list[SkippedImage]
    weights: ResolvedWeights
    precision: Precision
    extraction_key: str
    cached: bool = Field(
        default=False, description="The whole store was already complete: nothing was read or written."
    )


class PendingImage(ImageRecord):
    """An image some of whose rows are missing: which views (0: the image itself) to extract."""

    views: list[int] = Field(default_factory=lambda: [0])


def views_of(record: ImageRecord, augment: int) -> range:
    """The views an image has rows for: itself, plus `augment` views when it is a training image."""
    return range(augment + 1 if record.split == "train" else 1)


EXTRACTION_CODE_VERSION = 1  # bump when decoding or feature computation changes the values of a row
SHARD_IMAGES = 512  # images per committed shard: the most a killed run can lose


def extraction_key(settings: ExtractionSettings, weights: ResolvedWeights, calibration: str = "") -> str:
    """Identifies the values of a row: settings, weights identity, runtime, int8 calibration set and code version
    (never the dataset)."""
    spec = get_backbone(settings.backbone)
    # The recipe (not the number of views) joins the key only when there are views, so stores without views
    # keep their keys, and asking for more views of the same recipe reuses the views already made.
    recipe = [settings.augment_recipe()] if settings.augment else []
    # Likewise the runtime: TensorFlow's stores keep their keys; other runtimes' rows differ in the last bits.
    runtime = settings.resolved_runtime()
    other_runtime = [runtime, calibration] if runtime != "tensorflow" else []
    return content_key(spec.name, weights.identity(), settings.resolved_size(), settings.pooling,
                       settings.resolved_precision(), settings.feature_dtype, spec.preprocessing, RESIZE,
                       EXTRACTION_CODE_VERSION, package_version(), *recipe, *other_runtime)


class FeatureExtractor:
    """Batch of uint8 images → float32 features, on the settings' runtime (tasks/runtimes). Picklable: the model is
    built (or loaded from the compiled-model cache) on first use, per process."""

    def __init__(self, settings: ExtractionSettings, weights: ResolvedWeights, *, calibration: str = "",
                 calibration_images: CalibrationImages | None = None, bundle: str = ""):
        self.settings = settings
        self.weights = weights
        self.spec = get_backbone(settings.backbone)
        self.image_size = settings.resolved_size()
        self.feature_dim = self.spec.feature_dim(settings.pooling, self.image_size)
        self.runtime = settings.resolved_runtime()
        self.precision = settings.resolved_precision()
        self.calibration = calibration
        self.calibration_images = calibration_images
        self.bundle = bundle  # a bundle carrying the converted model (ForwardRequest.bundle)
        self._forward = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_forward": None}

    def forward_request(self) -> ForwardRequest:
        """What the runtime is asked for: this extractor's backbone, settings and weights."""
        return ForwardRequest(backbone=self.spec, image_size=self.image_size, pooling=self.settings.pooling,
                              precision=self.precision, weights=self.weights, batch_size=self.settings.batch_size,
                              calibration=self.calibration, calibration_images=self.calibration_images,
                              bundle=self.bundle)

    def _build(self):
        return get_runtime(self.runtime).load().forward(self.forward_request())

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self._forward is None:
            self._forward = self._build()
        n = len(images)
        batch = self.spec.preprocess(images)
        if n < self.settings.batch_size:  # pad the last batch so the compiled graph is reused
            batch = np.concatenate([batch, np.zeros((self.settings.batch_size - n, *batch.shape[1:]), batch.dtype)])
        return np.asarray(self._forward(batch))[:n]


def recorded_extractor(record: ExtractionRecord, weights: ResolvedWeights, *, batch_size: int = 32,
                       bundle: str = "") -> FeatureExtractor:
    """The extractor a store's or bundle's rows came from, by its record: the same runtime too (features of
    another runtime differ in the last bits)."""
    settings = ExtractionSettings(backbone=record.backbone, image_size=record.image_size, pooling=record.pooling,
                                  precision=record.precision, batch_size=batch_size, runtime=record.runtime,
                                  feature_dtype=record.feature_dtype)
    return FeatureExtractor(settings, weights, calibration=record.calibration, bundle=bundle)


RESIZE = "bilinear, straight to image_size (no crop)"


def _existing_store(store_path: Path) -> FeatureStore | None:
    """The complete store at `store_path`; None if there is none; refuses anything else found there."""
    if not store_exists(store_path):
        return None
    try:
        return open_store(store_path)
    except StoreError:
        if append_journal(store_path).exists():  # ours, left unreadable by a kill while it grew: rebuilt
            stage_logger().warning("extract: %s was left unreadable by an interrupted append; its rows are "
                                   "extracted again", store_path)
            return None
        raise OutputExistsError(f"{store_path} exists and is not a feature store: refusing to replace it") from None


class ExtractionPlan(BaseModel):
    """What an extraction has to do: computed once, then run locally or as Dask shards, then assembled."""

    settings: ExtractionSettings = Field(description="As asked, with the precision resolved for this machine.")
    weights: ResolvedWeights
    key: str
    feature_dim: int
    parts_dir: str
    todo: list[PendingImage] = Field(
        description="Images whose content misses a row (itself or a view) for these settings (one per content)."
    )
    previous_store: str | None = Field(
        default=None, description="A store with these settings whose rows can be reused."
    )
    complete: bool = Field(default=False, description="The previous store already holds exactly this manifest.")
    calibration: CalibrationImages | None = Field(default=None, description="The int8 calibration set, if int8.")

    def record(self) -> ExtractionRecord:
        """What the store will say about how its rows were made (bundles trained on it carry the same)."""
        spec = get_backbone(self.settings.backbone)
        return ExtractionRecord(backbone=spec.name, weights=self.weights, image_size=self.settings.resolved_size(),
                                pooling=self.settings.pooling, precision=self.settings.resolved_precision(),
                                preprocessing=spec.preprocessing, resize=RESIZE,
                                feature_dtype=self.settings.feature_dtype, augment=self.settings.augment,
                                augment_recipe=self.settings.augment_recipe(), runtime=self.settings.runtime,
                                calibration=self.calibration.identity() if self.calibration else "")

    def shards(self, size: int) -> list[list[PendingImage]]:
        return [self.todo[i:i + size] for i in range(0, len(self.todo), size)]


def plan_extraction(manifest: Manifest, store_path: Path, settings: ExtractionSettings, *,
                    refresh: bool = False) -> ExtractionPlan:
    spec = get_backbone(settings.backbone)
    settings = settings.model_copy(update={"runtime": settings.resolved_runtime()})
    get_runtime(settings.runtime).load()  # first: it picks Keras' backend, and resolving weights may build a model
    weights = resolve_weights(spec, settings.weights)
    settings = settings.model_copy(update={"precision": settings.resolved_precision()})
    calibration = calibration_images(manifest) if settings.precision == "int8" else None
    key = extraction_key(settings, weights, calibration.identity() if calibration else "")
    existing = _existing_store(store_path)
    previous = (
        existing if not refresh and existing is not None and existing.attrs.get("extraction_key") == key else None
    )
    feature_dim = spec.feature_dim(settings.pooling, settings.resolved_size())
    parts_dir = Path(f"{store_path}.{key}.parts")
    plan = ExtractionPlan(settings=settings, weights=weights, key=key, calibration=calibration,
                          feature_dim=feature_dim, parts_dir=str(parts_dir),
                          previous_store=previous.path if previous is not None else None, todo=[])
    if (previous is not None and not previous.interrupted
            and previous.attrs.get("manifest_fingerprint") == manifest.fingerprint()
            and int(previous.attrs.get("augment", 0)) == settings.augment):
        return plan.model_copy(update={"complete": True})
    cache = RowCache(parts_dir, feature_dim)
    if refresh:
        cache.clear()
    cache.load(plan.previous_store)
    todo: dict[str, PendingImage] = {}
    for record in manifest.records:
        if record.content_hash in cache.skipped:
            continue
        missing = [v for v in views_of(record, settings.augment) if row_key(record.content_hash, v) not in cache.rows]
        pending = todo.get(record.content_hash)  # identical files are extracted once (views: the union)
        if pending is not None:
            pending.views = sorted({*pending.views, *missing})
        elif missing:
            todo[record.content_hash] = PendingImage(**record.model_dump(), views=missing)
    return plan.model_copy(update={"todo": list(todo.values())})


_EXTRACTORS: dict[str, FeatureExtractor] = {}
_EXTRACTORS_LOCK = threading.Lock()


def _extractor_for(plan: ExtractionPlan) -> FeatureExtractor:
    """One extractor per process and settings: a Dask worker loads the backbone once for all its shards."""
    with _EXTRACTORS_LOCK:
        if plan.key not in _EXTRACTORS:
            _EXTRACTORS[plan.key] = FeatureExtractor(
                plan.settings, plan.weights, calibration=plan.calibration.identity() if plan.calibration else "",
                calibration_images=plan.calibration)
        return _EXTRACTORS[plan.key]


def extract_records(records: Sequence[PendingImage], root: Path, plan: ExtractionPlan, *,
                    decode_threads: int | None = None, prefetch_batches: int = 2,
                    shard_images: int = SHARD_IMAGES) -> int:
    """Decode and extract `records` into committed shards of `plan.parts_dir`; returns how many were done.

    Runs the same in the flow's process (all of `plan.todo`) or in a Dask worker (one shard of it).
    """
    cache = RowCache(Path(plan.parts_dir), plan.feature_dim)
    _extract_into_shards(records, Path(root), _extractor_for(plan), cache, decode_threads, prefetch_batches,
                         shard_images, plan.settings.seed)
    return len(records)


def assemble_store(manifest: Manifest, store_path: Path, plan: ExtractionPlan) -> ExtractionResult:
    """Write the complete store from reused rows and committed shards, in manifest order, then drop the shards."""
    extracted_hashes = {r.content_hash for r in plan.todo}

    def result(store: FeatureStore, reasons: dict[str, str], extracted: int, cached: bool) -> ExtractionResult:
        n_images = sum(1 for r in manifest.records if r.content_hash not in reasons)  # rows of view 0
        return ExtractionResult(
            store=store, images_extracted=extracted, images_reused=n_images - extracted,
            images_skipped=[SkippedImage(path=r.path, reason=reasons[r.content_hash])
                            for r in manifest.records if r.content_hash in reasons],
            weights=plan.weights, precision=plan.settings.precision, extraction_key=plan.key, cached=cached)

    if plan.complete:
        previous = open_store(plan.previous_store)
        return result(previous, read_skipped(previous).reasons_by_hash(), 0, True)
    cache = RowCache(Path(plan.parts_dir), plan.feature_dim).load(plan.previous_store)
    missing = [r.path for r in plan.todo if r.content_hash not in cache.skipped
               and any(row_key(r.content_hash, v) not in cache.rows for v in r.views)]
    if missing:
        raise StoreError(f"{len(missing)} images have no committed shard (first: {missing[0]}); rerun to resume")
    kept = [r for r in manifest.records if r.content_hash in cache.rows]
    # Each image's row, then its views' rows: one (record, view) per row of the store.
    rows_out = [(r, v) for r in kept for v in views_of(r, plan.settings.augment)]
    skipped_records = [r for r in manifest.records if r.content_hash in cache.skipped]
    skipped = {r.content_hash: cache.skipped[r.content_hash] for r in skipped_records}
    attrs = {
        **record_attrs(plan.record()),
        "dataset_root": manifest.root,
        "manifest_fingerprint": manifest.fingerprint(),
        "extraction_key": plan.key,
    }
    block = 8 * rows_per_chunk(plan.feature_dim)
    skipped_images = SkippedImages([r.path for r in skipped_records], [r.content_hash for r in skipped_records],
                                   [skipped[r.content_hash] for r in skipped_records])
    keys = [row_key(r.content_hash, v) for r, v in rows_out]
    label_of = {name: i for i, name in enumerate(manifest.class_names)}
    labels = np.array([label_of[r.label] for r, _ in rows_out], dtype=np.int64)
    split = np.array([r.split or "" for r, _ in rows_out], dtype=object)

    def append(writer: FeatureWriter, order: np.ndarray) -> None:
        for start, features in zip(range(0, len(order), block), cache.gather([keys[j] for j in order], block)):
            chosen = order[start:start + block]
            writer.append(features, labels[chosen], [rows_out[j][0].path for j in chosen], split[chosen].tolist(),
                          [rows_out[j][0].content_hash for j in chosen], [rows_out[j][1] for j in chosen])

    in_place = _committed_positions(plan.previous_store, manifest.class_names, rows_out)
    if in_place is not None:  # every committed row is still wanted: keep them where they are, append the rest
        positions, committed_labels, committed_split = in_place
        old = positions >= 0
        labels_now, split_now = committed_labels.copy(), committed_split.copy()
        labels_now[positions[old]], split_now[positions[old]] = labels[old], split[old]
        with appending_to_store(store_path, attrs=attrs) as writer:
            if (labels_now != committed_labels).any() or (split_now != committed_split).any():
                writer.relabel(labels_now, split_now.tolist())
            append(writer, np.flatnonzero(~old))
            writer.record_skipped(skipped_images)
    else:
        with create_store(store_path, feature_dim=plan.feature_dim, label_names=manifest.class_names, attrs=attrs,
                          dtype=plan.settings.feature_dtype, overwrite=True) as writer:
            append(writer, np.arange(len(rows_out)))
            writer.record_skipped(skipped_images)
    cache.clear()
    for folder, size in cache.clear_other_settings():
        stage_logger().info("extract: removed %s (%.1f MB of shards a killed run with other settings left)",
                            folder, size / 1e6)
    return result(open_store(store_path), skipped, sum(1 for r in kept if r.content_hash in extracted_hashes), False)


def _committed_positions(previous_store: str | None, class_names: list[str], rows_out: list[tuple[ImageRecord, int]]
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Where each wanted row already sits in the previous store (-1: not there), with its rows' labels and split,
    when the store can grow in place: local, complete, same classes, and every row still wanted (same path,
    content and view). None when it must be written anew (an image removed, renamed or changed, a new class)."""
    if previous_store is None or not is_local(previous_store):
        return None
    previous = open_store(previous_store)
    if previous.label_names != class_names or previous.interrupted:  # a killed append's store is rewritten
        return None
    contents = read_contents(previous)
    where = {(path, digest, view): row for row, (path, digest, view) in enumerate(
        zip(contents.paths, contents.hashes, contents.view.tolist()))}
    if len(where) != previous.n_rows:
        return None
    positions = np.array([where.pop((record.path, record.content_hash, view), -1) for record, view in rows_out],
                         dtype=np.int64)
    if where:  # rows no longer listed: they leave, so the store is rewritten
        return None
    return positions, contents.labels, np.array(contents.split, dtype=object)


def extract_features(manifest: Manifest, store_path: Path, settings: ExtractionSettings, *,
                     refresh: bool = False, decode_threads: int | None = None,
                     prefetch_batches: int = 2, shard_images: int = SHARD_IMAGES) -> ExtractionResult:
    """Bring the store at `store_path` up to date with the manifest, in this process.

    Only images whose content has no row yet (for these settings) are decoded; broken ones are
    skipped with a reason; rows of images no longer listed leave. The store is replaced atomically;
    committed shards make a killed run resumable.
    """
    plan = plan_extraction(manifest, store_path, settings, refresh=refresh)
    extract_records(plan.todo, Path(manifest.root), plan, decode_threads=decode_threads,
                    prefetch_batches=prefetch_batches, shard_images=shard_images)
    return assemble_store(manifest, store_path, plan)


def unstorable_rows(features: np.ndarray, feature_dtype: str) -> list[str]:
    """Why each row of `features` cannot be stored, "" where it can: a store never holds NaN or inf (readers refuse
    them), whether the backbone gave them or the store's dtype cannot hold the value."""
    features = np.asarray(features, dtype=np.float32)
    largest = np.finfo(feature_dtype).max
    if np.isfinite(features).all() and np.abs(features).max(initial=0.0) <= largest:
        return [""] * len(features)
    reasons = []
    for row in features:
        if not np.isfinite(row).all():
            reasons.append("the backbone gave NaN or inf features for it (are its weights damaged?)")
        elif np.abs(row).max(initial=0.0) > largest:
            reasons.append(f"its features reach {np.abs(row).max():.3g}, beyond {feature_dtype}'s range "
                           f"(±{largest:.0f}): features stored as float32 (--feature-dtype float32) hold them")
        else:
            reasons.append("")
    return reasons


def _extract_into_shards(records: Sequence[PendingImage], root: Path, extractor: FeatureExtractor, cache: RowCache,
                         decode_threads: int | None, prefetch_batches: int, shard_images: int, seed: int) -> None:
    """Decode (threads, `prefetch_batches` ahead) and extract `records` (each of its missing views), committing a
    shard every `shard_images` images."""
    if not records:
        return
    batch_size = extractor.settings.batch_size
    log = stage_logger()
    progress = tqdm(total=len(records), unit="img", desc="extract", disable=not sys.stderr.isatty())
    done, next_log = 0, 0.0
    shard_hashes: list[str] = []
    shard_owners: list[str] = []  # the content hash of each row's image
    shard_features: list[np.ndarray] = []
    shard_skipped: dict[str, str] = {}
    decoded_stream = decoded_batches([root / r.path for r in records], extractor.image_size, batch_size,
                                     threads=decode_threads, ahead=prefetch_batches)
    for start, decoded in zip(range(0, len(records), batch_size), decoded_stream):
        batch = records[start:start + batch_size]
        good = [(record, image) for record, image in zip(batch, decoded) if not isinstance(image, str)]
        shard_skipped.update({r.content_hash: reason for r, reason in zip(batch, decoded) if isinstance(reason, str)})
        views = [(record.content_hash, row_key(record.content_hash, v),
                  augmented_view(image, record.content_hash, v, seed)) for record, image in good for v in record.views]
        for first in range(0, len(views), batch_size):  # views multiply a batch: keep the compiled batch shape
            chunk = views[first:first + batch_size]
            features = extractor(np.stack([image for _, _, image in chunk]))
            for (owner, _, _), reason in zip(chunk, unstorable_rows(features, extractor.settings.feature_dtype)):
                if reason:
                    shard_skipped[owner] = reason
            shard_features.append(features)
            shard_owners.extend(owner for owner, _, _ in chunk)
            shard_hashes.extend(key for _, key, _ in chunk)
        done += len(batch)
        if len(shard_hashes) + len(shard_skipped) >= shard_images or done == len(records):
            if shard_skipped and not root.is_dir():  # not broken images: the whole folder is gone; commit nothing
                raise DatasetError(f"The dataset folder {root} no longer exists (moved, removed or unmounted during "
                                   "the run): put it back and run the same command again; finished work is kept")
            # An image with one unstorable view is skipped whole: none of its rows go in.
            kept = np.array([owner not in shard_skipped for owner in shard_owners], dtype=bool)
            features = (np.concatenate(shard_features) if shard_features else
                        np.empty((0, extractor.feature_dim), np.float32))[kept]
            cache.commit_shard([key for key, keep in zip(shard_hashes, kept) if keep], features, shard_skipped)
            shard_hashes, shard_owners, shard_features, shard_skipped = [], [], [], {}
        progress.update(len(batch))
        if progress.disable and done / len(records) >= next_log:
            # Not a terminal: a plain line every 10% instead of a progress bar.
            log.info("extract: %d/%d images", done, len(records))
            next_log += 0.1
    progress.close()
