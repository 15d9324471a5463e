"""Runtimes: what runs a backbone's forward pass. One registry, read by the settings, the CLI and the bundle.

Every runtime gets the same Keras model (tasks/backbones.py: same weights resolution, same layers) and the
same preprocessed float32 batches; it only decides how the forward pass is run. Adding one is one entry
here plus its module, which provides:

    version() -> str                                  part of its compiled models' cache key
    default_precision(spec) -> Precision              the fastest measured on this machine
    forward(request: ForwardRequest) -> Callable      preprocessed batch (batch_size, S, S, 3) -> float32 features
    feature_map_forward(request) -> Callable | None   optional: batch -> (last feature maps, features), for CAM

Keras' JAX and PyTorch backends would be entries too; neither is installed where this was built.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

from transfer_flow.storage.errors import SettingsError
from transfer_flow.tasks.backbones import BackboneSpec, Pooling, Precision, ResolvedWeights, gpu_available
from transfer_flow.tasks.runtimes.calibration import CalibrationImages


@dataclass(frozen=True)
class RuntimeSpec:
    name: str
    description: str
    module: str  # transfer_flow.tasks.runtimes.<module>, imported on first use
    precisions: tuple[Precision, ...]  # what `--precision` may ask of it
    package: str  # the import that must succeed for it to run
    install_hint: str

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def load(self) -> ModuleType:
        if not self.installed():
            raise SettingsError(f"--runtime {self.name} needs {self.package}: {self.install_hint}")
        return importlib.import_module(f"{__name__}.{self.module}")


RUNTIMES: dict[str, RuntimeSpec] = {
    spec.name: spec
    for spec in (
        RuntimeSpec("tensorflow", "the Keras model under one compiled tf.function (GPU: mixed float16)",
                    "tensorflow_runtime", ("float32", "bfloat16", "float16"), "tensorflow",
                    "pip install tensorflow-cpu (or the gpu extra)"),
        RuntimeSpec("openvino", "the Keras model converted once with openvino.convert_model, cached compiled",
                    "openvino_runtime", ("float32", "bfloat16", "int8"), "openvino", "pip install openvino"),
    )
}
RuntimeName = Literal[tuple(RUNTIMES)]
RuntimeChoice = Literal[("auto", *RUNTIMES)]


def get_runtime(name: str) -> RuntimeSpec:
    try:
        return RUNTIMES[name]
    except KeyError:
        raise SettingsError(f"Expected a runtime in {sorted(RUNTIMES)}, got {name!r}") from None


def resolve_runtime(requested: str) -> str:
    """`auto`: OpenVINO on a CPU-only machine where it is installed; TensorFlow on a GPU or without OpenVINO."""
    if requested != "auto":
        return get_runtime(requested).name
    if RUNTIMES["openvino"].installed() and not gpu_available():
        return "openvino"
    return "tensorflow"


def resolve_runtime_precision(backbone: BackboneSpec, requested: Precision | None, runtime: str) -> Precision:
    """The user's precision if this runtime has it (else one line saying which do), or the runtime's fastest."""
    spec = get_runtime(runtime)
    if requested is None:
        return spec.load().default_precision(backbone)
    if requested not in spec.precisions:
        others = [name for name, other in RUNTIMES.items() if requested in other.precisions]
        raise SettingsError(f"--precision {requested} is not available with --runtime {runtime} "
                            f"(it has {', '.join(spec.precisions)}; {requested} needs --runtime {' or '.join(others)})")
    return requested


@dataclass(frozen=True)
class ForwardRequest:
    """What a runtime needs to make a backbone's forward pass."""

    backbone: BackboneSpec
    image_size: int
    pooling: Pooling
    precision: Precision
    weights: ResolvedWeights
    batch_size: int
    calibration: str = ""  # identity of the int8 calibration set ("" otherwise)
    calibration_images: CalibrationImages | None = None  # needed only to build an int8 model not yet cached
    bundle: str = ""  # a model bundle carrying this converted model (int8), to seed a cache that lacks it

