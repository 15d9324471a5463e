"""The `transfer-flow` command: builds PipelineSettings from arguments and runs the flow. No work happens here."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import get_args

from pydantic import ValidationError

from transfer_flow.flows.options import add_pipeline_options, add_settings_options, given_settings
from transfer_flow.flows.settings import (
    CompareSettings,
    ExplainSettings,
    ExportSettings,
    PipelineSettings,
    PredictionSettings,
)
from transfer_flow.storage.errors import SettingsError, TransferFlowError, disk_error
from transfer_flow.tasks.training import HeadName

EXIT_USER_ERROR = 2
# Settings fields given as positional arguments, named in errors as the usage line shows them.
POSITIONAL_NAMES = {"dataset": "DATASET", "bundle": "BUNDLE", "paths": "PATH", "source": "SOURCE"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transfer-flow",
        description="Transfer learning on a folder of labelled images: pretrained-CNN features → HDF5 store → "
                    "classifier → evaluation report, run as a Prefect flow.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="also print Prefect's own lines (each task's final state, the temporary server)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run the pipeline on a dataset folder",
        description="List DATASET (one sub-folder per class; train/ and test/ honoured), "
        "extract features, train a head (--head; default logistic regression with a grid over C), "
        "write a report.",
    )
    run.add_argument("dataset", metavar="DATASET", help="folder with one sub-folder per class")
    add_pipeline_options(run)
    run.set_defaults(handler=_run)

    demo = commands.add_parser(
        "demo",
        help="run the pipeline offline on the embedded digits dataset",
        description="Write scikit-learn's 1,797 handwritten digits as PNG class folders under "
        "DIR/dataset, then run the pipeline into DIR/run (a second demo reuses the first's work).",
    )
    demo.add_argument("--output", "-o", default="demo-output", metavar="DIR", help="default: %(default)s")
    add_pipeline_options(demo, exclude={"output", "overwrite"})  # the demo writes only its own folder
    demo.set_defaults(handler=_demo)

    compare = commands.add_parser(
        "compare", help="train several heads on one feature store and tabulate them",
        description="Extract DATASET's features once into DIR, then train, evaluate and report every head of "
                    "--heads on them (DIR/heads/HEAD/model and report), and write DIR/comparison.csv and "
                    "comparison.md: accuracy, macro F1 and training seconds side by side.")
    compare.add_argument("dataset", metavar="DATASET", help="folder with one sub-folder per class")
    compare.add_argument("--heads", metavar="H1,H2,...", type=_comma_list, default=argparse.SUPPRESS,
                         help=f"comma-separated heads from {', '.join(get_args(HeadName))} (default: "
                              f"{','.join(CompareSettings.model_fields['heads'].get_default(call_default_factory=True))})")
    add_pipeline_options(compare, exclude={"head"})
    compare.set_defaults(handler=_compare)

    predict = commands.add_parser(
        "predict", help="label new images with a trained bundle",
        description="Label image files and folders (recursed) with the bundle a run wrote (DIR/model, or DIR itself), "
                    "through the same decoding, preprocessing and backbone as its training images. Unreadable files "
                    "get a row with an error, not a failure. CSV columns: path,label,confidence, then label_2,"
                    "confidence_2 … up to --top-k, then error.")
    predict.add_argument("bundle", metavar="BUNDLE", help="model bundle folder, or a run's output folder")
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image file or folder (recursed)")
    add_settings_options(predict, PredictionSettings, exclude={"bundle", "paths"}, metavars={"output": "CSV"})
    predict.set_defaults(handler=_predict)

    explain = commands.add_parser(
        "explain", help="draw where a trained bundle looked, as a heatmap over each image",
        description="For each image (files, or folders recursed) write DIR/NNNN-NAME.png: the image as the network "
                    "saw it under a heatmap of the class the bundle predicts for it (exact CAM for linear heads on "
                    "avg-pooled features, Grad-CAM otherwise), and DIR/explanations.csv: path,label,confidence,"
                    "method,heatmap,error. Unreadable files get a row with an error, not a failure.")
    explain.add_argument("bundle", metavar="BUNDLE", help="model bundle folder, or a run's output folder")
    explain.add_argument("paths", nargs="+", metavar="IMAGE", help="image file or folder (recursed)")
    add_settings_options(explain, ExplainSettings, exclude={"bundle", "paths"})
    explain.set_defaults(handler=_explain)

    export = commands.add_parser(
        "export", help="export a run's features to parquet or .npy shards for embedding tools",
        description="Write SOURCE's feature store (a run's output folder, or a store) as parquet files with one row "
                    "per image (path, label, label_index, split, hash, features), or as embeddings/*.npy shards "
                    "beside metadata/*.parquet, the layout clip-retrieval and embedding-reader share.")
    export.add_argument("source", metavar="SOURCE", help="a run's output folder, or a feature store")
    add_settings_options(export, ExportSettings, exclude={"source"})
    export.set_defaults(handler=_export)

    backbones = commands.add_parser(
        "backbones",
        help="list backbones and whether pretrained weights are available offline",
        description="Every backbone with its native input size, feature dimension per pooling, "
        "default precision and where ImageNet weights would come from right now.",
    )
    backbones.set_defaults(handler=_backbones)
    # Other command groups (server, serve, watch) register themselves through the `transfer_flow.commands`
    # entry point, so the arrows point from each group to this root and never back.
    for group in entry_points(group="transfer_flow.commands"):
        group.load()(commands)
    for command in commands.choices.values():  # also after the command: `transfer-flow run ... --debug`
        # SUPPRESS: not given after the command, the value given (or not) before it stands.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show full tracebacks on errors")
        command.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                             help="also print Prefect's own lines (each task's final state, the temporary server)")
    return parser


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _run(args: argparse.Namespace) -> int:
    return _run_pipeline(PipelineSettings.model_validate(given_settings(args, PipelineSettings)))


def _run_pipeline(settings) -> int:
    from transfer_flow.flows.pipeline import transfer_learning
    from transfer_flow.flows.prefect_api import start_api_while_importing
    from transfer_flow.flows.preflight import check_pipeline

    backbone_modules = check_pipeline(settings)  # before a Prefect server is started for the flow
    start_api_while_importing(*backbone_modules)  # what its tasks import first (seconds of start-up)
    summary = transfer_learning(settings)
    print(f"\naccuracy {summary.accuracy:.4f}, macro F1 {summary.macro_f1:.4f} ({summary.images_extracted} images "
          f"extracted, {summary.images_reused} reused, {len(summary.images_skipped)} skipped)")
    for skipped in summary.images_skipped:
        print(f"  skipped {skipped.path}: {skipped.reason}")
    print(f"report:  {Path(summary.report) / 'report.md'}")
    print(f"html:    {Path(summary.report) / 'report.html'}")
    print(f"summary: {Path(settings.output) / 'run.json'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from transfer_flow.storage.demo_dataset import write_digits_dataset

    root = Path(args.output)
    dataset = write_digits_dataset(root / "dataset")
    # A second demo into the same folder updates the first (a warm rerun: nothing is re-extracted).
    settings = given_settings(args, PipelineSettings, dataset=str(dataset), output=str(root / "run"))
    return _run_pipeline(PipelineSettings.model_validate(settings))


def _compare(args: argparse.Namespace) -> int:
    from transfer_flow.flows.compare import compare_heads
    from transfer_flow.flows.prefect_api import start_api_while_importing
    from transfer_flow.flows.preflight import check_pipeline

    settings = CompareSettings.model_validate(given_settings(args, CompareSettings))
    backbone_modules = check_pipeline(settings)  # before a Prefect server is started for the flow
    start_api_while_importing(*backbone_modules)  # what its tasks import first (seconds of start-up)
    summary = compare_heads(settings)
    print()
    print(Path(summary.table_markdown).read_text(encoding="utf-8"))
    print(f"table:   {summary.table_csv}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from transfer_flow.flows.predict import batch_prediction
    from transfer_flow.flows.prefect_api import start_api_while_importing
    from transfer_flow.flows.preflight import check_prediction
    from transfer_flow.storage.predictions import predictions_csv_text

    settings = PredictionSettings.model_validate(given_settings(args, PredictionSettings))
    backbone_modules = check_prediction(settings)  # before a Prefect server is started for the flow
    start_api_while_importing(*backbone_modules)  # what its tasks import first (seconds of start-up)
    summary = batch_prediction(settings)
    if settings.output is None:
        sys.stdout.write(predictions_csv_text([r.csv_row(summary.top_k) for r in summary.rows], summary.top_k))
    else:
        print(f"\n{summary.images} images labelled ({summary.failed} unreadable) → {settings.output}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from transfer_flow.flows.explain import explain_with_heatmaps
    from transfer_flow.flows.prefect_api import start_api_while_importing
    from transfer_flow.flows.preflight import check_explanation

    settings = ExplainSettings.model_validate(given_settings(args, ExplainSettings))
    backbone_modules = check_explanation(settings)  # before a Prefect server is started for the flow
    start_api_while_importing(*backbone_modules)  # what its tasks import first (seconds of start-up)
    summary = explain_with_heatmaps(settings)
    for row in summary.rows:
        if row.error:
            print(f"  not explained {row.path}: {row.error}")
    print(f"\n{summary.images - summary.failed} of {summary.images} images explained ({summary.failed} unreadable) "
          f"→ {Path(settings.output) / 'explanations.csv'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from transfer_flow.storage.export import export_store, find_store

    settings = ExportSettings.model_validate(given_settings(args, ExportSettings))
    source = Path(settings.source)
    output = Path(settings.output) if settings.output else (source if source.is_dir() and source.suffix != ".zarr"
                                                            else source.parent) / f"export-{settings.format}"
    result = export_store(find_store(source, settings.store), output, settings.format,
                          shard_rows=settings.shard_rows, overwrite=settings.overwrite)
    print(f"{result.rows} rows in {result.shards} {result.format} shard(s) → {result.path}")
    return 0


def _backbones(args: argparse.Namespace) -> int:
    from transfer_flow.tasks.backbones import BACKBONES, weights_available_offline

    header = f"{'backbone':<18}{'input':>6}{'flatten':>10}{'avg/max':>9}  {'precision':<10}offline ImageNet weights"
    print(header)
    print("-" * len(header))
    for name, spec in sorted(BACKBONES.items()):
        source = weights_available_offline(spec)
        print(f"{name:<18}{spec.native_size:>6}{spec.feature_dim('flatten', spec.native_size):>10}"
              f"{spec.channels:>9}  {spec.default_precision:<10}{source or 'no (download needed, or --weights PATH)'}")
    return 0


class _UserErrorsWithoutTraceback(logging.Filter):
    """Prefect logs a failed run's exception with its traceback; for a user error the message is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and (isinstance(record.exc_info[1], TransferFlowError) or disk_error(record.exc_info[1])):
            record.exc_info = None
            record.exc_text = None
        return True


