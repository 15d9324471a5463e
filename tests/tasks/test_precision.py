"""bfloat16 and float32 features give the same classifier accuracy on a small real set (within one point)."""
import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from transfer_flow.tasks.backbones import (
    build_feature_model,
    cpu_supports_bf16,
    get_backbone,
    resolve_precision,
    resolve_weights,
)


def test_explicit_precision_wins_and_auto_follows_the_cpu():
    vgg, lite = get_backbone("vgg16"), get_backbone("efficientnet_lite0")
    assert resolve_precision(vgg, "float32") == "float32"
    assert resolve_precision(lite, None) == "float32"  # depthwise convolutions: fp32 measured faster
    assert resolve_precision(vgg, None) == ("bfloat16" if cpu_supports_bf16() else "float32")


def test_bfloat16_and_float32_features_classify_digits_alike():
    digits = load_digits()
    images = np.repeat((digits.images[:600] * 255 / 16).astype(np.uint8)[..., None], 3, axis=-1)
    images = np.kron(images, np.ones((1, 8, 8, 1), np.uint8))  # 8×8 → 64×64, nearest
    train, test = slice(0, 450), slice(450, 600)
    spec = get_backbone("efficientnet_lite0")
    weights = resolve_weights(spec, "imagenet")  # real pretrained weights, offline
    scores = {}
    for precision in ("float32", "bfloat16"):
        model = build_feature_model(spec, image_size=64, pooling="avg", precision=precision, weights=weights)
        features = np.concatenate([np.asarray(model(spec.preprocess(images[i:i + 100]))) for i in range(0, 600, 100)])
        head = LogisticRegression(max_iter=2000).fit(features[train], digits.target[:600][train])
        scores[precision] = head.score(features[test], digits.target[:600][test])
    assert scores["float32"] > 0.6, scores  # chance is 0.1: the features are real, not noise
    assert abs(scores["float32"] - scores["bfloat16"]) <= 0.01 + 1e-9, scores
