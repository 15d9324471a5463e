"""What the report's heatmaps cost: making the bundle's backbone give its last feature map (the runtime's cached
model with the map as an output, or TensorFlow's import and a Keras build), then one forward pass (decode,
backbone, CAM or Grad-CAM, overlay) per gallery image of an existing run's report.

Run: .venv/bin/transfer-flow demo --output /tmp/x && .venv/bin/python bench/heatmap_cost.py /tmp/x/run
     .venv/bin/python bench/heatmap_cost.py /tmp/x/run --tensorflow   # the TensorFlow maps (no cached model used)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from transfer_flow.storage.report_metrics import read_metrics
from transfer_flow.tasks.heatmaps import BundleExplainer, report_heatmaps
from transfer_flow.tasks.prediction import find_bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", default="demo-output/run")
    parser.add_argument("--tensorflow", action="store_true",
                        help="an empty compiled-model cache: the maps come from TensorFlow, as without one")
    args = parser.parse_args()
    if args.tensorflow:
        os.environ["TRANSFER_FLOW_COMPILED_MODELS"] = tempfile.mkdtemp(prefix="no-compiled-models-")
    run = Path(args.run)
    bundle = find_bundle(run)
    metrics = read_metrics(run / "report")

    started = time.perf_counter()
    explainer = BundleExplainer(bundle)  # builds and keeps the map model, as the report stage does
    built = time.perf_counter()
    _, overlays = report_heatmaps(bundle, Path(json.loads((run / "run.json").read_text())["dataset"]), metrics)
    done = time.perf_counter()
    maps = "the runtime's cached model" if explainer.runtime_maps is not None else "TensorFlow"
    print(f"{bundle.metadata.head} on {bundle.metadata.extraction.backbone} ({bundle.metadata.extraction.runtime} "
          f"{bundle.metadata.extraction.precision}), {explainer.method} maps by {maps}: ready in "
          f"{built - started:.1f} s, {len(overlays)} heatmaps in {done - built:.1f} s "
          f"({(done - built) / max(1, len(overlays)) * 1000:.0f} ms each); TensorFlow imported: "
          f"{'tensorflow' in sys.modules}")


if __name__ == "__main__":
    main()
