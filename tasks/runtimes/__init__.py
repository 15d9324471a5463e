"""Runtimes: what runs a backbone's forward pass. One registry, read by the settings, the CLI and the bundle.

Every runtime gets the same Keras model (tasks/backbones.py: same weights resolution, same layers) and the
same preprocessed float32 batches; it only decides how the forward pass is run, and on which of Keras'
backends the model is built (set before Keras is first imported: keras_backend.py). Adding one is one entry
here plus its module, which provides:

    version() -> str                                  part of its compiled models' cache key
    default_precision(spec) -> Precision              the fastest measured on this machine
    forward(request: ForwardRequest) -> Callable      preprocessed batch (batch_size, S, S, 3) -> float32 features
    feature_map_forward(request) -> Callable | None   optional: batch -> (last feature maps, features), for CAM

keras-jax is Keras' JAX backend; its PyTorch backend would be one more entry (`keras_backend="torch"`), not
installed where this was built.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

from transfer_flow.storage.errors import SettingsError
from transfer_flow.tasks.backbones import (
    BackboneSpec,
    Pooling,
    Precision,
    ResolvedWeights,
    gpu_available,
    jax_gpu_available,
)
from transfer_flow.tasks.runtimes.calibration import CalibrationImages
from transfer_flow.tasks.runtimes.keras_backend import use_keras_backend


@dataclass(frozen=True)
class RuntimeSpec:
    name: str
    description: str
    module: str  # transfer_flow.tasks.runtimes.<module>, imported on first use
    precisions: tuple[Precision, ...]  # what `--precision` may ask of it
    package: str  # the import that must succeed for it to run
    install_hint: str
    keras_backend: str = "tensorflow"  # the Keras backend its model is built on (OpenVINO converts a TF-backed one)

    @property
    def imports(self) -> tuple[str, ...]:
        """What building its Keras model imports: imported ahead while a Prefect API starts (flows/cli.py)."""
        return self.keras_backend, "keras"

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def load(self) -> ModuleType:
        """Its module, with Keras' backend chosen for it (before Keras is imported; one line once it cannot be)."""
        if not self.installed():
            raise SettingsError(f"--runtime {self.name} needs {self.package}: {self.install_hint}")
        use_keras_backend(self.keras_backend, f"--runtime {self.name}")
        return importlib.import_module(f"{__name__}.{self.module}")


RUNTIMES: dict[str, RuntimeSpec] = {
    spec.name: spec
    for spec in (
        RuntimeSpec("tensorflow", "the Keras model under one compiled tf.function (GPU: mixed float16)",
                    "tensorflow_runtime", ("float32", "bfloat16", "float16"), "tensorflow",
                    "pip install tensorflow-cpu (or the gpu extra)"),
        RuntimeSpec("openvino", "the Keras model converted once with openvino.convert_model, cached compiled",
                    "openvino_runtime", ("float32", "bfloat16", "int8"), "openvino", "pip install openvino"),
        RuntimeSpec("keras-jax", "the Keras model on Keras' JAX backend under one jax.jit (no TensorFlow needed)",
                    "keras_jax_runtime", ("float32", "bfloat16", "float16"), "jax",
                    "pip install 'transfer-flow[jax]' (on a GPU: jax[cuda12])", keras_backend="jax"),
    )
}
RuntimeName = Literal[tuple(RUNTIMES)]
RuntimeChoice = Literal[("auto", *RUNTIMES)]


def get_runtime(name: str) -> RuntimeSpec:
    try:
        return RUNTIMES[name]
    except KeyError:
        raise SettingsError(f"Expected a runtime in {sorted(RUNTIMES)}, got {name!r}") from None


AUTO_RULE = ("keras-jax where JAX is installed and sees a GPU, or TensorFlow is not installed, or KERAS_BACKEND=jax; "
             "else OpenVINO on a CPU where installed; else TensorFlow")


def resolve_runtime(requested: str) -> str:
    """`auto`: AUTO_RULE. keras-jax is no default on a CPU beside TensorFlow: XLA's CPU pass measured far slower
    than OpenVINO's and TensorFlow's (BENCHMARKS.md, keras-jax)."""
    if requested != "auto":
        return get_runtime(requested).name
    if RUNTIMES["keras-jax"].installed() and (os.environ.get("KERAS_BACKEND") == "jax"
                                              or not RUNTIMES["tensorflow"].installed() or jax_gpu_available()):
        return "keras-jax"
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

