"""Faults a user can meet (a full, read-only or forbidden disk, a dataset that vanishes mid-run): exit 2, one line,
and the outputs already in place unchanged."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import FAST
from transfer_flow.flows.cli import EXIT_USER_ERROR, main

FAST_ARGS = ["--backbone", FAST["backbone"], "--weights", FAST["weights"], "--image-size", str(FAST["image_size"]),
             "--batch-size", str(FAST["batch_size"])]


def run_cli(dataset: Path, output: Path, *extra: str) -> int:
    return main(["run", str(dataset), "--output", str(output), *FAST_ARGS, *extra])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every output's bytes (the claim and lock, dot files at the top, are the runs' bookkeeping)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.relative_to(folder).parts[0].startswith(".")}


def one_error_line(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("transfer-flow: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs of our own (root only): real ENOSPC and EROFS, not simulated ones."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("store", ["hdf5", "zarr"])
def test_a_full_disk_is_one_line_and_the_old_outputs_stay(prefect_api, colour_dataset, small_disk, capsys, store):
    output = small_disk / "out"
    assert run_cli(colour_dataset, output, "--store", store) == 0
    before = snapshot(output)
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "filler").write_bytes(b"\0" * (free - 16 * 1024))  # 16 KiB left: too little for a new store
    capsys.readouterr()

    assert run_cli(colour_dataset, output, "--store", store, "--refresh", "extract") == EXIT_USER_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert "no space left on device" in line and str(output) in line and "free some space" in line
    after = snapshot(output)
    assert {name: after.get(name) for name in before} == before  # every earlier output byte for byte

    (small_disk / "filler").unlink()
    assert run_cli(colour_dataset, output, "--store", store) == 0  # and the same command then just works


def test_a_read_only_disk_is_one_line(prefect_api, colour_dataset, small_disk, capsys):
    output = small_disk / "out"
    assert run_cli(colour_dataset, output) == 0
    before = snapshot(output)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    capsys.readouterr()
    assert run_cli(colour_dataset, output, "--refresh", "all") == EXIT_USER_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert "read-only file system" in line and str(output) in line
    assert snapshot(output) == before


def test_a_forbidden_folder_is_one_line(prefect_api, colour_dataset, tmp_path, capsys, monkeypatch):
    """Root may write anywhere, so the refusal is simulated where the run first writes: its claim."""
    from transfer_flow.storage import output_layout

    def forbidden(target, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(target))

    monkeypatch.setattr(output_layout, "write_json", forbidden)
    assert run_cli(colour_dataset, tmp_path / "out") == EXIT_USER_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert "permission denied on" in line and str(tmp_path / "out") in line


def test_a_dataset_that_vanishes_mid_run_is_one_line(prefect_api, colour_dataset, tmp_path, capsys, monkeypatch):
    from transfer_flow.tasks import stages

    dataset = tmp_path / "dataset"
    shutil.copytree(colour_dataset, dataset)
    split = stages.split_manifest

    def split_then_vanish(*args, **kwargs):  # listed and split; then someone removes the folder (unmounts a share)
        result = split(*args, **kwargs)
        shutil.rmtree(dataset)
        return result

    monkeypatch.setattr(stages, "split_manifest", split_then_vanish)
    assert run_cli(dataset, tmp_path / "out") == EXIT_USER_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert str(dataset) in line and "no longer exists" in line
    assert not list((tmp_path / "out").glob("*.parts/*")), "no shard may record the vanished images as broken"
