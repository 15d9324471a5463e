"""What the report's heatmaps cost: rebuilding the bundle's backbone up to its last feature map, then one forward
pass (decode, backbone, CAM or Grad-CAM, overlay) per gallery image of an existing run's report.

Run: .venv/bin/transfer-flow demo --output /tmp/x && .venv/bin/python bench/heatmap_cost.py /tmp/x/run
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from transfer_flow.storage.report_metrics import read_metrics
from transfer_flow.tasks.heatmaps import BundleExplainer, report_heatmaps
from transfer_flow.tasks.prediction import find_bundle


def main() -> None:
    run = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-output/run")
    bundle = find_bundle(run)
    metrics = read_metrics(run / "report")
    import tensorflow  # noqa: F401  (already imported in a pipeline's process by extraction: not the report's cost)

    started = time.perf_counter()
    BundleExplainer(bundle)  # builds and keeps the backbone, as the report stage does
    built = time.perf_counter()
    _, overlays = report_heatmaps(bundle, Path(read_dataset_root(run)), metrics)
    done = time.perf_counter()
    print(f"{bundle.metadata.head} on {bundle.metadata.extraction.backbone}: backbone built in {built - started:.1f} s, "
          f"{len(overlays)} heatmaps in {done - built:.1f} s ({(done - built) / max(1, len(overlays)) * 1000:.0f} ms "
          f"each)")


def read_dataset_root(run: Path) -> str:
    import json

    return json.loads((run / "run.json").read_text())["dataset"]


if __name__ == "__main__":
    main()