class _PrefectChatter(logging.Filter):
    """Lines of Prefect's that are about Prefect, not the user's run: each task's `Finished in state Completed()`
    (kept in the run's log in the UI) and the temporary server's start and stop notices. Shown with --verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "prefect.task_runs":
            return not record.getMessage().startswith("Finished in state Completed")
        if record.name == "prefect":
            return not record.getMessage().startswith(("Starting temporary server", "Stopping temporary server"))
        return True


def _quiet_environment() -> None:
    """TensorFlow reads this once, at its import (later, inside the flow); a user's own value wins."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up banners


@contextlib.contextmanager
def _temporary_server_defaults():
    """Prefect settings for the temporary server Prefect starts when no API is configured; a user's own wins.

    No telemetry: the tool works offline, and the failed sends logged an ERROR line on every command. Time to
    start on a busy small machine: Prefect's 20 s default ran out under load. (Prefect reads the environment
    once, at import, before `main` runs: hence settings, not environment variables.)"""
    from prefect.settings import (
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    defaults = {PREFECT_SERVER_ANALYTICS_ENABLED: False, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 90}
    with temporary_settings(updates={s: v for s, v in defaults.items() if s.name not in os.environ}):
        yield


_USER_ERRORS = _UserErrorsWithoutTraceback()
_CHATTER = _PrefectChatter()


def _quiet_console(verbose: bool, debug: bool) -> None:
    import prefect.main  # noqa: F401  (configures Prefect's logging: its console handler sits on the root logger)

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        logger.removeFilter(_USER_ERRORS) if debug else logger.addFilter(_USER_ERRORS)
    for handler in logging.getLogger().handlers:
        handler.removeFilter(_CHATTER) if verbose else handler.addFilter(_CHATTER)


def main(argv: list[str] | None = None) -> int:
    _quiet_environment()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in FLOW_COMMANDS + SERVER_COMMANDS:
        _quiet_console(args.verbose, args.debug)
    try:
        with contextlib.ExitStack() as prefect:
            if args.command in FLOW_COMMANDS + SERVER_COMMANDS:
                prefect.enter_context(_temporary_server_defaults())
                prefect.enter_context(_prefect_api(args.command))
            return args.handler(args)
    except (TransferFlowError, ValidationError) as error:
        if args.debug:
            raise
        if isinstance(error, ValidationError):
            error = SettingsError.from_validation_error(error, positional=POSITIONAL_NAMES)
        message = str(error)
        print(f"transfer-flow: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as error:  # a full, read-only or forbidden disk is the user's to fix: one line, not a traceback
        fault = disk_error(error, where=getattr(args, "output", None))
        if fault is None or args.debug:
            raise
        print(f"transfer-flow: error: {fault}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("transfer-flow: interrupted; no partial output was left under a final name", file=sys.stderr)
        return 130


FLOW_COMMANDS = ("run", "demo", "compare", "predict", "explain")
SERVER_COMMANDS = ("serve", "watch")  # need a server that stays up: a running one at the default address will do


@contextlib.contextmanager
def _prefect_api(command: str):
    """Run flows against a server already up at the default address (`transfer-flow server`), so runs show
    in its UI and skip the ~6 s of a temporary server; serve and watch use it too. PREFECT_API_URL, when set,
    always wins."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if command not in FLOW_COMMANDS + SERVER_COMMANDS or PREFECT_API_URL.value():
        yield
        return
    from transfer_flow.flows.prefect_api import running_local_server, temporary_server_dies_with_this_process

    url = running_local_server()
    if url is None:
        temporary_server_dies_with_this_process()  # a killed run must not leave the server listening
        yield
        return
    print(f"transfer-flow: using the Prefect server at {url} (set PREFECT_API_URL to choose another)", file=sys.stderr)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


if __name__ == "__main__":
    sys.exit(main())
