#!/usr/bin/env python3
"""Raw forward passes of one backbone per runtime, precision and OpenVINO performance hint, in one process.

    .venv/bin/python bench/runtime_raw.py [--backbone efficientnet_lite0] [--size 224] [--seconds 8]

Same preprocessed batch (32 random images) for every variant, run back to back, so a machine whose load
drifts (other jobs) moves every row alike; the ratio between rows is the figure to quote. Also prints the
one-time conversion cost and the mean relative |Δ| of each variant's features against TensorFlow fp32.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()

    import openvino as ov
    import tensorflow as tf

    from transfer_flow.tasks.backbones import build_feature_model, get_backbone, resolve_weights

    spec = get_backbone(args.backbone)
    size = args.size or spec.native_size
    weights = resolve_weights(spec, "imagenet" if spec.offline_weights else "none")
    model = build_feature_model(spec, image_size=size, pooling="avg", precision="float32", weights=weights)
    batch = spec.preprocess(np.random.default_rng(0).integers(0, 255, (32, size, size, 3)).astype(np.uint8))

    def rate(forward) -> float:
        forward(batch), forward(batch)
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < args.seconds:
            forward(batch)
            n += len(batch)
        return n / (time.perf_counter() - start)

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
    print(f"{args.backbone} at {size} px, batch 32, {os.cpu_count()} CPUs; conversion {conversion:.1f} s "
          f"({weights.source} weights)")
    for name, value, delta in rows:
        print(f"{name:<34} {value:8.1f} img/s  {value / rows[0][1]:5.2f}x TF fp32  rel |Δ| {delta:.4f}")


if __name__ == "__main__":
    main()
