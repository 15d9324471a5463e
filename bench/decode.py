#!/usr/bin/env python3
"""Decoding (issue #15 item 4): where a JPEG's time goes, PIL vs simplejpeg, and whether decode is the wall.

    .venv/bin/python bench/decode.py [--images 512] [--large 6] [--sizes 224,96,32] [--rounds 5]
    .venv/bin/python bench/decode.py --end-to-end [--backbone efficientnet_lite0] [--images 512] [--repeats 3]

Micro (default): one thread, each decoder over the same files to each size, img/s, best of --rounds rounds run
interleaved (a machine whose load drifts moves every row alike). Sources: the `photos` dataset
(../shared/datasets/make_datasets.py: 500x375 JPEG crops, q90) and --large 4032x3024 JPEGs made by upscaling
scikit-learn's two sample photos (q90). Rows:
  pil               tasks/images.py `decode_image` as it is (open, EXIF, draft, load, resize, transpose, RGB array)
  simplejpeg        what a simplejpeg path would cost: PIL opens the header (format, size limit, EXIF orientation),
                    simplejpeg (bundled libjpeg-turbo) decodes at the same reduced DCT scale, then the same resize
  pil load          PIL's part before the resize: open + draft + load (decode alone)
  simplejpeg load   simplejpeg.decode_jpeg alone at the same scale
Needs `pip install simplejpeg` (not a dependency of the project). Also says whether PyTurboJPEG could run here
(it needs a system libturbojpeg).

End to end (--end-to-end): `transfer-flow run` on the photos with the default runtime (auto), in a fresh process
per run, `--refresh extract` after one warm-up run (the converted model is cached), rate = images_extracted /
seconds.extract from run.json, for three decoders patched into tasks/images.py for that process only:
  pil               as shipped
  simplejpeg        the simplejpeg path above
  free              no decoding at all (a constant image of the right size): the ceiling any decoder could reach
If `free` is not clearly above `pil`, decode is not the wall and a faster decoder cannot help end to end.
"""
from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PYTHON = str(REPO / ".venv" / "bin" / "python")
REDUCING_GAP = 2.0  # as tasks/images.py


def simplejpeg_decode(path: Path | str, image_size: int) -> np.ndarray:
    """The cost of a simplejpeg path with the checks decode_image makes (no EXIF transpose: these files have none)."""
    import simplejpeg

    data = Path(path).read_bytes()
    with Image.open(path) as header:  # reads the header only: format, size for the bomb limit, EXIF orientation
        if header.width * header.height > (Image.MAX_IMAGE_PIXELS or float("inf")):
            raise ValueError("decompression bomb")
        header.getexif().get(ExifTags.Base.Orientation, 1)
    side = int(image_size * REDUCING_GAP)
    pixels = simplejpeg.decode_jpeg(data, "rgb", min_height=side, min_width=side)
    resized = Image.fromarray(pixels).resize((image_size, image_size), Image.Resampling.BILINEAR,
                                             reducing_gap=REDUCING_GAP)
    return np.asarray(resized)


def pil_load(path: Path, image_size: int) -> Image.Image:
    image = Image.open(path)
    image.draft("RGB", (int(image_size * REDUCING_GAP),) * 2)
    image.load()
    return image


def simplejpeg_load(data: bytes, image_size: int) -> np.ndarray:
    import simplejpeg

    side = int(image_size * REDUCING_GAP)
    return simplejpeg.decode_jpeg(data, "rgb", min_height=side, min_width=side)


def photos(folder: Path, n: int) -> list[Path]:
    if not folder.is_dir() or sum(1 for _ in folder.glob("*/*.jpg")) != n:
        subprocess.run([PYTHON, str(SHARED / "datasets" / "make_datasets.py"), "photos", str(folder), str(n)],
                       check=True)
    return sorted(folder.glob("*/*.jpg"))


def large_jpegs(folder: Path, n: int) -> list[Path]:
    from sklearn.datasets import load_sample_images

    folder.mkdir(parents=True, exist_ok=True)
    samples = load_sample_images().images
    paths = [folder / f"large_{k}.jpg" for k in range(n)]
    for k, path in enumerate(paths):
        if not path.exists():
            source = Image.fromarray(samples[k % len(samples)])
            if k % 4 >= 2:
                source = source.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # not the same bytes twice in a row
            source.resize((4032, 3024), Image.Resampling.BICUBIC).save(path, quality=90)
    return paths


def turbojpeg_status() -> str:
    library = ctypes.util.find_library("turbojpeg")
    try:
        import turbojpeg  # noqa: F401
        module = "installed"
    except ImportError:
        module = "not installed"
    return (f"PyTurboJPEG: module {module}; system libturbojpeg: "
            + (library if library else "absent (ctypes.util.find_library('turbojpeg') finds nothing), so it cannot "
               "run here without a system package"))


