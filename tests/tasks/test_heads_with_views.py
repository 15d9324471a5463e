"""The C search of the linear heads on a store with augmented views: every view of an image in one fold."""
import numpy as np
import pytest

from transfer_flow.tasks.heads import HEADS, HeadInputs
from transfer_flow.tasks.heads.linear import search_folds
from transfer_flow.tasks.training import TrainingSettings

IMAGES, VIEWS, CLASSES, DIM = 60, 5, 3, 100  # more dimensions than images: any labelling is separable


def views_without_signal(seed: int = 0) -> HeadInputs:
    """60 images with random labels (nothing to learn), each stored as itself plus 4 near-copies (its views)."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(IMAGES, DIM))
    labels = np.repeat(np.arange(CLASSES), IMAGES // CLASSES)[rng.permutation(IMAGES)]
    features = np.repeat(images, VIEWS, axis=0) + rng.normal(scale=0.01, size=(IMAGES * VIEWS, DIM))
    groups = np.repeat([f"hash{i:02d}" for i in range(IMAGES)], VIEWS)
    rows = np.arange(IMAGES * VIEWS)
    return HeadInputs(rows=rows, labels=np.repeat(labels, VIEWS), is_val=np.zeros(len(rows), bool),
                      n_classes=CLASSES, read=lambda some: features[some], block_rows=64, groups=groups)


def test_no_image_has_views_on_both_sides_of_a_fold():
    data = views_without_signal()
    folds = search_folds(data.labels, data.is_val, 3, 42, data.groups)
    splits = list(folds.split(data.features(), data.labels, data.groups))
    assert len(splits) == 3
    for train, held_out in splits:
        assert not set(data.groups[train]) & set(data.groups[held_out])
        assert len(np.unique(data.labels[held_out])) == CLASSES  # still stratified


@pytest.mark.parametrize("head", ["logreg", "linear-svm"])
def test_cv_score_is_not_inflated_by_views_of_held_out_images(head):
    # Labels are noise: an honest cross-validated accuracy is near chance (1/3). Scoring a view while its
    # near-identical siblings trained the model would score ~1 with a large C.
    _, summary = HEADS[head].fit(views_without_signal(), TrainingSettings(head=head, c_grid=[100.0]))
    assert summary["cv_score"] < 0.6, summary
