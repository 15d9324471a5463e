"""Prediction: image files → labels with the bundle's head, through the same decode/preprocess/extract path as training.

The bundle records the backbone, weights, image size, pooling, compute precision and storage precision
of the features it was trained on; the extractor is rebuilt from exactly those, and the backbone owns
its preprocessing, so new images reach the head the way the training images did. A fine-tuned bundle
(`keras-model`) is the whole network: images are decoded and preprocessed the same way and go straight in.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from transfer_flow.storage.errors import BundleError, DatasetError
from transfer_flow.storage.model_bundle import ModelBundle, load_bundle, load_head
from transfer_flow.tasks.backbones import get_backbone, recorded_weights
from transfer_flow.tasks.extraction import FeatureExtractor, recorded_extractor, unstorable_rows
from transfer_flow.tasks.heads import class_probabilities
from transfer_flow.tasks.images import decoded_batches
from transfer_flow.tasks.listing import IMAGE_EXTENSIONS
from transfer_flow.tasks.logs import stage_logger
from transfer_flow.tasks.runtimes import RUNTIMES, RuntimeSpec


class PredictionRow(BaseModel):
    path: str
    labels: list[str] = Field(default_factory=list, description="Best label first; empty when the file failed.")
    confidences: list[float] = Field(default_factory=list)
    error: str = ""

    def csv_row(self, top_k: int) -> dict[str, str]:
        row = {"path": self.path, "label": "", "confidence": "", "error": self.error}
        for rank in range(1, top_k + 1):
            suffix = "" if rank == 1 else f"_{rank}"
            if rank <= len(self.labels):
                row[f"label{suffix}"] = self.labels[rank - 1]
                row[f"confidence{suffix}"] = f"{self.confidences[rank - 1]:.6f}"
            else:
                row[f"label{suffix}"] = row[f"confidence{suffix}"] = ""
        return row


def find_bundle(path: Path | str) -> ModelBundle:
    """A bundle folder (holding bundle.json), or a run's output folder holding model/."""
    path = Path(path)
    if not (path / "bundle.json").is_file() and (path / "model" / "bundle.json").is_file():
        path = path / "model"
    return load_bundle(path)


def list_images(paths: Sequence[Path | str]) -> list[str]:
    """Each PATH as given if it is a file (or missing: it gets an error row); folders recursed, sorted,
    keeping image extensions and skipping hidden entries, as the dataset listing does. As there too,
    symbolic links are followed only while they stay inside the folder given (each folder once, so
    loops end); one pointing outside is left out and logged.

    Raises DatasetError when the folders given hold no image at all (a header-only CSV helps no one)."""
    found: list[str] = []
    outside: list[str] = []
    for given in paths:
        given = Path(given)
        if not given.is_dir():
            found.append(str(given))
            continue
        real_root = Path(os.path.realpath(given))
        seen: set[str] = set()
        for folder, dirs, files in os.walk(given, followlinks=True):
            real_folder = os.path.realpath(folder)
            if real_folder in seen:  # reached again through a link: a loop, or a second way in
                dirs[:] = []
                continue
            seen.add(real_folder)
            kept_dirs, kept_files = [], []
            for names, kept in ((sorted(dirs), kept_dirs), (sorted(files), kept_files)):
                for name in names:
                    if name.startswith("."):
                        continue
                    if _inside(real_root, Path(folder) / name):
                        kept.append(name)
                    else:
                        outside.append(str(Path(folder) / name))
            dirs[:] = kept_dirs
            found += [str(Path(folder) / name) for name in kept_files
                      if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS]
    if outside:
        stage_logger().warning("predict: %d symbolic links point outside the folders given and were not followed "
                               "(first: %s)", len(outside), outside[0])
    if not found:
        raise DatasetError(f"No images to label under {', '.join(str(p) for p in paths)} (looked for "
                           f"{', '.join(sorted(IMAGE_EXTENSIONS))}, in any case, hidden files left out)")
    return found


def _inside(real_root: Path, path: Path) -> bool:
    """Whether `path`, links resolved, stays under `real_root` (a dangling link stays: it gets an error row)."""
    try:
        real = Path(os.path.realpath(path, strict=True))
    except OSError:
        return True
    return real.is_relative_to(real_root)


def _backbone_of(bundle: ModelBundle):
    record = bundle.metadata.extraction
    spec = get_backbone(record.backbone)
    if spec.preprocessing != record.preprocessing:
        raise BundleError(f"Bundle {bundle.path} was trained with {record.preprocessing} preprocessing, but "
                          f"{record.backbone} here uses {spec.preprocessing}")
    return spec


def bundle_runtime(bundle: ModelBundle) -> RuntimeSpec:
    """The runtime the bundle's features came from (refused when this version has no such runtime)."""
    runtime = bundle.metadata.extraction.runtime
    if runtime not in RUNTIMES:
        raise BundleError(f"Bundle {bundle.path} was extracted with runtime {runtime!r}, which this version "
                          f"does not have ({', '.join(RUNTIMES)})")
    return RUNTIMES[runtime]


