"""Which backend Keras runs on in this process. Keras reads KERAS_BACKEND once, at its first import, and cannot
switch afterwards: a runtime sets it before that import, and anything needing one backend checks it here."""
from __future__ import annotations

import importlib.util
import os
import sys

from transfer_flow.storage.errors import SettingsError


def keras_backend() -> str:
    """The backend Keras runs on here, or will at its first import (KERAS_BACKEND, else Keras' own default)."""
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "config"):  # imported (not half-way through its import)
        return keras.config.backend()
    return os.environ.get("KERAS_BACKEND") or "tensorflow"


def use_keras_backend(name: str, needed_by: str) -> None:
    """Have Keras run on `name`: KERAS_BACKEND is set while Keras is not yet imported; once it runs on another
    backend, one line saying what needed `name` and how to get it."""
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = name
        return
    loaded = keras_backend()
    if loaded != name:
        raise SettingsError(f"Keras on {name} is needed for {needed_by}, but Keras already runs on {loaded} in this "
                            f"process and cannot switch: run it in a fresh process, or set KERAS_BACKEND={name}")


def require_tensorflow_keras(needed_by: str) -> None:
    """One line unless Keras runs (or will run) on TensorFlow and TensorFlow is installed."""
    if keras_backend() != "tensorflow":
        raise SettingsError(f"Keras on TensorFlow is needed for {needed_by}, and Keras runs on {keras_backend()} in "
                            "this process (it cannot switch): run it in a fresh process")
    if importlib.util.find_spec("tensorflow") is None:
        raise SettingsError(f"TensorFlow is needed for {needed_by}: pip install tensorflow-cpu")
