"""Keras on JAX: the same Keras model (tasks/backbones.py) with Keras' JAX backend, its forward pass one `jax.jit`
of the model's stateless call. Needs no TensorFlow: a GPU machine with JAX alone runs the real extraction.

Keras takes its backend at its first import (tasks/runtimes/keras_backend.py): loading this runtime sets it to
jax, and a process whose Keras already runs on TensorFlow is refused in one line.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from transfer_flow.tasks.backbones import (
    BackboneSpec,
    Precision,
    build_feature_model,
    jax_gpu_available,
    pooling_layer_name,
)
from transfer_flow.tasks.runtimes import ForwardRequest


def version() -> str:
    import jax

    return jax.__version__


def default_precision(spec: BackboneSpec) -> Precision:
    """float16 (mixed) on a GPU: Lite0 on JAX, H100, gave fp32's answers at 1.13x its rate (BENCHMARKS.md, GPU
    check). float32 on a CPU: XLA's CPU bf16 measured no faster than its fp32 (BENCHMARKS.md, keras-jax)."""
    return "float16" if jax_gpu_available() else "float32"


def _jitted(model) -> Callable[[np.ndarray], object]:
    """`model`'s inference pass as one compiled XLA program: the variables' values are arguments, so the
    program does not embed them as constants, and one trace serves every batch of the same shape."""
    import jax

    trainable = [variable.value for variable in model.trainable_variables]
    non_trainable = [variable.value for variable in model.non_trainable_variables]

    @jax.jit
    def run(trainable, non_trainable, batch):
        outputs, _ = model.stateless_call(trainable, non_trainable, batch, training=False)
        return outputs

    return lambda batch: run(trainable, non_trainable, batch)


def _model(request: ForwardRequest):
    return build_feature_model(request.backbone, image_size=request.image_size, pooling=request.pooling,
                               precision=request.precision, weights=request.weights)


def forward(request: ForwardRequest) -> Callable[[np.ndarray], np.ndarray]:
    run = _jitted(_model(request))
    return lambda batch: np.asarray(run(batch))


def feature_map_forward(request: ForwardRequest) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Preprocessed batch → (its last feature maps (n, height, width, channels) float32, its pooled features): the
    same model with the pooling's input as a second output, so CAM's maps are those the rows were pooled from."""
    import keras

    model = _model(request)
    maps = model.get_layer(pooling_layer_name(request.pooling)).input
    run = _jitted(keras.Model(model.input, [keras.ops.cast(maps, "float32"), model.output]))

    def both(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, features = run(batch)
        return np.asarray(maps), np.asarray(features)

    return both
