"""OpenVINO: the Keras model converted once (`openvino.convert_model`), saved in the compiled-model cache and
compiled for the CPU; int8 by NNCF post-training quantisation on training images of the dataset.

The first run with a key builds the Keras model (TensorFlow), converts it (and quantises it), and saves the
IR in the cache (storage/compiled_models.py); OpenVINO keeps its compiled blob beside it (CACHE_DIR). Every
later run with the same key reads the IR and the blob: no TensorFlow import, no conversion, no compilation.
The report's CAM heatmaps read the same IR, with the last feature map added as an output (feature_map_forward).
"""
from __future__ import annotations

import importlib.util
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from transfer_flow.storage.compiled_models import (
    ENTRY_FILE,
    CompiledModelEntry,
    UnusableEntryError,
    entry_dir,
    publish_entry,
    read_entry,
    remove_entry,
)
from transfer_flow.storage.content_keys import content_key
from transfer_flow.storage.errors import SettingsError
from transfer_flow.storage.model_bundle import copy_bundled_backbone, load_bundle
from transfer_flow.tasks.backbones import BackboneSpec, Precision, build_feature_model, cpu_supports_bf16
from transfer_flow.tasks.efficientnet_lite import keras_home
from transfer_flow.tasks.images import decoded_batches
from transfer_flow.tasks.logs import stage_logger
from transfer_flow.tasks.runtimes import ForwardRequest

CONVERSION_VERSION = 1  # bump when conversion or quantisation changes what a cached model computes
# One synchronous request per batch: on 2 cores LATENCY and THROUGHPUT measured within noise of each other
# (bench/throughput.py --runtimes); LATENCY keeps one stream, so a batch uses every core.
PERFORMANCE_HINT = "LATENCY"
_HINT = {"float32": "f32", "bfloat16": "bf16", "int8": "f32"}  # int8: layers left unquantised run in f32


def version() -> str:
    import openvino

    return openvino.get_version()


def default_precision(spec: BackboneSpec) -> Precision:
    """bf16 where the CPU runs it natively: measured faster than f32 for every backbone here (BENCHMARKS.md),
    unlike TensorFlow's, where the depthwise backbones lose with it. int8 only when asked (it needs a
    calibration set and costs accuracy)."""
    return "bfloat16" if cpu_supports_bf16() else "float32"


def compiled_models_dir() -> Path:
    """Beside the Keras weights cache: `$TRANSFER_FLOW_COMPILED_MODELS`, else `$KERAS_HOME/compiled-models`."""
    return Path(os.environ.get("TRANSFER_FLOW_COMPILED_MODELS") or keras_home() / "compiled-models")


def int8_available() -> bool:
    return importlib.util.find_spec("nncf") is not None


def model_key(request: ForwardRequest) -> str:
    """What fixes the saved model: the batch size is not part of it (set at load), the precision is only when it
    changes the saved weights (int8); bf16 vs f32 is a compile option."""
    saved = "int8" if request.precision == "int8" else "float32"
    return content_key("openvino", request.backbone.name, request.weights.identity(), request.image_size,
                       request.pooling, saved, request.calibration, version(), CONVERSION_VERSION)


def forward(request: ForwardRequest) -> Callable[[np.ndarray], np.ndarray]:
    import openvino

    if request.precision == "int8" and not int8_available():
        raise SettingsError("--precision int8 needs NNCF: pip install 'transfer-flow[int8]' (or nncf)")
    folder = cached_model(request)
    core = openvino.Core()
    model = core.read_model(folder / "model.xml")
    infer = _infer(_compiled(core, model, folder, request))
    return lambda batch: infer(batch)[0]


def feature_map_forward(request: ForwardRequest) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None:
    """Preprocessed batch → (its last feature maps (n, height, width, channels) float32, its pooled features), by
    the cached model of `request` with the pooling's input added as a second output, compiled at the request's
    precision: the maps the stored features were pooled from (CAM heatmaps), with no TensorFlow. None when the
    cache holds no intact model for `request` (nor a bundle carrying it) or its pooling is not where expected (the
    caller builds its own)."""
    import openvino

    folder = cached_entry(request) or (cached_model(request) if request.bundle else None)
    if folder is None:
        return None
    core = openvino.Core()
    model = core.read_model(folder / "model.xml")
    try:
        feature_map, order = last_feature_map(model, request)
    except UnusableEntryError as error:
        stage_logger().warning("heatmaps: the cached model in %s gives no feature map (%s)", folder, error)
        return None
    model.add_outputs([feature_map])
    infer = _infer(_compiled(core, model, folder, request))

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features, maps = infer(batch)
        return maps.transpose(order), features

    return run


