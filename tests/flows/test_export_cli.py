"""`transfer-flow export`: a run's output folder in, parquet/npy out, one-line errors."""
import pandas as pd
import pytest

from tests.storage.test_export import write_store
from transfer_flow.flows.cli import main


@pytest.fixture
def run_folder(tmp_path):
    return tmp_path, write_store(tmp_path / "features.h5")


def test_cli_exports_a_run_folder(run_folder, capsys):
    root, rows = run_folder
    assert main(["export", str(root), "--format", "npy"]) == 0
    out = root / "export-npy"
    assert "7 rows in 1 npy shard(s)" in capsys.readouterr().out
    assert pd.read_parquet(out / "metadata" / "metadata_00000.parquet")["path"].tolist() == rows[2]
    assert main(["export", str(root), "--format", "npy"]) == 2  # exists: a one-line error, exit 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(root / "missing")]) == 2
