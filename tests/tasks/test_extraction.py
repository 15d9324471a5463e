import numpy as np
import pytest

from storage.errors import OutputExistsError
from storage.feature_store import read_contents, read_features
from tasks.extraction import ExtractionSettings, extract_features
from tasks.listing import list_dataset
from tasks.splitting import split_manifest

SETTINGS = dict(backbone="mobilenet_v2", weights="none", image_size=32, pooling="avg")


@pytest.fixture(scope="module")
def messy_manifest(messy_dataset):
    return split_manifest(list_dataset(messy_dataset, seed=0), test_size=0.25, seed=0)


def test_broken_images_are_skipped_with_reasons_and_every_other_image_is_a_row(tmp_path, messy_manifest):
    result = extract_features(messy_manifest, tmp_path / "f.h5", ExtractionSettings(**SETTINGS, batch_size=8))
    skipped = {s.path: s.reason for s in result.images_skipped}
    assert set(skipped) == {"red/empty.jpg", "green/truncated.jpg", "blue/not_really.png"}
    assert "empty" in skipped["red/empty.jpg"]
    assert result.images_extracted + len(skipped) == len(messy_manifest.records)
    contents = read_contents(result.store)
    listed = {r.path: r for r in messy_manifest.records}
    assert set(contents.paths) == set(listed) - set(skipped)
    for path, label, split in zip(contents.paths, contents.labels, contents.split):
        assert contents.label_names[label] == listed[path].label and split == listed[path].split
    # Rows keep the manifest's shuffled order.
    assert contents.paths == [r.path for r in messy_manifest.records if r.path not in skipped]
    assert result.store.attrs["backbone"] == "mobilenet_v2" and result.store.attrs["weights_source"] == "random"
    assert np.isfinite(read_features(result.store, np.arange(result.store.n_rows))).all()


@pytest.fixture(scope="module")
def saved_weights(tmp_path_factory):
    """Fixed (random) weights in a file: the same numbers for every build, loaded through --weights PATH."""
    from tasks.backbones import get_backbone

    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2.weights.h5"
    get_backbone("mobilenet_v2").build_base((32, 32, 3), None).save_weights(path)
    return path


def test_features_do_not_depend_on_batch_padding(tmp_path, messy_manifest, saved_weights):
    settings = {**SETTINGS, "weights": str(saved_weights)}
    # 5 does not divide the row count, so the last batch is padded; batch 1 pads every image.
    a = extract_features(messy_manifest, tmp_path / "a.h5", ExtractionSettings(**settings, batch_size=5))
    b = extract_features(messy_manifest, tmp_path / "b.h5", ExtractionSettings(**settings, batch_size=1))
    assert a.weights.source == "path"
    rows = np.arange(a.store.n_rows)
    assert read_contents(a.store).paths == read_contents(b.store).paths
    fa, fb = read_features(a.store, rows), read_features(b.store, rows)
    assert np.abs(fa).max() > 0
    np.testing.assert_allclose(fa, fb, rtol=1e-4, atol=1e-5)


def test_existing_store_is_not_overwritten(tmp_path, messy_manifest):
    (tmp_path / "f.h5").write_bytes(b"user data")
    with pytest.raises(OutputExistsError):
        extract_features(messy_manifest, tmp_path / "f.h5", ExtractionSettings(**SETTINGS))
    assert (tmp_path / "f.h5").read_bytes() == b"user data"