_POOLING_OPS = {"avg": "ReduceMean", "max": "ReduceMax", "flatten": "Reshape"}
_PASS_THROUGH = {"Convert"}  # what conversion may leave between the pooling and the model's output


def last_feature_map(model, request: ForwardRequest) -> tuple[object, tuple[int, int, int, int]]:
    """The output of `model` (a converted build_feature_model) that its pooling reads, the last feature map, and
    the axis order taking it to (n, height, width, channels): conversion keeps Keras' channels-last at the input
    and output but may run the body channels-first, so the layout is read off the pooling's own axes, and checked
    against the backbone's channel count (the sides are the network's own: valid-padded ones are smaller than
    size / stride). Raises UnusableEntryError when the model does not end as build_feature_model's do."""
    results = model.get_results()
    if len(results) != 1:
        raise UnusableEntryError(f"expected one output, the model has {len(results)}")
    node = results[0].input_value(0).get_node()
    while node.get_type_name() in _PASS_THROUGH:
        node = node.input_value(0).get_node()
    expected = _POOLING_OPS[request.pooling]
    if node.get_type_name() != expected:
        raise UnusableEntryError(f"expected {request.pooling} pooling ({expected}) before the output, "
                                 f"found {node.get_type_name()}")
    feature_map = node.input_value(0)
    shape = feature_map.get_partial_shape()
    if shape.rank.is_dynamic or shape.rank.get_length() != 4:
        raise UnusableEntryError(f"expected a (batch, height, width, channels) map before the pooling, got {shape}")
    if request.pooling == "flatten":  # Keras flattens channels-last: the reshape's input is in that order
        order = (0, 1, 2, 3)
    else:
        axes = sorted(int(axis) % 4 for axis in node.input_value(1).get_node().get_data().ravel())
        if len(axes) != 2 or 0 in axes:
            raise UnusableEntryError(f"expected the pooling to reduce two spatial axes, it reduces {axes}")
        channel = ({1, 2, 3} - set(axes)).pop()
        order = (0, axes[0], axes[1], channel)
    channels = shape[order[3]]
    if channels.is_dynamic or channels.get_length() != request.backbone.channels:
        raise UnusableEntryError(f"expected {request.backbone.channels} channels in the map before the pooling, got "
                                 f"{shape} read as channels on axis {order[3]}")
    return feature_map, order


def _compiled(core, model, folder: Path, request: ForwardRequest):
    """`model` reshaped to the request's batch and compiled at its precision, through the entry's blob cache."""
    model.reshape({model.inputs[0]: [request.batch_size, request.image_size, request.image_size, 3]})
    config = {"PERFORMANCE_HINT": PERFORMANCE_HINT, "INFERENCE_PRECISION_HINT": _HINT[request.precision],
              "CACHE_DIR": str(folder / "blobs")}
    try:
        return core.compile_model(model, "CPU", config)
    except RuntimeError as error:  # a damaged compiled blob: drop it and compile afresh
        stage_logger().warning("extract: compiled blob in %s unusable (%s); compiling again", folder,
                               str(error).splitlines()[0][:160])
        remove_entry(folder / "blobs")
        return core.compile_model(model, "CPU", config)


def _infer(compiled) -> Callable[[np.ndarray], list[np.ndarray]]:
    """Batch → the compiled model's outputs in order, through one infer request (a Dask worker's threads may
    share an extractor: one at a time)."""
    request = compiled.create_infer_request()
    lock = threading.Lock()

    def run(batch: np.ndarray) -> list[np.ndarray]:
        with lock:
            results = request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
            return [np.array(results[output]) for output in compiled.outputs]

    return run


