"""The report's data checks on real features: Lite0 (the offline ImageNet package) on real digits laid out in
train/ and test/, with planted label errors (training digits moved into another class's folder) and planted
near-copies of test digits (re-encoded as JPEG at two qualities) sitting in train/."""
from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.support import check_html
from transfer_flow.storage.demo_dataset import write_digits_dataset
from transfer_flow.storage.feature_store import read_contents
from transfer_flow.storage.report import write_report
from transfer_flow.storage.report_metrics import ReportMetrics
from transfer_flow.tasks import data_checks
from transfer_flow.tasks.data_checks import (
    NEAR_DUPLICATE_NEIGHBOURS,
    NEAR_DUPLICATE_SIMILARITY,
    comparable,
    feature_map,
    map_rows,
    near_duplicates,
    stratified_sample,
)
from transfer_flow.tasks.evaluation import data_check_pictures, evaluate_bundle
from transfer_flow.tasks.extraction import ExtractionSettings, extract_features
from transfer_flow.tasks.hashing import hash_manifest
from transfer_flow.tasks.listing import list_dataset
from transfer_flow.tasks.splitting import split_manifest
from transfer_flow.tasks.training import TrainingSettings, train_head

TRAIN_PER_CLASS, TEST_PER_CLASS = 40, 8  # 480 digits: extraction at 128 px takes seconds once TensorFlow is up
IMAGE_SIZE = 128  # at 64 px with 24 digits a class, logreg scored 0.62: too weak to tell a wrong label from a hard one
# (class folder it came from, image index within that class, folder it is planted in): digits unlike the class
# they are filed under.
MISLABELLED = [("0", 0, "1"), ("0", 1, "7"), ("6", 0, "4"), ("3", 0, "0")]
COPIED = [("2", 0), ("5", 1)]  # test digits whose near-copies are planted in train/


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(store, bundle, dataset root, mislabelled paths → true class, {(copy path, test path)})."""
    root = tmp_path_factory.mktemp("checked_digits")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_HOME", str(root / "keras_home"))  # the weight conversion stays out of the user's cache
        every = write_digits_dataset(root / "all")
        data = root / "digits"
        for folder in sorted(every.iterdir()):
            images = sorted(folder.glob("*.png"))
            for split, chosen in (("train", images[:TRAIN_PER_CLASS]),
                                  ("test", images[TRAIN_PER_CLASS:TRAIN_PER_CLASS + TEST_PER_CLASS])):
                (data / split / folder.name).mkdir(parents=True)
                for image in chosen:
                    shutil.copy(image, data / split / folder.name / image.name)
        mislabelled = {}
        for source, index, target in MISLABELLED:
            image = sorted((data / "train" / source).glob("*.png"))[index]
            moved = data / "train" / target / image.name
            image.rename(moved)
            mislabelled[f"train/{target}/{image.name}"] = source
        copies = set()
        for label, index in COPIED:
            original = sorted((data / "test" / label).glob("*.png"))[index]
            pixels = Image.open(original).convert("RGB")
            # Re-encoded as JPEG, not resized: any resize of these blocky 8x8-upscaled digits moves Lite0's
            # features as far as another digit does (bench/near_duplicates.py), so no feature check finds it.
            made = []
            for quality in (90, 60):
                buffer = io.BytesIO()
                pixels.save(buffer, format="JPEG", quality=quality)
                made.append(data / "train" / label / f"q{quality}_{original.stem}.jpg")
                made[-1].write_bytes(buffer.getvalue())
            test_path = f"test/{label}/{original.name}"
            copies |= {(f"train/{label}/{copy.name}", test_path) for copy in made}
        manifest = split_manifest(hash_manifest(list_dataset(data))[0], test_size=0.25, seed=42)
        settings = ExtractionSettings(backbone="efficientnet_lite0", image_size=IMAGE_SIZE, batch_size=64)
        store = extract_features(manifest, root / "features.h5", settings).store
    training = train_head(store, root / "model", TrainingSettings(head="logreg", c_grid=[10.0]))  # the demo's C
    return store, training, data, mislabelled, copies


@pytest.fixture(scope="module")
def evaluated(planted):
    store, training, *_ = planted
    return evaluate_bundle(training.bundle, store, n_train=training.n_train)


@pytest.mark.slow  # Lite0 extraction and a logreg fit: a minute on a quiet machine
def test_planted_label_errors_are_the_top_suspects(planted, evaluated):
    _, _, _, mislabelled, _ = planted
    checks = evaluated.checks
    suspects = {item.path: item for item in checks.suspect_labels}
    ranked = [(s.path, round(s.label_probability, 4)) for s in checks.suspect_labels]
    assert set(mislabelled) <= set(suspects), (sorted(mislabelled), ranked)
    for path in mislabelled:
        assert suspects[path].label == path.split("/")[1] and suspects[path].label_probability < checks.suspect_cutoff
    # Mostly for the digit they are: measured, three of four (the 3 filed under 0 looks most like a 6 here).
    predicted = {path: suspects[path].predicted for path in mislabelled}
    assert sum(predicted[path] == true for path, true in mislabelled.items()) >= len(mislabelled) - 1, predicted
    # The planted ones come first: measured, ranks 1, 3, 4 and 5 (label probabilities under 0.002) of 32 suspects
    # among the 400 training digits; the others are clean digits that are hard for these features.
    top = [path for path, _ in ranked[:2 * len(mislabelled)]]
    assert set(mislabelled) <= set(top), ranked


@pytest.mark.slow  # Lite0 extraction and a logreg fit: a minute on a quiet machine
def test_planted_near_copies_are_found_across_the_split_and_distinct_digits_are_not(planted, evaluated):
    store, _, _, _, copies = planted
    checks = evaluated.checks
    found = {tuple(sorted(pair.paths)): pair for pair in checks.near_duplicates}
    for copy, original in copies:
        pair = found.get(tuple(sorted((copy, original))))
        assert pair is not None, (copy, original, list(found))
        assert pair.crosses_split and pair.similarity >= checks.near_duplicate_similarity
    planted_paths = {path for pair in copies for path in pair}
    strays = [pair for pair in checks.near_duplicates if not set(pair.paths) & planted_paths]
    assert not strays  # two different digits of one class are not near-duplicates
    assert checks.n_near_duplicates_crossing == len(copies) == sum(p.crosses_split for p in checks.near_duplicates)
    # The pair lists are ranked: every pair crossing train/test before the others.
    crossing = [pair.crosses_split for pair in checks.near_duplicates]
    assert crossing == sorted(crossing, reverse=True)
    contents = read_contents(store)
    assert checks.feature_map.rows == int((contents.view == 0).sum()) == checks.feature_map.points


@pytest.mark.slow  # Lite0 extraction and a logreg fit: a minute on a quiet machine
def test_report_embeds_the_feature_map_and_lists_the_checks(planted, evaluated, tmp_path):
    _, training, data, mislabelled, copies = planted
    spec, result = training.bundle.metadata, evaluated
    metrics = ReportMetrics(
        accuracy=result.accuracy, macro_f1=result.macro_f1, n_train=result.n_train, n_test=result.n_test,
        head=spec.head, backbone=spec.extraction.backbone, weights_source="offline-package",
        image_size=IMAGE_SIZE, pooling="avg", precision="float32", feature_dim=spec.feature_dim, store="x",
        class_names=result.class_names, per_class=result.per_class, confusion=result.confusion,
        **result.checks.model_dump(exclude={"feature_map_points"}))
    report = write_report(tmp_path / "report", metrics, result.classification_report, overwrite=False,
                          checks=data_check_pictures(data, result.checks))
    png = (report / "feature_map.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(io.BytesIO(png)).size[0] >= 600
    page = (report / "report.html").read_text()
    sources = check_html(page).sources
    assert "data:image/png;base64," + base64.b64encode(png).decode() in sources
    # Thumbnails: the confusion matrix, the map, each suspect, two per near-duplicate pair.
    assert len(sources) == 2 + result.checks.n_suspect_labels + 2 * result.checks.n_near_duplicates
    assert "train/test" in page.split("<h2>")[0]  # the leakage warning is on the first screen, above any section
    for path in mislabelled:
        assert path in page
    markdown = (report / "report.md").read_text()
    assert "![feature map](feature_map.png)" in markdown and all(copy in markdown for copy, _ in copies)


def test_the_map_keeps_every_test_row_and_samples_the_rest_by_class():
    labels = np.repeat(np.arange(4), [700, 100, 1500, 300])
    is_test = np.zeros(len(labels), bool)
    is_test[::10] = True
    rows = map_rows(labels, is_test, seed=0, cap=1000)
    assert len(rows) == 1000 and set(np.flatnonzero(is_test)) <= set(rows)
    others = rows[~is_test[rows]]
    share = np.bincount(labels[others], minlength=4) / len(others)
    expected = np.bincount(labels[~is_test], minlength=4) / (~is_test).sum()
    assert np.abs(share - expected).max() < 0.01
    assert np.array_equal(stratified_sample(labels, 5000, 0), np.arange(len(labels)))


@pytest.mark.parametrize("scale", [0.0, 1e-13, 1.0])
def test_the_map_is_drawn_at_any_feature_scale_and_skipped_when_nothing_differs(scale):
    """Random weights at tiny sizes give features of ~1e-13 (0 once stored as float16); Barnes-Hut t-SNE
    crashed the whole process on points that coincide. Tiny features are still mapped; constant ones are not."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(2), 30)
    features = (rng.normal(size=(60, 16)) + 3 * labels[:, None]) * scale
    is_test = np.arange(60) % 4 == 0
    drawn = feature_map(features, labels, is_test, np.zeros(60, bool), ["a", "b"], seed=0, total_rows=60)
    if scale == 0.0:
        assert drawn is None
    else:
        summary, points = drawn
        xy = np.column_stack([points.x, points.y])
        assert summary.points == 60 and np.isfinite(xy).all() and np.ptp(xy, axis=0).min() > 0
        # The two classes land apart: each point's nearest neighbour is of its own class.
        nearest = np.argsort(((xy[:, None] - xy[None]) ** 2).sum(-1), axis=1)[:, 1]
        assert (labels[nearest] == labels).mean() > 0.9