def micro(args: argparse.Namespace) -> None:
    from transfer_flow.tasks.images import decode_image

    sources = {f"{args.images} photos 500x375": photos(args.workdir / f"photos-{args.images}", args.images)}
    if args.large:
        sources[f"{args.large} JPEGs 4032x3024"] = large_jpegs(args.workdir / "large", args.large)
    print(f"machine: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at start; one thread; "
          f"best of {args.rounds} interleaved rounds")
    print(turbojpeg_status())
    for label, paths in sources.items():
        data = [path.read_bytes() for path in paths]
        for size in args.sizes:
            # Same pixels? (mean |Δ| over the set, uint8 levels) before timing anything.
            delta = np.mean([np.abs(decode_image(p, size).astype(int) - simplejpeg_decode(p, size)).mean()
                             for p in paths[:32]])
            variants = {
                "pil": lambda: [decode_image(p, size) for p in paths],
                "simplejpeg": lambda: [simplejpeg_decode(p, size) for p in paths],
                "pil load": lambda: [pil_load(p, size) for p in paths],
                "simplejpeg load": lambda: [simplejpeg_load(d, size) for d in data],
            }
            best = dict.fromkeys(variants, 0.0)
            for _ in range(args.rounds):
                for name, run in variants.items():
                    start = time.perf_counter()
                    run()
                    best[name] = max(best[name], len(paths) / (time.perf_counter() - start))
            print(f"{label} -> {size}x{size}: " + ", ".join(f"{name} {rate:.0f}" for name, rate in best.items())
                  + f" img/s; simplejpeg/pil {best['simplejpeg'] / best['pil']:.2f}x; "
                    f"mean |pixel delta| vs pil {delta:.2f}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


# One `transfer-flow run` in this process, with tasks/images.py's decode_image replaced for the run's threads.
RUN_WITH_DECODER = """
import sys
import numpy as np
sys.path.insert(0, {bench!r})
from transfer_flow.tasks import images
decoder = {decoder!r}
if decoder == "simplejpeg":
    from decode import simplejpeg_decode
    images.decode_image = simplejpeg_decode
elif decoder == "free":
    images.decode_image = lambda path, size: np.full((*images.parse_image_size(size), 3), 128, np.uint8)
from transfer_flow.flows.cli import main
sys.exit(main({argv!r}))
"""


def end_to_end(args: argparse.Namespace) -> None:
    data = photos(args.workdir / f"photos-{args.images}", args.images)[0].parents[1]
    output = args.workdir / f"run-{args.images}-{args.backbone}"
    argv = ["run", str(data), "--output", str(output), "--backbone", args.backbone, "--weights", args.weights,
            "--overwrite", *args.extra]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

    def run(decoder: str, refresh: str) -> dict:
        code = RUN_WITH_DECODER.format(bench=str(Path(__file__).parent), decoder=decoder,
                                       argv=[*argv, "--refresh", refresh])
        done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(f"{decoder} run failed:\n{done.stderr[-3000:]}")
        return json.loads((output / "run.json").read_text())

    warm = run("pil", "all")  # converts and caches the model once; not counted
    print(f"machine: {os.cpu_count()} CPUs; {args.images} photos 500x375; backbone {args.backbone} "
          f"({args.weights} weights); runtime {warm['runtime']} {warm['precision']}; "
          f"load average {os.getloadavg()[0]:.2f} at start")
    rates: dict[str, list[float]] = {name: [] for name in ("pil", "simplejpeg", "free")}
    for _ in range(args.repeats):
        for decoder in rates:
            summary = run(decoder, "extract")
            rates[decoder].append(summary["images_extracted"] / summary["seconds"]["extract"])
    for decoder, values in rates.items():
        print(f"{decoder:<11} extraction {max(values):7.1f} img/s best, {np.median(values):7.1f} median "
              f"({', '.join(f'{v:.1f}' for v in values)}); best/pil best {max(values) / max(rates['pil']):.2f}x")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--large", type=int, default=6, help="4032x3024 JPEGs in the micro bench (0: none)")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[224, 96, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--end-to-end", action="store_true", help="extraction rate per decoder, `transfer-flow run`")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="more `transfer-flow run` options, e.g. --extra --precision int8")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "decode")
    args = parser.parse_args()
    try:
        import simplejpeg  # noqa: F401
    except ImportError:
        raise SystemExit("bench/decode.py compares against simplejpeg: .venv/bin/pip install simplejpeg") from None
    end_to_end(args) if args.end_to_end else micro(args)


if __name__ == "__main__":
    main()