def cached_entry(request: ForwardRequest) -> Path | None:
    """The folder holding this request's converted model when the cache has it intact, else None (an unusable
    entry is logged and left for the next extraction to rebuild): nothing is built."""
    key = model_key(request)
    folder = entry_dir(compiled_models_dir(), request.backbone.name, key)
    try:
        return folder if read_entry(folder, key) is not None else None
    except UnusableEntryError as error:
        stage_logger().warning("cached model in %s unusable: %s", folder, error)
        return None


def has_cached_entry(request: ForwardRequest) -> bool:
    """Whether the cache has an entry for this request, unchecked (no file is hashed): a hint of what a run will
    import, for a command about to start one. The entry is checked where it is loaded."""
    return (entry_dir(compiled_models_dir(), request.backbone.name, model_key(request)) / ENTRY_FILE).is_file()


def cached_model(request: ForwardRequest) -> Path:
    """The folder holding this request's converted model, built and published once."""
    key = model_key(request)
    folder = entry_dir(compiled_models_dir(), request.backbone.name, key)
    try:
        if read_entry(folder, key) is not None:
            return folder
    except UnusableEntryError as error:
        stage_logger().warning("extract: cached model unusable, rebuilding it: %s", error)
        remove_entry(folder)
    if request.bundle:
        seed_from_bundle(request, folder, key)
        return folder
    if request.precision == "int8" and request.calibration_images is None:
        raise SettingsError(f"The int8 model for these features ({request.calibration}) is not in the compiled-model "
                            f"cache ({compiled_models_dir()}) and needs its training images to be rebuilt: rerun "
                            "`transfer-flow run` on the dataset")
    log = stage_logger()
    log.info("extract: converting %s for OpenVINO (%s%s), once: cached in %s", request.backbone.name,
             "int8, calibrating on training images" if request.precision == "int8" else "float32",
             f" ×{len(request.calibration_images.paths)}" if request.calibration_images else "", folder)

    def write(tmp: Path) -> CompiledModelEntry:
        model = convert(request)
        openvino = __import__("openvino")
        openvino.save_model(model, tmp / "model.xml", compress_to_fp16=False)  # fp16 weights would move rows
        images = request.calibration_images
        return CompiledModelEntry(
            key=key, runtime="openvino", runtime_version=version(), files={},
            description=f"{request.backbone.name} {request.image_size}px {request.pooling} "
                        f"{'int8' if images else 'float32'} weights {request.weights.identity()}",
            calibration_hashes=images.hashes if images else [])

    publish_entry(folder, write)
    return folder


def seed_from_bundle(request: ForwardRequest, folder: Path, key: str) -> None:
    """Publish the converted model a bundle carries as this request's cache entry (its files checked on the copy)."""
    bundle = load_bundle(Path(request.bundle))
    stage_logger().info("predict: the compiled-model cache lacks %s's model: taking it from %s", request.backbone.name,
                        request.bundle)

    def write(tmp: Path) -> CompiledModelEntry:
        copy_bundled_backbone(bundle, tmp)
        return CompiledModelEntry(
            key=key, runtime="openvino", runtime_version=version(), files={},
            description=f"{request.backbone.name} {request.image_size}px {request.pooling} {request.precision} "
                        f"weights {request.weights.identity()}, from bundle {request.bundle}")

    publish_entry(folder, write)


def convert(request: ForwardRequest) -> object:
    """The Keras model as today (fp32 layers; bf16 is a compile option), as an OpenVINO model, quantised for int8."""
    import openvino

    keras_model = build_feature_model(request.backbone, image_size=request.image_size, pooling=request.pooling,
                                      precision="float32", weights=request.weights)
    with warnings.catch_warnings():
        # The converter calls the model on a tuple of one input; Keras warns that the structure differs, and runs it.
        warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match", category=UserWarning)
        model = openvino.convert_model(keras_model, input=[(-1, request.image_size, request.image_size, 3)])
    if request.precision != "int8":
        return model
    import nncf

    images = request.calibration_images
    batches = [np.stack([image for image in batch if not isinstance(image, str)])
               for batch in decoded_batches([Path(images.root) / p for p in images.paths], request.image_size,
                                            request.batch_size)]
    batches = [request.backbone.preprocess(batch) for batch in batches if len(batch)]
    return nncf.quantize(model, nncf.Dataset(batches), subset_size=sum(len(b) for b in batches))
