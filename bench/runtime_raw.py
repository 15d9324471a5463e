#!/usr/bin/env python3
"""Raw forward passes of one backbone per runtime, precision and OpenVINO performance hint.

    .venv/bin/python bench/runtime_raw.py [--backbone efficientnet_lite0] [--size 224] [--seconds 8] [--no-jax]

Same preprocessed batch (32 random images) for every variant, run back to back, so a machine whose load
drifts (other jobs) moves every row alike; the ratio between rows is the figure to quote. Also prints the
one-time conversion cost and the mean relative |Δ| of each variant's features against TensorFlow fp32.
TensorFlow and OpenVINO run in this process; keras-jax (the runtime's own forward: Keras on JAX, one jax.jit)
in a child process right after, as Keras takes one backend per process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def setup(args):
    from transfer_flow.tasks.backbones import get_backbone, resolve_weights

    spec = get_backbone(args.backbone)
    size = args.size or spec.native_size
    weights = resolve_weights(spec, "imagenet" if spec.offline_weights else "none")
    batch = spec.preprocess(np.random.default_rng(0).integers(0, 255, (32, size, size, 3)).astype(np.uint8))

    def rate(forward) -> float:
        forward(batch), forward(batch)
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < args.seconds:
            forward(batch)
            n += len(batch)
        return n / (time.perf_counter() - start)

    return spec, size, weights, batch, rate


def keras_jax_rows(args) -> None:
    """The child: keras-jax float32 and bfloat16 rates, and each one's features of the batch (to args.features)."""
    from transfer_flow.tasks.runtimes import ForwardRequest, get_runtime

    runtime = get_runtime("keras-jax").load()  # sets KERAS_BACKEND=jax before Keras is imported
    spec, size, weights, batch, rate = setup(args)
    rows, features = [], {}
    for precision in ("float32", "bfloat16"):
        start = time.perf_counter()
        forward = runtime.forward(ForwardRequest(backbone=spec, image_size=size, pooling="avg", precision=precision,
                                                 weights=weights, batch_size=len(batch)))
        features[precision] = forward(batch)  # the first call traces and compiles
        ready = time.perf_counter() - start
        rows.append((f"keras-jax {precision} (jax.jit)", rate(forward), ready))
    np.savez(args.features, **features)
    print(json.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--no-jax", action="store_true", help="leave keras-jax out")
    parser.add_argument("--features", help=argparse.SUPPRESS)  # the keras-jax child's output file
    args = parser.parse_args()
    if args.features:
        return keras_jax_rows(args)

    import openvino as ov
    import tensorflow as tf

    from transfer_flow.tasks.backbones import build_feature_model

    spec, size, weights, batch, rate = setup(args)
    model = build_feature_model(spec, image_size=size, pooling="avg", precision="float32", weights=weights)

    compiled = tf.function(lambda b: model(b, training=False))
    reference = np.asarray(compiled(batch))
    rows = [("tensorflow float32 (tf.function)", rate(compiled), 0.0)]
    start = time.perf_counter()
    converted = ov.convert_model(model, input=[(32, size, size, 3)])
    conversion = time.perf_counter() - start
    core = ov.Core()
    for precision in ("f32", "bf16"):
        for hint in ("LATENCY", "THROUGHPUT"):
            request = core.compile_model(converted, "CPU", {"PERFORMANCE_HINT": hint,
                                                            "INFERENCE_PRECISION_HINT": precision}).create_infer_request()

            def forward(b, request=request):
                return request.infer({0: b})[0]

            delta = float(np.abs(np.asarray(forward(batch)) - reference).mean() / np.abs(reference).mean())
            rows.append((f"openvino {precision} {hint}", rate(forward), delta))
    if not args.no_jax:
        with tempfile.TemporaryDirectory() as folder:
            child = [sys.executable, __file__, "--backbone", args.backbone, "--size", str(size), "--seconds",
                     str(args.seconds), "--features", f"{folder}/features.npz"]
            done = subprocess.run(child, capture_output=True, text=True, check=True)
            features = np.load(f"{folder}/features.npz")
            for name, value, ready in json.loads(done.stdout.strip().splitlines()[-1]):
                delta = float(np.abs(features[name.split()[1]] - reference).mean() / np.abs(reference).mean())
                rows.append((name, value, delta))
                print(f"{name}: model build, trace and XLA compile {ready:.1f} s")
    print(f"{args.backbone} at {size} px, batch 32, {os.cpu_count()} CPUs; conversion {conversion:.1f} s "
          f"({weights.source} weights)")
    for name, value, delta in rows:
        print(f"{name:<34} {value:8.1f} img/s  {value / rows[0][1]:5.2f}x TF fp32  rel |Δ| {delta:.4f}")


if __name__ == "__main__":
    main()
