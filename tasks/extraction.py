"""Extraction: images of a Manifest → rows of a FeatureStore, batched, with decoding run ahead of inference."""
from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field
from tqdm import tqdm

from storage.errors import UnreadableImageError
from storage.feature_store import FeatureStore, create_store, open_store
from storage.manifest import ImageRecord, Manifest
from tasks.backbones import Pooling, Precision, ResolvedWeights, build_feature_model, get_backbone, resolve_weights
from tasks.images import decode_image
from tasks.logs import stage_logger


class ExtractionSettings(BaseModel):
    """Everything that decides the values of a feature row."""

    backbone: str = Field(description="Backbone name (see `transfer-flow backbones`).")
    weights: str = Field(default="imagenet", description="imagenet (resolved offline first), none (random), or a .h5 path.")
    image_size: int | None = Field(default=None, ge=16, description="Square input side in pixels; default: the backbone's native size.")
    pooling: Pooling = Field(default="avg", description="How the last feature map becomes a vector.")
    precision: Precision | None = Field(default=None, description="Compute precision; default: the backbone's fastest measured here.")
    batch_size: int = Field(default=32, ge=1, le=4096, description="Images per inference call.")

    def resolved_size(self) -> int:
        return self.image_size or get_backbone(self.backbone).native_size

    def resolved_precision(self) -> Precision:
        return self.precision or get_backbone(self.backbone).default_precision


class SkippedImage(BaseModel):
    path: str
    reason: str


class ExtractionResult(BaseModel):
    store: FeatureStore
    images_extracted: int
    images_skipped: list[SkippedImage]
    weights: ResolvedWeights
    precision: Precision
    seconds: float


class FeatureExtractor:
    """Batch of uint8 images → float32 features. Picklable: the model is built on first use, per process."""

    def __init__(self, settings: ExtractionSettings, weights: ResolvedWeights):
        self.settings = settings
        self.weights = weights
        self.spec = get_backbone(settings.backbone)
        self.image_size = settings.resolved_size()
        self.feature_dim = self.spec.feature_dim(settings.pooling, self.image_size)
        self._forward = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_forward": None}

    def _build(self):
        import tensorflow as tf

        model = build_feature_model(self.spec, image_size=self.image_size, pooling=self.settings.pooling,
                                    precision=self.settings.resolved_precision(), weights=self.weights)
        # A compiled function on fixed-shape batches: model.predict's per-call overhead halves throughput.
        return tf.function(lambda batch: model(batch, training=False), reduce_retracing=True)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self._forward is None:
            self._forward = self._build()
        n = len(images)
        batch = self.spec.preprocess(images)
        if n < self.settings.batch_size:  # pad the last batch so the compiled graph is reused
            batch = np.concatenate([batch, np.zeros((self.settings.batch_size - n, *batch.shape[1:]), batch.dtype)])
        return np.asarray(self._forward(batch))[:n]


def _decode_or_reason(path: Path, size: int) -> np.ndarray | str:
    try:
        return decode_image(path, size)
    except UnreadableImageError as error:
        return error.reason


def _batches(records: Sequence[ImageRecord], size: int) -> Iterator[Sequence[ImageRecord]]:
    for start in range(0, len(records), size):
        yield records[start:start + size]


def extract_features(manifest: Manifest, store_path: Path, settings: ExtractionSettings, *,
                     overwrite: bool = False, decode_threads: int | None = None,
                     prefetch_batches: int = 2) -> ExtractionResult:
    """Extract every listed image into a new store at `store_path`; broken images are skipped with a reason."""
    started = time.perf_counter()
    spec = get_backbone(settings.backbone)
    weights = resolve_weights(spec, settings.weights)
    extractor = FeatureExtractor(settings, weights)
    size = extractor.image_size
    root = Path(manifest.root)
    attrs = {
        "backbone": spec.name, "weights_source": weights.describe(), "image_size": size,
        "pooling": settings.pooling, "precision": settings.resolved_precision(),
        "preprocessing": spec.preprocessing, "resize": "bilinear, straight to image_size (no crop)",
        "dataset_root": manifest.root, "manifest_fingerprint": manifest.fingerprint(),
    }
    skipped: list[SkippedImage] = []
    threads = decode_threads or min(8, (os.cpu_count() or 2) * 2)
    progress = tqdm(total=len(manifest.records), unit="img", desc="extract", disable=not sys.stderr.isatty())
    done = 0
    next_log = 0.0
    log = stage_logger()
    with create_store(store_path, feature_dim=extractor.feature_dim, label_names=manifest.class_names,
                      attrs=attrs, overwrite=overwrite) as writer, ThreadPoolExecutor(threads) as pool:
        pending: deque[tuple[Sequence[ImageRecord], list[Future]]] = deque()
        batches = _batches(manifest.records, settings.batch_size)

        def submit_next() -> None:
            batch = next(batches, None)
            if batch is not None:
                pending.append((batch, [pool.submit(_decode_or_reason, root / r.path, size) for r in batch]))

        for _ in range(prefetch_batches):  # decoding runs this many batches ahead of inference
            submit_next()
        while pending:
            batch, futures = pending.popleft()
            submit_next()
            good: list[ImageRecord] = []
            images: list[np.ndarray] = []
            for record, future in zip(batch, futures):
                decoded = future.result()
                if isinstance(decoded, str):
                    skipped.append(SkippedImage(path=record.path, reason=decoded))
                else:
                    good.append(record)
                    images.append(decoded)
            if images:
                writer.append(extractor(np.stack(images)),
                              np.array([manifest.label_index(r.label) for r in good], dtype=np.int64),
                              [r.path for r in good], [r.split or "" for r in good])
            progress.update(len(batch))
            done += len(batch)
            if progress.disable and done / max(1, len(manifest.records)) >= next_log:
                # Not a terminal: a plain line every 10% instead of a progress bar.
                log.info("extract: %d/%d images", done, len(manifest.records))
                next_log += 0.1
    progress.close()
    store = open_store(store_path)
    return ExtractionResult(store=store, images_extracted=store.n_rows, images_skipped=skipped, weights=weights,
                            precision=settings.resolved_precision(), seconds=time.perf_counter() - started)
