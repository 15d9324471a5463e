"""What a user sees of a run in the Prefect UI: a name that says dataset, head and trigger; one artifact per key per
run, keyed by dataset and head; the report's headline, per-class table and confusion matrix in the UI itself."""
import re

import pytest

from tests.support import FAST
from transfer_flow.flows.compare import compare_heads
from transfer_flow.flows.settings import CompareSettings


@pytest.fixture(scope="module")
def compared(prefect_api, colour_dataset, tmp_path_factory):
    output = tmp_path_factory.mktemp("ui") / "out"
    settings = CompareSettings(dataset=str(colour_dataset), output=str(output), heads=["logreg", "linear-svm"], **FAST)
    state = compare_heads(settings, return_state=True)
    assert state.is_completed()
    return state.state_details.flow_run_id, colour_dataset.name


def _flow_run_and_artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return run, artifacts


def test_the_run_is_named_for_its_dataset_heads_and_trigger(compared):
    flow_run_id, dataset = compared
    run, _ = _flow_run_and_artifacts(flow_run_id)
    assert run.name == f"{dataset} · logreg+linear-svm · local"


def test_each_artifact_key_is_used_once_per_run_and_names_dataset_and_head(compared):
    flow_run_id, dataset = compared
    _, artifacts = _flow_run_and_artifacts(flow_run_id)
    keys = [a.key for a in artifacts if a.key]
    assert len(keys) == len(set(keys)), keys
    slug = re.sub(r"[^a-z0-9]+", "-", dataset.lower()).strip("-")
    for head in ("logreg", "linear-svm"):
        assert {f"{slug}-{head}-report", f"{slug}-{head}-per-class", f"{slug}-{head}-report-file"} <= set(keys)
    assert f"{slug}-head-comparison" in keys
    assert all(re.fullmatch(r"[a-z0-9-]+", key) for key in keys)


def test_the_report_is_readable_in_the_ui(compared):
    flow_run_id, dataset = compared
    _, artifacts = _flow_run_and_artifacts(flow_run_id)
    [report] = [a for a in artifacts if a.key and a.key.endswith("-linear-svm-report")]
    text = str(report.data)
    assert "accuracy: **" in text and "## Per class" in text and "| red |" in text
    assert "true \\ predicted" in text  # the confusion matrix as a table
    assert "![confusion matrix](data:image/png;base64,iVBORw0" in text  # and as the report's picture
