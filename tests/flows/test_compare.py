"""compare: several heads on one store extracted once, a side-by-side table, reruns reuse what did not change."""
import csv
import json

from tests.support import FAST
from transfer_flow.flows.cli import main
from transfer_flow.flows.compare import compare_heads
from transfer_flow.flows.settings import CompareSettings
from transfer_flow.storage.model_bundle import load_bundle


def test_heads_share_one_store_and_land_in_one_table(prefect_api, colour_dataset, tmp_path, capsys):
    output = tmp_path / "out"
    summary = compare_heads(CompareSettings(dataset=str(colour_dataset), output=str(output),
                                            heads=["logreg", "sgd", "dense"], **FAST))
    assert [s.head for s in summary.scores] == ["logreg", "sgd", "dense"]
    with open(output / "comparison.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [r["head"] for r in rows] == ["logreg", "sgd", "dense"]
    assert all(0 <= float(r["accuracy"]) <= 1 and float(r["train_seconds"]) > 0 for r in rows)
    assert "| head | accuracy | macro F1 | train s |" in (output / "comparison.md").read_text()
    for head in ("logreg", "sgd", "dense"):
        assert load_bundle(output / "heads" / head / "model").metadata.head == head
        assert (output / "heads" / head / "report" / "report.html").is_file()
    run = json.loads((output / "run.json").read_text())
    assert run["images_extracted"] == 24 and run["dataset"] == str(colour_dataset)
    logreg_hash = load_bundle(output / "heads" / "logreg" / "model").metadata.head_sha256

    assert main(["compare", str(colour_dataset), "-o", str(output), "--heads", "logreg,linear-svm",
                 "--backbone", "mobilenet_v2", "--weights", "none", "--image-size", "32", "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert "| linear-svm |" in printed or "| **linear-svm** |" in printed
    run = json.loads((output / "run.json").read_text())
    assert run["images_extracted"] == 0 and run["images_reused"] == 24  # the store was extracted once
    assert load_bundle(output / "heads" / "logreg" / "model").metadata.head_sha256 == logreg_hash
    with open(output / "comparison.csv", newline="") as file:
        assert [r["head"] for r in csv.DictReader(file)] == ["logreg", "linear-svm"]


def test_compare_and_predict_explain_themselves():
    import subprocess
    import sys

    for command in ("compare", "predict"):
        done = subprocess.run(
            [sys.executable, "-m", "transfer_flow.flows.cli", command, "--help"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0 and f"usage: transfer-flow {command}" in done.stdout