def exhaustive_near_duplicates(features: np.ndarray) -> dict[tuple[int, int], float]:
    """The search compared with every pair in full: each row's five most similar others at the threshold."""
    unit = comparable(features).astype(np.float64)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    pairs: dict[tuple[int, int], float] = {}
    for i, row in enumerate(similarity):
        for j in np.argsort(-row, kind="stable")[:NEAR_DUPLICATE_NEIGHBOURS]:
            if row[j] >= NEAR_DUPLICATE_SIMILARITY:
                pairs[(min(i, j), max(i, j))] = float(row[j])
    return pairs


@pytest.mark.parametrize("crowded", [data_checks.NEAR_DUPLICATE_CROWDED, 5])
def test_near_duplicate_search_finds_what_comparing_every_pair_finds(crowded, monkeypatch):
    """Clusters of near-copies (with 5, larger than a row's candidates may be, so the crowded-row path runs),
    singletons and exact copies, in 300 dimensions, queried 64 rows at a time: the projected search lists the same
    pairs at the same similarities."""
    monkeypatch.setattr(data_checks, "NEAR_DUPLICATE_CROWDED", crowded)
    monkeypatch.setattr(data_checks, "NEAR_DUPLICATE_QUERY_INDICES", 1)
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(40, 300))
    sizes = rng.choice([1, 1, 2, 3, 12], size=len(centres))
    features = np.concatenate([centre + rng.normal(scale=rng.choice([0.02, 0.1, 0.3]), size=(size, 300))
                               for centre, size in zip(centres, sizes)] + [centres[:3]])  # exact copies too
    paths = [f"img_{i}.png" for i in range(len(features))]
    splits = ["test" if i % 4 == 0 else "train" for i in range(len(features))]

    found = {tuple(sorted(pair.paths)): pair for pair in near_duplicates(features, paths, splits)}
    expected = {tuple(sorted((paths[a], paths[b]))): value for (a, b), value in
                exhaustive_near_duplicates(features).items()}
    assert len(expected) > 40 and set(found) == set(expected)
    assert max(abs(found[key].similarity - min(value, 1.0)) for key, value in expected.items()) < 1e-5
    for key, pair in found.items():
        a, b = (int(path[4:-4]) for path in key)
        assert pair.crosses_split == ((splits[a] == "test") != (splits[b] == "test"))
