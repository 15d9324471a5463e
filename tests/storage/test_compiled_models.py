"""The compiled-model cache: entries appear whole, and a damaged one is reported, never used."""
import json

import pytest

from transfer_flow.storage.compiled_models import (
    ENTRY_FILE,
    MAX_ENTRY_BYTES,
    CompiledModelEntry,
    UnusableEntryError,
    entry_dir,
    publish_entry,
    read_entry,
)


def write_model(tmp):
    (tmp / "model.xml").write_text("<net/>")
    (tmp / "model.bin").write_bytes(bytes(range(256)) * 4)
    return CompiledModelEntry(key="k1", runtime="openvino", runtime_version="x", description="test", files={})


@pytest.fixture
def entry(tmp_path):
    folder = entry_dir(tmp_path, "lite0", "k1")
    publish_entry(folder, write_model)
    return folder


def test_a_published_entry_reads_back_with_its_files_checked(entry, tmp_path):
    read = read_entry(entry, "k1")
    assert set(read.files) == {"model.xml", "model.bin"} and read.files["model.bin"].size == 1024
    assert read_entry(tmp_path / "nothing-here", "k1") is None
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]  # no temporary left beside it


def test_a_failed_build_leaves_no_entry(tmp_path):
    def failing(tmp):
        write_model(tmp)
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError):
        publish_entry(entry_dir(tmp_path, "lite0", "k1"), failing)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncated", "same size, other bytes", "missing file", "entry of another key",
                                    "entry not json", "entry too large", "file outside the entry"])
def test_a_damaged_entry_is_unusable(entry, damage):
    meta = entry / ENTRY_FILE
    if damage == "truncated":
        (entry / "model.bin").write_bytes(b"\0" * 10)
    elif damage == "same size, other bytes":
        (entry / "model.bin").write_bytes(b"\1" * 1024)
    elif damage == "missing file":
        (entry / "model.xml").unlink()
    elif damage == "entry of another key":
        meta.write_text(meta.read_text().replace('"k1"', '"k2"'))
    elif damage == "entry not json":
        meta.write_bytes(b"\x89PNG")
    elif damage == "entry too large":
        meta.write_text(" " * (MAX_ENTRY_BYTES + 1))
    else:
        data = json.loads(meta.read_text())
        data["files"]["../secret"] = data["files"].pop("model.xml")
        meta.write_text(json.dumps(data))
    with pytest.raises(UnusableEntryError):
        read_entry(entry, "k1")
