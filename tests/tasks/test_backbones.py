import socket

import numpy as np
import pytest

from transfer_flow.storage.errors import SettingsError, WeightsUnavailableError
from transfer_flow.tasks.backbones import (
    BACKBONES,
    build_feature_model,
    get_backbone,
    resolve_weights,
    weights_available_offline,
)


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(SettingsError, match="vgg16"):
        get_backbone("alexnet")


@pytest.mark.parametrize("name", ["vgg16", "mobilenet_v2"])
@pytest.mark.parametrize("pooling", ["flatten", "avg", "max"])
def test_feature_dim_matches_the_built_model(name, pooling):
    spec = get_backbone(name)
    model = build_feature_model(spec, image_size=64, pooling=pooling, precision="float32",
                                weights=resolve_weights(spec, "none"))
    out = np.asarray(model(np.zeros((2, 64, 64, 3), np.float32)))
    assert out.shape == (2, spec.feature_dim(pooling, 64))
    assert out.dtype == np.float32


@pytest.mark.slow  # builds 27 models: about 35 s in all
@pytest.mark.parametrize("name", list(BACKBONES))
def test_flatten_width_is_the_built_models_at_every_size(name):
    # 100 px is no multiple of 32: VGG16's pooling floors, InceptionV3's and Xception's valid-padded stems shrink
    # the map below ceil(size / 32); the smallest size is where a side of 1 must not become 0 or 2.
    spec = get_backbone(name)
    for size in sorted({spec.min_size, 100, spec.native_size}):
        model = build_feature_model(spec, image_size=size, pooling="flatten", precision="float32",
                                    weights=resolve_weights(spec, "none"))
        assert model.output.shape[1] == spec.feature_dim("flatten", size), f"{name} at {size} px"


def test_valid_padded_backbones_have_smaller_maps_than_size_over_32():
    sides = {(name, size): get_backbone(name).feature_side(size)
             for name, size in [("inception_v3", 75), ("inception_v3", 299), ("vgg16", 100), ("xception", 100)]}
    assert sides == {("inception_v3", 75): 1, ("inception_v3", 299): 8, ("vgg16", 100): 3, ("xception", 100): 3}


def test_every_backbones_smallest_input_leaves_a_map_and_smaller_is_refused():
    for spec in BACKBONES.values():
        assert spec.feature_side(spec.min_size) >= 1
        with pytest.raises(SettingsError, match=f"at least {spec.min_size}"):
            spec.feature_dim("flatten", spec.min_size - 1)


def test_classic_vgg16_flatten_is_25088_wide():
    assert get_backbone("vgg16").feature_dim("flatten", 224) == 25088


def test_bfloat16_model_still_returns_float32_features():
    spec = get_backbone("mobilenet_v2")
    model = build_feature_model(spec, image_size=32, pooling="avg", precision="bfloat16",
                                weights=resolve_weights(spec, "none"))
    assert np.asarray(model(np.zeros((1, 32, 32, 3), np.float32))).dtype == np.float32
    import keras
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored


def test_too_small_image_is_a_settings_error():
    spec = get_backbone("inception_v3")
    with pytest.raises(SettingsError, match="at least 75"):
        build_feature_model(
            spec, image_size=32, pooling="avg", precision="float32", weights=resolve_weights(spec, "none")
        )


def test_resolution_order_path_then_cache_then_download(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    spec = get_backbone("vgg16")
    assert resolve_weights(spec, "none").source == "random"
    assert resolve_weights(spec, "imagenet").source == "download"
    assert weights_available_offline(spec) is None
    cached = tmp_path / "keras" / "models" / spec.download_file
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert resolve_weights(spec, "imagenet").model_dump() == {"source": "keras-cache", "file": str(cached)}
    assert weights_available_offline(spec) == "keras-cache"
    mine = tmp_path / "mine.weights.h5"
    mine.write_bytes(b"x")
    assert resolve_weights(spec, str(mine)).source == "path"


def test_bad_weights_paths_are_clear_errors(tmp_path):
    spec = get_backbone("vgg16")
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        resolve_weights(spec, str(tmp_path / "missing.h5"))
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(SettingsError, match=".h5"):
        resolve_weights(spec, str(tmp_path / "weights.pt"))


def _online() -> bool:
    try:
        socket.getaddrinfo("storage.googleapis.com", 443)
        return True
    except OSError:
        return False


@pytest.mark.skipif(_online(), reason="the network is reachable: the weights would really download")
def test_offline_download_fails_fast_naming_the_file_and_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    spec = get_backbone("vgg16")
    with pytest.raises(WeightsUnavailableError) as caught:
        build_feature_model(spec, image_size=32, pooling="avg", precision="float32",
                            weights=resolve_weights(spec, "imagenet"))
    assert spec.download_file in str(caught.value)
    assert "--weights PATH" in str(caught.value)


def test_lite_resolves_offline_package_then_keras_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    spec = get_backbone("efficientnet_lite0")
    assert weights_available_offline(spec) == "offline-package"
    first = resolve_weights(spec, "imagenet")  # converts once into the Keras cache
    assert first.source == "offline-package" and first.file.startswith(str(tmp_path))
    second = resolve_weights(spec, "imagenet")
    assert second.model_dump() == {"source": "keras-cache", "file": first.file}
    assert weights_available_offline(spec) == "keras-cache"


def test_every_backbone_has_preprocessing_and_sizes():
    for spec in BACKBONES.values():
        assert spec.preprocessing and spec.native_size >= spec.min_size
        assert spec.preprocess(np.full((1, 8, 8, 3), 255, np.uint8)).dtype == np.float32


def test_preprocessing_matches_keras_applications():
    import keras

    modules = {"vgg16": "vgg16", "resnet50": "resnet50", "mobilenet_v2": "mobilenet_v2",
               "efficientnet_b0": "efficientnet", "inception_v3": "inception_v3", "xception": "xception"}
    batch = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3)).astype(np.uint8)
    for name, module in modules.items():
        expected = getattr(keras.applications, module).preprocess_input(batch.astype(np.float32))
        np.testing.assert_allclose(get_backbone(name).preprocess(batch), expected, rtol=1e-6, atol=1e-4)
