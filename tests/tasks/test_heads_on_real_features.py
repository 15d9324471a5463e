"""Heads on real CNN features: ImageNet Lite0 (the offline package) on the real digits, where about half of
the 1,280 features never fire on the training rows. Standardising those naively wrecked dense and sgd."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from transfer_flow.storage.demo_dataset import write_digits_dataset
from transfer_flow.tasks.evaluation import evaluate_bundle
from transfer_flow.tasks.extraction import ExtractionSettings, extract_features
from transfer_flow.tasks.hashing import hash_manifest
from transfer_flow.tasks.listing import list_dataset
from transfer_flow.tasks.splitting import split_manifest
from transfer_flow.tasks.training import TrainingSettings, train_head

PER_CLASS = 60  # 600 digits, 135 held out: extraction takes tens of seconds at 32 px
IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def lite0_digits_store(tmp_path_factory):
    """Lite0 (ImageNet weights from the installed package) features of a digits subset, extracted once."""
    root = tmp_path_factory.mktemp("lite0_digits")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_HOME", str(root / "keras_home"))  # the weight conversion stays out of the user's cache
        every = write_digits_dataset(root / "all")
        subset = root / "digits"
        for folder in sorted(every.iterdir()):
            (subset / folder.name).mkdir(parents=True)
            for image in sorted(folder.glob("*.png"))[:PER_CLASS]:
                shutil.copy(image, subset / folder.name / image.name)
        manifest = split_manifest(hash_manifest(list_dataset(subset))[0], test_size=0.25, seed=42)
        settings = ExtractionSettings(backbone="efficientnet_lite0", image_size=IMAGE_SIZE, batch_size=64)
        extraction = extract_features(manifest, root / "features.h5", settings)
    assert extraction.weights.source == "offline-package"
    return extraction.store


def accuracy_of(head: str, store, folder: Path) -> float:
    training = train_head(store, folder / head, TrainingSettings(head=head))
    return evaluate_bundle(training.bundle, store, n_train=training.n_train).accuracy


@pytest.mark.slow
def test_dense_and_sgd_come_close_to_logreg_on_real_features(lite0_digits_store, tmp_path):
    logreg = accuracy_of("logreg", lite0_digits_store, tmp_path)
    dense = accuracy_of("dense", lite0_digits_store, tmp_path)
    sgd = accuracy_of("sgd", lite0_digits_store, tmp_path)

    assert logreg > 0.8  # the features are worth something: the comparison means something
    # 135 test images: one image is 0.7 points. Measured: logreg 0.867; dense 0.504 with plain standardisation,
    # 0.807 with floored deviations, 0.837 once refitted on the rows early stopping held out; sgd 0.807 with
    # predict_proba's saturated argmax, 0.867 with averaged SGD and softmax scores (BENCHMARKS.md).
    assert dense >= logreg - 0.03, (logreg, dense)
    assert sgd >= logreg - 0.03, (logreg, sgd)
