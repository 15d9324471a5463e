"""keras-jax: the real `transfer-flow run` end to end in a process where TensorFlow cannot be imported, its rows
against TensorFlow's fp32 rows, the `auto` rule, and one line where Keras already runs on the other backend."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from tests.support import WITHOUT_TENSORFLOW
from transfer_flow.storage.errors import SettingsError
from transfer_flow.storage.feature_store import open_store, read_contents, read_features
from transfer_flow.storage.manifest import Manifest
from transfer_flow.tasks import runtimes
from transfer_flow.tasks.backbones import jax_gpu_available
from transfer_flow.tasks.extraction import ExtractionSettings, extract_features
from transfer_flow.tasks.runtimes import RuntimeSpec, get_runtime, resolve_runtime
from transfer_flow.tasks.runtimes import keras_backend as keras_backend_module

# Real ImageNet weights (the offline Lite0 package) at a tiny size: the same weights on both backends.
RUN = ["--backbone", "efficientnet_lite0", "--weights", "imagenet", "--image-size", "32", "--batch-size", "8"]


@pytest.fixture(scope="module")
def without_tensorflow(tmp_path_factory) -> dict[str, str]:
    """The environment of a process that cannot import TensorFlow (a sitecustomize shim), Keras' backend unset."""
    shim = tmp_path_factory.mktemp("no-tensorflow")
    (shim / "sitecustomize.py").write_text(WITHOUT_TENSORFLOW)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "KERAS_BACKEND", "TF_CPP"))}
    env["PYTHONPATH"] = os.pathsep.join([str(shim), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


@pytest.fixture(scope="module")
def jax_run(prefect_api, colour_dataset, without_tensorflow, tmp_path_factory) -> Path:
    from prefect.server.api.server import SubprocessASGIServer

    folder = tmp_path_factory.mktemp("keras-jax")
    env = {**without_tensorflow, "PREFECT_HOME": str(folder / "home"),
           "PREFECT_API_URL": SubprocessASGIServer().api_url}  # the harness's
    output = folder / "out"
    done = subprocess.run([sys.executable, "-m", "transfer_flow.flows.cli", "run", str(colour_dataset), "--output",
                           str(output), "--runtime", "keras-jax", *RUN], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return output


def test_the_shim_makes_tensorflow_unimportable(without_tensorflow):
    done = subprocess.run([sys.executable, "-c", "import tensorflow"], env=without_tensorflow, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "ModuleNotFoundError: No module named 'tensorflow'" in done.stderr
    done = subprocess.run([sys.executable, "-c", "import importlib.util, sys; import keras; "
                           "print(importlib.util.find_spec('tensorflow'), 'tensorflow' in sys.modules)"],
                          env={**without_tensorflow, "KERAS_BACKEND": "jax"}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["None", "False"], done.stderr[-2000:]


def test_the_cli_runs_end_to_end_on_keras_jax_without_tensorflow(jax_run, colour_dataset):
    summary = json.loads((jax_run / "run.json").read_text())
    assert summary["images_extracted"] == 24 and summary["accuracy"] > 0.9  # three plain colours
    store = open_store(jax_run / "features.h5")
    assert store.n_rows == 24 and store.attrs["runtime"] == "keras-jax" and store.attrs["precision"] == "float32"
    assert np.isfinite(read_features(store, np.arange(24))).all()
    assert "## Confusion matrix" in (jax_run / "report" / "report.md").read_text()
    # CAM heatmaps (the default linear head) from keras-jax's own map pass: no TensorFlow for them either.
    metrics = json.loads((jax_run / "report" / "metrics.json").read_text())
    assert metrics["heatmap_method"] == "cam" and metrics["runtime"] == "keras-jax"
    drawn = [item["heatmap"] for item in metrics["misclassified"] + metrics["correct_examples"] if item["heatmap"]]
    assert drawn and all((jax_run / "report" / name).read_bytes()[:4] == b"\x89PNG" for name in drawn)


def test_a_dense_head_on_keras_jax_gets_grad_cam_heatmaps_without_tensorflow(jax_run, without_tensorflow, tmp_path):
    """The keras-jax run again with --head dense, on a copy of its output (the rows are reused, not extracted)."""
    from prefect.server.api.server import SubprocessASGIServer

    env = {**without_tensorflow, "PREFECT_HOME": str(tmp_path / "home"),
           "PREFECT_API_URL": SubprocessASGIServer().api_url}  # the harness's
    output = shutil.copytree(jax_run, tmp_path / "out")
    dataset = json.loads((jax_run / "run.json").read_text())["dataset"]
    done = subprocess.run([sys.executable, "-m", "transfer_flow.flows.cli", "run", dataset, "--output", str(output),
                           "--runtime", "keras-jax", "--head", "dense", "--epochs", "20", *RUN], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no heatmaps" not in done.stderr
    assert json.loads((output / "run.json").read_text())["images_reused"] == 24
    metrics = json.loads((output / "report" / "metrics.json").read_text())
    assert metrics["head"] == "dense" and metrics["heatmap_method"] == "grad-cam" and metrics["runtime"] == "keras-jax"
    drawn = [item["heatmap"] for item in metrics["misclassified"] + metrics["correct_examples"] if item["heatmap"]]
    assert len(drawn) == len(metrics["misclassified"] + metrics["correct_examples"]) > 0
    assert all((output / "report" / name).read_bytes()[:4] == b"\x89PNG" for name in drawn)


GRAD_CAM_ON_A_HEAD = """
import numpy as np
import keras
from transfer_flow.tasks.heatmaps import grad_cam_on_maps


def grad_cam_on_a_test_head():
    rng = np.random.default_rng(0)
    maps_in = keras.Input((3, 3, 8))
    hidden = keras.layers.Dense(16, activation="relu")(keras.layers.GlobalAveragePooling2D()(maps_in))
    model = keras.Model(maps_in, keras.layers.Dense(4, activation="softmax")(hidden))
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()])
    maps = np.abs(rng.normal(size=(5, 3, 3, 8))).astype(np.float32)
    return grad_cam_on_maps(model, maps, [0, 1, 2, 3, 0])
"""


def test_grad_cam_on_jax_gives_tensorflows_maps(without_tensorflow, tmp_path):
    """The same head and maps: jax.grad's Grad-CAM (no TensorFlow importable) against TensorFlow's GradientTape (this
    process's Keras)."""
    import keras

    program = GRAD_CAM_ON_A_HEAD + "import sys\nnp.save(sys.argv[1], grad_cam_on_a_test_head())\n" \
        "print(keras.config.backend())\n"
    done = subprocess.run([sys.executable, "-c", program, str(tmp_path / "jax.npy")],
                          env={**without_tensorflow, "KERAS_BACKEND": "jax"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.split()[-1] == "jax", done.stderr[-3000:]
    here: dict = {}
    exec(GRAD_CAM_ON_A_HEAD, here)
    assert keras.config.backend() == "tensorflow"
    on_tensorflow, on_jax = here["grad_cam_on_a_test_head"](), np.load(tmp_path / "jax.npy")
    assert on_tensorflow.shape == (5, 3, 3) and (on_tensorflow > 0).any()
    np.testing.assert_allclose(on_jax, on_tensorflow, rtol=1e-5, atol=1e-5 * on_tensorflow.max())


def test_keras_jax_float32_gives_tensorflows_rows(jax_run, tmp_path):
    manifest = Manifest.model_validate_json((jax_run / "manifest.json").read_text())
    settings = ExtractionSettings(backbone="efficientnet_lite0", weights="imagenet", image_size=32, batch_size=8,
                                  runtime="tensorflow", precision="float32")
    tensorflow = extract_features(manifest, tmp_path / "tf.h5", settings).store
    jax = open_store(jax_run / "features.h5")

    def rows(store):
        hashes = np.asarray(read_contents(store).hashes)
        order = np.argsort(hashes)
        return hashes[order], read_features(store, np.arange(store.n_rows))[order]

    (tf_hashes, tf_rows), (jax_hashes, jax_rows) = rows(tensorflow), rows(jax)
    assert list(tf_hashes) == list(jax_hashes)
    assert np.ptp(tf_rows) > 0  # real features, not all zeros
    np.testing.assert_allclose(jax_rows, tf_rows, rtol=1e-3, atol=1e-4 * np.abs(tf_rows).max())


def test_predict_with_tensorflow_installed_puts_keras_on_jax_first(jax_run, colour_dataset, tmp_path):
    """TensorFlow importable, KERAS_BACKEND unset: the command picks jax for the bundle's runtime before anything
    (the imports ahead of the Prefect API, the head) imports Keras on TensorFlow, Keras' default."""
    from prefect.server.api.server import SubprocessASGIServer

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "KERAS_BACKEND", "TF_CPP"))}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_API_URL=SubprocessASGIServer().api_url)
    images = [str(colour_dataset / colour / "img_000.jpg") for colour in ("red", "green", "blue")]
    done = subprocess.run([sys.executable, "-m", "transfer_flow.flows.cli", "predict", str(jax_run), *images],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    labels = [line.split(",")[1] for line in done.stdout.strip().splitlines()[1:]]
    assert labels == ["red", "green", "blue"]


def test_a_keras_jax_bundle_in_a_process_on_tensorflow_keras_is_refused_in_one_line(jax_run):
    import keras  # noqa: F401  (this test process: Keras on TensorFlow)

    from transfer_flow.storage.model_bundle import load_bundle
    from transfer_flow.tasks.prediction import predict_images

    with pytest.raises(SettingsError, match="Keras on jax is needed for --runtime keras-jax") as refused:
        predict_images(load_bundle(jax_run / "model"), [str(jax_run / "whatever.png")])
    assert "\n" not in str(refused.value) and "fresh process" in str(refused.value)
    assert "KERAS_BACKEND=jax" in str(refused.value)


@pytest.fixture
def installed(monkeypatch):
    """Which runtimes' packages count as installed, and whether JAX sees a GPU (nothing else changes)."""
    present = {"tensorflow", "openvino", "keras-jax"}
    monkeypatch.setattr(RuntimeSpec, "installed", lambda self: self.name in present)
    monkeypatch.setattr(runtimes, "gpu_available", lambda: False)
    monkeypatch.setattr(runtimes, "jax_gpu_available", lambda: False)
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    return present


def test_auto_stays_openvino_on_a_cpu_with_tensorflow(installed):
    assert resolve_runtime("auto") == "openvino"


def test_auto_is_keras_jax_where_jax_sees_a_gpu(installed, monkeypatch):
    monkeypatch.setattr(runtimes, "jax_gpu_available", lambda: True)
    assert resolve_runtime("auto") == "keras-jax"


def test_auto_is_keras_jax_without_tensorflow(installed):
    installed.discard("tensorflow")
    assert resolve_runtime("auto") == "keras-jax"
    installed.discard("keras-jax")  # nor JAX: the rule as before (OpenVINO on a CPU)
    assert resolve_runtime("auto") == "openvino"


def test_auto_is_keras_jax_when_keras_backend_says_jax(installed, monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert resolve_runtime("auto") == "keras-jax"
    installed.discard("keras-jax")
    assert resolve_runtime("auto") == "openvino"


def test_this_cpu_machine_resolves_as_before():
    """No GPU here: JAX is not even imported to ask, and `auto` (KERAS_BACKEND aside) stays OpenVINO."""
    assert not jax_gpu_available()
    if os.environ.get("KERAS_BACKEND") != "jax":
        assert resolve_runtime("auto") == "openvino"


def test_int8_is_refused_on_keras_jax_in_one_line():
    with pytest.raises(ValidationError, match="int8 is not available with --runtime keras-jax"):
        ExtractionSettings(runtime="keras-jax", precision="int8")
    assert get_runtime("keras-jax").imports == ("jax", "keras")


def test_grad_cam_where_keras_runs_on_jax_is_one_line(monkeypatch):
    monkeypatch.setattr(keras_backend_module, "keras_backend", lambda: "jax")
    with pytest.raises(SettingsError, match="TensorFlow is needed for Grad-CAM heatmaps, and Keras runs on jax") as no:
        keras_backend_module.require_tensorflow_keras("Grad-CAM heatmaps")
    assert "\n" not in str(no.value)
