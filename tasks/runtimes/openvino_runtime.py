"""OpenVINO: the Keras model converted once (`openvino.convert_model`), saved in the compiled-model cache and
compiled for the CPU; int8 by NNCF post-training quantisation on training images of the dataset.

The first run with a key builds the Keras model (TensorFlow), converts it (and quantises it), and saves the
IR in the cache (storage/compiled_models.py); OpenVINO keeps its compiled blob beside it (CACHE_DIR). Every
later run with the same key reads the IR and the blob: no TensorFlow import, no conversion, no compilation.
"""
from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from transfer_flow.storage.compiled_models import (
    CompiledModelEntry,
    UnusableEntryError,
    entry_dir,
    publish_entry,
    read_entry,
    remove_entry,
)
from transfer_flow.storage.content_keys import content_key
from transfer_flow.storage.errors import SettingsError
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
    model.reshape([request.batch_size, request.image_size, request.image_size, 3])
    config = {"PERFORMANCE_HINT": PERFORMANCE_HINT, "INFERENCE_PRECISION_HINT": _HINT[request.precision],
              "CACHE_DIR": str(folder / "blobs")}
    try:
        compiled = core.compile_model(model, "CPU", config)
    except RuntimeError as error:  # a damaged compiled blob: drop it and compile afresh
        stage_logger().warning("extract: compiled blob in %s unusable (%s); compiling again", folder,
                               str(error).splitlines()[0][:160])
        remove_entry(folder / "blobs")
        compiled = core.compile_model(model, "CPU", config)
    request_ = compiled.create_infer_request()
    lock = threading.Lock()  # one infer request; a Dask worker's threads may share this extractor

    def run(batch: np.ndarray) -> np.ndarray:
        with lock:
            return np.array(request_.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})[0])

    return run


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


def convert(request: ForwardRequest) -> object:
    """The Keras model as today (fp32 layers; bf16 is a compile option), as an OpenVINO model, quantised for int8."""
    import openvino

    keras_model = build_feature_model(request.backbone, image_size=request.image_size, pooling=request.pooling,
                                      precision="float32", weights=request.weights)
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
