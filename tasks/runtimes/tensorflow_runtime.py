"""TensorFlow: the Keras model under one compiled `tf.function` (mixed precision through Keras' dtype policy)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from transfer_flow.tasks.backbones import BackboneSpec, Precision, build_feature_model, resolve_precision
from transfer_flow.tasks.runtimes import ForwardRequest


def version() -> str:
    import tensorflow as tf

    return tf.__version__


def default_precision(spec: BackboneSpec) -> Precision:
    return resolve_precision(spec, None)


def forward(request: ForwardRequest) -> Callable[[np.ndarray], np.ndarray]:
    import tensorflow as tf

    model = build_feature_model(request.backbone, image_size=request.image_size, pooling=request.pooling,
                                precision=request.precision, weights=request.weights)
    # A compiled function on fixed-shape batches: model.predict's per-call overhead halves throughput.
    compiled = tf.function(lambda batch: model(batch, training=False), reduce_retracing=True)
    return lambda batch: np.asarray(compiled(batch))
