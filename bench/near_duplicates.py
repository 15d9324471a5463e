"""Calibrates the near-duplicate threshold (tasks/data_checks.py NEAR_DUPLICATE_SIMILARITY) on real images.

Writes a dataset (the demo digits, or crops of scikit-learn's two sample photos as
/work/shared/datasets/make_datasets.py makes them), adds near-copies of some of its images (re-encoded as
JPEG at quality 70; 1 pixel smaller each way, resized bilinear and nearest), extracts Lite0 features and prints,
as cosine similarities of the features the report compares (raw, and standardised as comparable() does):
- each kind of near-copy to its original (what must be found), lowest first;
- every image's most similar *other* image of its own class (different content hash; what must not be found
  on digits), the highest first, and how many such pairs clear each candidate threshold;
- whether the report's near_duplicates() finds the planted pairs at the threshold in use.

Run: .venv/bin/python bench/near_duplicates.py digits [--image-size 224] [--copies 20]
     .venv/bin/python bench/near_duplicates.py photos [--photos 160]
"""
from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

from transfer_flow.storage.demo_dataset import write_digits_dataset
from transfer_flow.storage.feature_store import read_contents, read_features
from transfer_flow.tasks.data_checks import NEAR_DUPLICATE_SIMILARITY, comparable, near_duplicates
from transfer_flow.tasks.extraction import ExtractionSettings, extract_features
from transfer_flow.tasks.hashing import hash_manifest
from transfer_flow.tasks.listing import list_dataset
from transfer_flow.tasks.splitting import split_manifest

CANDIDATES = (0.9, 0.95, 0.97, 0.98, 0.99, 0.995)


def write_photos(target: Path, count: int) -> Path:
    """make_datasets.py photos: random crops of the two sample photos, 500x375 JPEG q=90."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    samples = load_sample_images()
    for k in range(count):
        index = k % len(samples.images)
        source = samples.images[index]
        h, w = source.shape[:2]
        ch, cw = int(rng.integers(h // 2, h)), int(rng.integers(w // 2, w))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        folder = target / Path(samples.filenames[index]).stem
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(source[y:y + ch, x:x + cw]).resize((500, 375), Image.BILINEAR).save(
            folder / f"crop_{k:05d}.jpg", quality=90)
    return target


KINDS = ("jpeg", "bilinear", "nearest")


def plant_copies(root: Path, count: int, seed: int) -> dict[str, str]:
    """Three near-copies of `count` images (a JPEG re-encode at quality 70; copies 1 px smaller each way, resized
    bilinear and nearest), in the original's folder; returns copy path → original path, relative to `root`."""
    originals = sorted(root.glob("*/*.*"))
    chosen = np.random.default_rng(seed).choice(len(originals), size=count, replace=False)
    planted = {}
    for index in chosen:
        original = originals[index]
        image = Image.open(original).convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=70)
        jpeg = original.with_name(f"copy_jpeg_{original.stem}.jpg")
        jpeg.write_bytes(buffer.getvalue())
        copies = [jpeg]
        for kind, method in (("bilinear", Image.BILINEAR), ("nearest", Image.NEAREST)):
            copies.append(original.with_name(f"copy_{kind}_{original.stem}.png"))
            image.resize((image.width - 1, image.height - 1), method).save(copies[-1])
        for copy in copies:
            planted[str(copy.relative_to(root))] = str(original.relative_to(root))
    return planted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["digits", "photos"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--copies", type=int, default=20, help="originals given two near-copies each")
    parser.add_argument("--photos", type=int, default=160, help="photo crops to write")
    parser.add_argument("--work", default="tmp/near_duplicates", help="scratch folder (rewritten)")
    args = parser.parse_args()

    import shutil

    work = Path(args.work) / f"{args.dataset}-{args.image_size}"
    shutil.rmtree(work / "images", ignore_errors=True)  # the store stays: a rerun extracts only new images
    root = write_digits_dataset(work / "images") if args.dataset == "digits" else write_photos(work / "images",
                                                                                                args.photos)
    planted = plant_copies(root, args.copies, seed=0)
    manifest = split_manifest(hash_manifest(list_dataset(root))[0], test_size=0.25, seed=42)
    started = time.perf_counter()
    store = extract_features(manifest, work / "features.h5",
                             ExtractionSettings(image_size=args.image_size, batch_size=64)).store
    print(f"{args.dataset}: {store.n_rows} images ({len(planted)} planted copies) at {args.image_size} px, "
          f"extracted in {time.perf_counter() - started:.0f} s")
    contents = read_contents(store)
    features = read_features(store, np.arange(store.n_rows))
    row = {path: i for i, path in enumerate(contents.paths)}
    originals = np.array([p not in planted for p in contents.paths])
    hashes, labels = np.array(contents.hashes), contents.labels
    other = (labels[:, None] == labels[None, :]) & (hashes[:, None] != hashes[None, :])
    other &= originals[:, None] & originals[None, :]
    for name, unit in (("raw", features / np.linalg.norm(features, axis=1, keepdims=True)),
                       ("standardised", comparable(features))):
        similarity = unit @ unit.T
        print(f"  {name} cosine:")
        for kind in KINDS:
            found = sorted(float(similarity[row[c], row[o]]) for c, o in planted.items() if f"copy_{kind}_" in c)
            print(f"    near-copy ({kind}) vs original: lowest {found[0]:.4f}, median {np.median(found):.4f}")
        nearest = np.where(other, similarity, -1.0).max(axis=1)[originals]
        print(f"    most similar other image of the same class: highest {nearest.max():.4f}, 99th percentile "
              f"{np.percentile(nearest, 99):.4f}, median {np.median(nearest):.4f}")
        pairs = np.triu(other, 1)
        print("    distinct same-class pairs at or above: " + ", ".join(
            f"{t}: {int((similarity[pairs] >= t).sum())}" for t in CANDIDATES))

    found = near_duplicates(features, contents.paths, contents.split)
    listed = {tuple(sorted(pair.paths)) for pair in found}
    hits = {kind: sum(tuple(sorted((c, o))) in listed for c, o in planted.items() if f"copy_{kind}_" in c)
            for kind in KINDS}
    strays = [pair for pair in found if not any(p in planted for p in pair.paths)]
    print(f"  near_duplicates() at {NEAR_DUPLICATE_SIMILARITY}: planted pairs found " + ", ".join(
        f"{kind} {n}/{len(planted) // len(KINDS)}" for kind, n in hits.items())
        + f"; {len(strays)} pairs of two original images listed")
    for pair in strays[:5]:
        print(f"    {pair.paths[0]} ~ {pair.paths[1]}: {pair.similarity:.4f}")


if __name__ == "__main__":
    main()
