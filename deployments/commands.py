"""The `server`, `serve` and `watch` subcommands of `transfer-flow`.

flows/cli.py adds them with `add_deployment_commands(commands)` and calls `args.handler(args)`;
`python -m transfer_flow.deployments.commands ...` runs them alone. Handlers return an exit code and raise
`TransferFlowError` subclasses for user errors.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from transfer_flow.flows.options import add_pipeline_options, given_settings
from transfer_flow.storage.errors import SettingsError

_HOME_HELP = (
    "transfer-flow's folder: server database, model registry, run outputs "
    "(default: $TRANSFER_FLOW_HOME or ~/.transfer-flow)"
)


def add_deployment_commands(subparsers) -> None:
    """Add `server`, `serve` and `watch` to the `transfer-flow` subcommands."""
    from transfer_flow.deployments.definitions import NIGHTLY, SERVE_EXCLUDED
    from transfer_flow.flows.prefect_api import DEFAULT_HOST, DEFAULT_PORT
    from transfer_flow.tasks.inbox import MARKER, STATE_FILE

    server = subparsers.add_parser(
        "server", help="start a local Prefect server (API + UI) for scheduled and triggered runs",
        description="Run `prefect server start` in the foreground with its SQLite database under HOME/prefect, "
                    "listening on 127.0.0.1 only unless --host says otherwise. Prints the UI address and the "
                    "PREFECT_API_URL to export in the terminals that run `transfer-flow serve` and `watch`. "
                    "Ctrl-C stops it.")
    server.add_argument("--home", metavar="DIR", help=_HOME_HELP)
    server.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to listen on (default: %(default)s; 0.0.0.0 exposes the unauthenticated API to the network)",
    )
    server.add_argument("--port", type=int, default=DEFAULT_PORT, help="default: %(default)s")
    server.set_defaults(handler=_server)

    serve = subparsers.add_parser(
        "serve", help="register the deployments (retrain, on-dataset, on-demand) and run what they schedule",
        description="Register with the Prefect server at PREFECT_API_URL: train-and-promote/retrain (cron, "
                    "nightly by default), train-and-promote/on-dataset (triggered by the "
                    "transfer-flow.dataset.arrived event), transfer-learning/on-demand (run from the UI's form) "
                    "and, with --inbox, scan-inbox/poll-inbox; then execute their runs until Ctrl-C. The pipeline "
                    "options below become the deployments' default parameters (scheduled and triggered runs "
                    "always --wait for a run writing the same output).")
    serve.add_argument("--home", metavar="DIR", help=_HOME_HELP)
    serve.add_argument(
        "--dataset",
        metavar="DIR",
        help="dataset the scheduled retrain reads (without it the retrain schedule is registered paused)",
    )
    serve.add_argument("--registry", metavar="DIR", help="model registry folder (default: HOME/registry)")
    serve.add_argument(
        "--runs", metavar="DIR", help="run outputs: RUNS/retrain, RUNS/<dataset name> (default: HOME/runs)"
    )
    serve.add_argument("--cron", default=NIGHTLY, metavar="EXPR",
                       help="retrain schedule, standard 5-field cron (default: '%(default)s', 02:00 every night)")
    serve.add_argument("--timezone", metavar="ZONE", help="IANA time zone of --cron (default: this machine's)")
    serve.add_argument("--metric", choices=["accuracy", "macro_f1"], default="macro_f1",
                       help="score that decides promotion (default: %(default)s)")
    serve.add_argument("--margin", type=float, default=0.0, metavar="F",
                       help="promote when challenger ≥ champion + F (default: %(default)s)")
    serve.add_argument("--inbox", metavar="DIR",
                       help="also register scan-inbox/poll-inbox, which announces datasets arriving in DIR "
                            "(the alternative to keeping `transfer-flow watch` running)")
    serve.add_argument("--poll-every", type=float, default=60.0, metavar="SECONDS",
                       help="poll-inbox interval (default: %(default)s)")
    serve.add_argument("--limit", type=int, default=1, metavar="N",
                       help="runs executed at once; more wait their turn (default: %(default)s)")
    serve.add_argument("--register-only", action="store_true",
                       help="register or update the deployments and exit; their runs wait until `serve` runs again")
    # Every pipeline option becomes the deployments' default; those that cannot apply are not offered:
    # each deployment sets its own output, and unattended runs always wait for a run writing the same output.
    add_pipeline_options(serve, exclude=SERVE_EXCLUDED)
    serve.set_defaults(handler=_serve)

    watch = subparsers.add_parser(
        "watch", help="announce dataset folders that arrive in an inbox (triggers on-dataset)",
        description=f"Scan INBOX when anything in it changes and every --interval seconds. Each sub-folder is a "
                    f"dataset; it is announced once, "
                    f"with a transfer-flow.dataset.arrived event, when ready: when it holds a {MARKER} file "
                    f"(--ready marker, the default: create it after copying) or when nothing in it has changed for "
                    f"--quiet-seconds (--ready quiet), and it was unchanged since the previous scan. What was "
                    f"announced is kept in INBOX/{STATE_FILE}: a restart announces nothing twice, and a folder "
                    f"that changes after its announcement is announced again as a new version.")
    watch.add_argument("inbox", metavar="INBOX", help="folder whose sub-folders are datasets")
    watch.add_argument("--ready", choices=["marker", "quiet"], default="marker",
                       help=f"marker: wait for a {MARKER} file; quiet: wait until nothing changed for --quiet-seconds "
                            "(default: %(default)s)")
    watch.add_argument("--quiet-seconds", type=float, default=60.0, metavar="S", help="default: %(default)s")
    watch.add_argument(
        "--interval", type=float, default=5.0, metavar="S",
        help="longest wait between scans, changes or not (default: %(default)s)",
    )
    watch.add_argument("--state", metavar="FILE", help=f"state file (default: INBOX/{STATE_FILE})")
    watch.add_argument("--once", action="store_true",
                       help="scan once and exit (a folder must be seen unchanged by two scans, e.g. two cron runs)")
    watch.set_defaults(handler=_watch)


def _home(args: argparse.Namespace) -> str:
    from transfer_flow.deployments.definitions import default_home

    return str(Path(args.home).expanduser().resolve()) if args.home else str(default_home())


def _server(args: argparse.Namespace) -> int:
    from transfer_flow.deployments.server import run_server

    return run_server(Path(_home(args)), host=args.host, port=args.port)


def _check_server() -> str:
    import httpx

    from transfer_flow.flows.prefect_api import require_api_url

    url = require_api_url().rstrip("/")
    try:
        httpx.get(f"{url}/health", timeout=5).raise_for_status()
    except httpx.HTTPError as error:
        raise SettingsError(f"No Prefect server answers at PREFECT_API_URL={url} ({error}): start one with "
                            "`transfer-flow server`") from None
    return url


def serve_options(args: argparse.Namespace):
    from pydantic import ValidationError

    from transfer_flow.deployments.definitions import SERVE_EXCLUDED, ServeOptions
    from transfer_flow.flows.settings import PipelineSettings

    if args.dataset and not Path(args.dataset).expanduser().is_dir():
        raise SettingsError(f"--dataset {args.dataset} does not exist or is not a folder")
    if args.inbox and not Path(args.inbox).expanduser().is_dir():
        raise SettingsError(f"--inbox {args.inbox} does not exist or is not a folder")
    pipeline = {k: v for k, v in given_settings(args, PipelineSettings).items() if k not in SERVE_EXCLUDED}
    given = {"home": _home(args), "registry": args.registry, "runs": args.runs, "dataset": args.dataset,
             "cron": args.cron, "metric": args.metric, "margin": args.margin, "pipeline": pipeline,
             "inbox": args.inbox, "poll_seconds": args.poll_every}
    if args.timezone:
        given["timezone"] = args.timezone
    try:
        options = ServeOptions(**given)
        options.pipeline_defaults()
    except ValidationError as error:
        raise SettingsError.from_validation_error(error, nested={"pipeline"}) from None
    return options


def _serve(args: argparse.Namespace) -> int:
    from transfer_flow.deployments.definitions import build_deployments

    if args.limit < 1:
        raise SettingsError(f"Expected --limit of at least 1, got {args.limit}")
    options = serve_options(args)
    url = _check_server()
    deployments = build_deployments(options)
    print(f"Prefect server: {url}")
    print(f"registry: {options.registry_dir}   runs: {options.runs_dir}")
    for deployment in deployments:
        print(f"  {deployment.full_name:<30} {describe(deployment)}")
    if args.register_only:
        for deployment in deployments:
            deployment.apply()
        print("registered; runs execute while `transfer-flow serve` is running")
        return 0
    from prefect import serve

    serve(*deployments, limit=args.limit)
    return 0


def describe(deployment) -> str:
    """One line: when a deployment runs."""
    if deployment.triggers:
        return "on event " + ", ".join(sorted(e for t in deployment.triggers for e in getattr(t, "expect", ())))
    parts = []
    for schedule in deployment.schedules or []:
        inner = schedule.schedule
        active = "" if getattr(schedule, "active", True) else " (paused: no --dataset)"
        if getattr(inner, "cron", None):
            parts.append(f"cron '{inner.cron}' ({inner.timezone}){active}")
        elif getattr(inner, "interval", None):
            parts.append(f"every {inner.interval.total_seconds():g} s{active}")
    return ", ".join(parts) or "from the UI or `prefect deployment run`"


def _watch(args: argparse.Namespace) -> int:
    from transfer_flow.flows.prefect_api import require_api_url
    from transfer_flow.tasks.inbox import InboxWatcher

    if args.interval <= 0:
        raise SettingsError(f"Expected --interval above 0, got {args.interval}")
    watcher = InboxWatcher(args.inbox, ready=args.ready, quiet_seconds=args.quiet_seconds, state_file=args.state)
    require_api_url()
    _show_watch_log()
    if args.once:
        watcher.scan()
        return 0
    rule = "a _READY file" if args.ready == "marker" else f"{args.quiet_seconds:g} s without changes"
    print(
        f"watching {watcher.inbox} (scans on changes and every {args.interval:g} s; ready: {rule}; "
        f"state: {watcher.log.path}); Ctrl-C stops",
        flush=True,
    )
    try:
        watcher.run(interval=args.interval)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    return 0


def _show_watch_log() -> None:
    logger = logging.getLogger("transfer_flow.watch")
    if not any(getattr(h, "_transfer_flow", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        handler._transfer_flow = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """`python -m transfer_flow.deployments.commands server|serve|watch ...`: these commands alone."""
    import os

    from transfer_flow.storage.errors import TransferFlowError

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # as flows/cli.py does; served runs inherit it
    parser = argparse.ArgumentParser(prog="transfer-flow")
    add_deployment_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except TransferFlowError as error:
        print(f"transfer-flow: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
