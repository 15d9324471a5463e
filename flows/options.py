"""The pipeline's command-line options, shared by every command that runs or serves the pipeline."""
from __future__ import annotations

import argparse


def add_pipeline_options(parser: argparse.ArgumentParser, *, head: bool = True) -> None:
    from transfer_flow.flows.settings import PipelineSettings
    from transfer_flow.tasks.backbones import BACKBONES

    fields = PipelineSettings.model_fields
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default=fields["backbone"].default,
                        help="pretrained CNN (default: %(default)s; see `transfer-flow backbones`)")
    parser.add_argument("--weights", default="imagenet", metavar="imagenet|none|PATH",
                        help="imagenet: Keras cache, then an installed offline package, then download; "
                             "none: random init; PATH: a .weights.h5/.h5 file (default: %(default)s)")
    parser.add_argument(
        "--image-size", type=int, metavar="N", help="square input side (default: the backbone's native size)"
    )
    parser.add_argument("--pooling", choices=["flatten", "avg", "max"], default=fields["pooling"].default,
                        help="flatten is the classic recipe (VGG16 at 224: 25,088-d); default: %(default)s")
    parser.add_argument("--precision", choices=["float32", "bfloat16", "float16"],
                        help="compute precision (default: the backbone's fastest measured; see BENCHMARKS.md)")
    if head:
        parser.add_argument("--head", choices=["logreg", "linear-svm", "sgd", "dense", "gap"],
                            default=fields["head"].default,
                            help="classifier: logreg or linear-svm (grid over C, cross-validated), sgd (out of core: "
                                 "reads the store in blocks), dense (Keras Dense 256 + Dropout 0.5, early stopping), "
                                 "gap (global average pooling inside a Keras head; needs --pooling flatten) "
                                 "(default: %(default)s)")
    parser.add_argument("--store", choices=["hdf5", "zarr"], default=fields["store"].default,
                        help="feature store: hdf5 (DIR/features.h5, the classic layout) or zarr (DIR/features.zarr) "
                             "(default: %(default)s)")
    parser.add_argument("--feature-dtype", choices=["float32", "float16"], default=fields["feature_dtype"].default,
                        help="stored feature precision; float16 halves the bytes (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=fields["batch_size"].default, metavar="N",
                        help="images per inference call (default: %(default)s)")
    parser.add_argument("--test-size", type=float, default=fields["test_size"].default, metavar="F",
                        help="fraction of each class held out (default: %(default)s; train/ and test/ folders win)")
    parser.add_argument("--seed", type=int, default=fields["seed"].default, metavar="N",
                        help="seed of shuffle, split and cross-validation (default: %(default)s)")
    parser.add_argument(
        "--refresh",
        action="append",
        default=[],
        metavar="STAGE",
        choices=["hash", "extract", "train", "report", "all"],
        help="recompute STAGE (hash, extract, train, report or all) even if its cache is valid; repeatable",
    )
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="extract on a local Dask cluster of N worker processes (default: in this process, "
                             "the fastest on one small machine)")
    parser.add_argument("--dask-address", metavar="tcp://HOST:PORT",
                        help="extract on an existing Dask cluster (dask-jobqueue, Kubernetes, dask-cuda); workers "
                             "need transfer-flow installed and the same paths")
    parser.add_argument("--wait", action="store_true",
                        help="if another run is writing to the same output, wait for it instead of failing")