def bundle_extractor(bundle: ModelBundle, batch_size: int = 32) -> FeatureExtractor:
    """The feature extractor the bundle's training features came from."""
    meta, record = bundle.metadata, bundle.metadata.extraction
    _backbone_of(bundle)  # refuses a backbone whose preprocessing changed
    bundle_runtime(bundle)
    extractor = recorded_extractor(record, recorded_weights(record.weights, f"Bundle {bundle.path}", BundleError),
                                   batch_size=batch_size, bundle=bundle.path if meta.backbone_files else "")
    if extractor.feature_dim != meta.feature_dim:
        raise BundleError(f"Bundle {bundle.path} expects {meta.feature_dim}-d features, {record.backbone} with "
                          f"{record.pooling} pooling at {record.image_size} px gives {extractor.feature_dim}-d")
    return extractor


Classifier = Callable[[np.ndarray], tuple[np.ndarray, list[str]]]


def image_classifier(bundle: ModelBundle, batch_size: int = 32) -> Classifier:
    """Decoded uint8 images (n, size, size, 3) at the bundle's image size → class probabilities (n, classes), and
    why each image has none ("" where it has: its row of probabilities is NaN otherwise)."""
    bundle_runtime(bundle).load()  # before the head is loaded: Keras (a head's, a fine-tuned network's) on its backend
    head = load_head(bundle)
    if bundle.metadata.whole_model:  # the fine-tuned network: preprocessed images in
        preprocess = _backbone_of(bundle).preprocess

        def classify_images(images: np.ndarray) -> tuple[np.ndarray, list[str]]:
            probabilities = class_probabilities(head, preprocess(images))
            return probabilities, ["" if ok else "the network gave NaN or inf for it"
                                   for ok in np.isfinite(probabilities).all(axis=1)]
        return classify_images
    extractor = bundle_extractor(bundle, batch_size)
    dtype = bundle.metadata.extraction.feature_dtype

    def classify_features(images: np.ndarray) -> tuple[np.ndarray, list[str]]:
        features = extractor(images)
        reasons = unstorable_rows(features, dtype)  # what extraction would have skipped, the head never saw
        fit = np.array([not reason for reason in reasons], dtype=bool)
        probabilities = np.full((len(features), len(bundle.metadata.class_names)), np.nan)
        if fit.any():
            # Round through the store's dtype: the head saw features stored that way.
            probabilities[fit] = class_probabilities(head, features[fit].astype(dtype).astype(np.float32))
        return probabilities, reasons
    return classify_features


def predict_images(bundle: ModelBundle, paths: Sequence[str], *, top_k: int = 3, batch_size: int = 32,
                   decode_threads: int | None = None) -> list[PredictionRow]:
    """One row per path, in order; a file that cannot be decoded gets its reason in `error`, never an exception."""
    classify = image_classifier(bundle, batch_size)
    image_size = bundle.metadata.extraction.image_size
    names = bundle.metadata.class_names
    k = min(top_k, len(names))
    rows: list[PredictionRow] = []
    # The decode-ahead pipeline extraction uses: threads decode two batches ahead of the backbone.
    for start, decoded in zip(range(0, len(paths), batch_size),
                              decoded_batches(paths, image_size, batch_size, threads=decode_threads)):
        batch = paths[start:start + batch_size]
        good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
        by_index: dict[int, PredictionRow] = {}
        if good:
            probabilities, reasons = classify(np.stack([decoded[i] for i in good]))
            order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
            for row, i in enumerate(good):
                by_index[i] = PredictionRow(path=batch[i], error=reasons[row]) if reasons[row] else PredictionRow(
                    path=batch[i], labels=[names[c] for c in order[row]],
                    confidences=[float(probabilities[row, c]) for c in order[row]])
        rows += [by_index.get(i) or PredictionRow(path=path, error=decoded[i]) for i, path in enumerate(batch)]
    return rows


def image_probabilities(bundle: ModelBundle, root: Path, paths: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Class probabilities of dataset images (`paths` relative to `root`) read again from disk, for evaluating a
    fine-tuned bundle; an image that cannot be decoded now (it was when its row was extracted) is an error."""
    classify = image_classifier(bundle, batch_size)
    image_size = bundle.metadata.extraction.image_size
    out = []
    for start, decoded in zip(range(0, len(paths), batch_size),
                              decoded_batches([Path(root) / p for p in paths], image_size, batch_size)):
        failed = [(paths[start + i], d) for i, d in enumerate(decoded) if isinstance(d, str)]
        if failed:
            raise DatasetError(f"{failed[0][0]} can no longer be decoded ({failed[0][1]}): it changed since "
                               "extraction; run the same command again")
        probabilities, reasons = classify(np.stack(decoded))
        failed = [(paths[start + i], reason) for i, reason in enumerate(reasons) if reason]
        if failed:
            raise DatasetError(f"{failed[0][0]} cannot be classified ({failed[0][1]})")
        out.append(probabilities)
    return np.concatenate(out) if out else np.empty((0, len(bundle.metadata.class_names)))
