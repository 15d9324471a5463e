"""The first `per_class` real digits of each class as a dataset folder, for the benches that compare heads."""
from __future__ import annotations

import shutil
from pathlib import Path


def digits_subset(workdir: Path, per_class: int) -> Path:
    from transfer_flow.storage.demo_dataset import write_digits_dataset

    source = write_digits_dataset(workdir / "all")
    dataset = workdir / f"digits-{per_class}"
    shutil.rmtree(dataset, ignore_errors=True)
    for folder in sorted(source.iterdir()):
        (dataset / folder.name).mkdir(parents=True)
        for file in sorted(folder.glob("*.png"))[:per_class]:
            shutil.copy(file, dataset / folder.name / file.name)
    return dataset
