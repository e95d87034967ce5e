"""The ``research`` command: thin argument parsing over the package's modules."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import warnings

import optuna
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from research import ui
from research.audit import SPLITS, audit_dataset, audit_markdown
from research.backbone import WeightsError
from research.bench_cli import add_bench_command
from research.data import DatasetError, load_dataset
from research.features import FeatureError
from research.report_cli import add_report_commands
from research.studies import StudyConfigError
from research.sweep import SweepConfig, run_extract, run_sweep
from research.workers import WorkerError

log = logging.getLogger("research")

# Errors whose message already names the value at fault and the fix: shown without a traceback.
USER_ERRORS = (DatasetError, WeightsError, StudyConfigError, FeatureError, ui.UiError, WorkerError, ValueError, ConnectionError, FileNotFoundError, PermissionError)


def _print_result(result: dict) -> None:
    """Print a command's result as strict JSON; NaN (a std over one seed, say) becomes null."""
    clean = {key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in result.items()}
    Console().print_json(json.dumps(clean))


def _whole_number(text: str) -> int:
    """Parse an integer option; MLproject float parameters arrive as text such as ``20.0``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(value)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    defaults = SweepConfig(data_dir="")
    parser.add_argument("--data-dir", required=True, help="15 Scene folder: train/ and test/ with one folder per class, or one folder per class.")
    parser.add_argument("--backbone", default=defaults.backbone, help="timm model name (default: %(default)s).")
    parser.add_argument(
        "--weights", default=defaults.weights,
        help="'imagenet' (timm hub weights, needs network or the hub cache), 'none' (random init) or a checkpoint path (default: %(default)s).",
    )
    parser.add_argument("--image-size", type=_whole_number, default=defaults.image_size, help="Input side in pixels (default: %(default)s).")
    parser.add_argument("--limit-per-class", type=_whole_number, default=0, help="At most this many images per class and split; 0 keeps all (default: 0).")
    parser.add_argument("--seed", type=_whole_number, default=defaults.seed, help="Seed of splits, sampler and classifiers (default: %(default)s).")
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction, help="Fraction of each training class held out for validation (default: %(default)s).")
    parser.add_argument("--experiment", default=defaults.experiment, help="MLflow experiment name when not started by 'mlflow run' (default: %(default)s).")
    parser.add_argument("--cache-dir", default=defaults.cache_dir, help="Feature cache folder (default: %(default)s).")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=defaults.precision, help="Backbone precision; auto = bf16 where the CPU or GPU has native bf16 (default: %(default)s).")
    parser.add_argument("--batch-size", type=_whole_number, default=defaults.batch_size, help="Images per backbone batch (default: %(default)s).")
    parser.add_argument("--num-workers", type=_whole_number, default=defaults.num_workers, help="Image decoding threads running ahead of the backbone; 0 decodes in the main thread (default: %(default)s).")
    parser.add_argument("--device", default=defaults.device, help="'auto' (CUDA when available), 'cpu' or 'cuda' (default: %(default)s).")


def _config(args: argparse.Namespace) -> SweepConfig:
    fields = SweepConfig.__dataclass_fields__
    return SweepConfig(**{k: v for k, v in vars(args).items() if k in fields})


def _cmd_sweep(args: argparse.Namespace) -> int:
    result = run_sweep(_config(args))
    _print_result(result)
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    result = run_extract(_config(args))
    _print_result(result)
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    dataset = load_dataset(args.data_dir, seed=args.seed, limit_per_class=args.limit_per_class)
    audit = audit_dataset(dataset)
    if args.markdown:
        Console().print(audit_markdown(audit), markup=False, highlight=False)
        return 0

    console = Console()
    table = Table(title=f"{audit.root} ({audit.layout})")
    table.add_column("class")
    for split in SPLITS:
        table.add_column(split, justify="right")
    for name in audit.classes:
        table.add_row(name, *(str(audit.counts[s][name]) for s in SPLITS))
    table.add_row("total", *(str(sum(audit.counts[s].values())) for s in SPLITS), style="bold")
    console.print(table)
    console.print("Image sizes: " + ", ".join(f"{k} ({v})" for k, v in audit.sizes.items()))
    console.print("Image modes: " + ", ".join(f"{k} ({v})" for k, v in audit.modes.items()))
    console.print(f"Identical images within a split: {len(audit.duplicates_within)} groups")
    for group in audit.duplicates_within:
        console.print("  " + ", ".join(group), markup=False)
    console.print(f"Identical images across splits (leakage): {len(audit.duplicates_across)} groups")
    for group in audit.duplicates_across:
        console.print("  " + ", ".join(group), markup=False)
    console.print(f"Skipped non-image files: {len(audit.skipped_files)}")
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    console = Console()

    tracking_uri = args.tracking_uri or ui.default_tracking_uri()

    def show_urls(servers: list[ui.Server]) -> None:
        for server in servers:
            # soft_wrap keeps each URL on one line, so that terminals can open it with a click.
            console.print(f"{server.name}: {server.url}", markup=False, highlight=False, soft_wrap=True)
            if server.name == "MLflow":
                for name, url in ui.experiment_urls(tracking_uri, server.url).items():
                    console.print(f"  runs of experiment '{name}': {url}", markup=False, highlight=False, soft_wrap=True)
        console.print("Press Ctrl-C to stop both servers.", markup=False, highlight=False)

    return ui.serve(tracking_uri, args.storage, args.host, args.mlflow_port, args.optuna_port, on_ready=show_urls)


def _add_ui_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri", default="",
        help="MLflow tracking store (default: MLFLOW_TRACKING_URI, else MLflow's default, sqlite:///mlflow.db in the working directory).",
    )
    parser.add_argument("--storage", default=SweepConfig.storage, help="Optuna storage URL or journal file (default: %(default)s).")
    parser.add_argument("--host", default=ui.DEFAULT_HOST, help="Address both servers listen on (default: %(default)s).")
    parser.add_argument("--mlflow-port", type=_whole_number, default=ui.DEFAULT_MLFLOW_PORT, help="TCP port of the MLflow UI (default: %(default)s).")
    parser.add_argument("--optuna-port", type=_whole_number, default=ui.DEFAULT_OPTUNA_PORT, help="TCP port of optuna-dashboard (default: %(default)s).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="research",
        description="Transfer learning from a timm backbone to 15 Scene: cached features, Optuna studies tracked in MLflow, and a report.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Log debug messages.")
    commands = parser.add_subparsers(dest="command", required=True)

    sweep = commands.add_parser("sweep", help="Run an Optuna study on cached backbone features, tracked in MLflow.")
    _add_run_options(sweep)
    sweep.add_argument("--study", default=SweepConfig.study, help="Study file name in sweeps/, without .yaml (default: %(default)s).")
    sweep.add_argument("--seeds", type=_whole_number, default=SweepConfig.seeds, help="Number of seeds (seed, seed+1, ...) the best configuration is refit and tested with (default: %(default)s).")
    sweep.add_argument("--max-epochs", type=_whole_number, default=0, help="Maximum epochs of the MLP head, overriding the study file; 0 keeps the file's value (default: 0).")
    sweep.add_argument("--n-trials", type=_whole_number, default=20, help="Finished trials the study must reach; a re-run resumes (default: %(default)s).")
    sweep.add_argument(
        "--storage", default="sqlite:///optuna.db",
        help="Optuna storage: sqlite:///PATH, postgresql://USER:PASSWORD@HOST:PORT/DB, or a journal file PATH (default: %(default)s).",
    )
    sweep.add_argument("--workers", type=_whole_number, default=1, help="Worker processes sharing the study on this machine (default: %(default)s).")
    sweep.add_argument(
        "--heartbeat-seconds", type=_whole_number, default=60,
        help="Trial heartbeat interval on SQL storages; a trial silent for twice this is failed and retried (default: %(default)s).",
    )
    sweep.add_argument("--study-name", default="", help="Optuna study name (default: derived from study, backbone, weights, size, seed and data).")
    sweep.set_defaults(handler=_cmd_sweep)

    extract = commands.add_parser("extract", help="Fill the feature cache for a dataset and backbone, tracked as one MLflow run.")
    _add_run_options(extract)
    extract.set_defaults(handler=_cmd_extract)

    audit = commands.add_parser("audit", help="Print images per class and split, sizes, modes and identical images.")
    audit.add_argument("data_dir", help="Dataset folder (pre-split or flat).")
    audit.add_argument("--seed", type=_whole_number, default=0, help="Seed of the flat-layout split and validation carve-out (default: 0).")
    audit.add_argument("--limit-per-class", type=_whole_number, default=0, help="At most this many images per class and split; 0 keeps all (default: 0).")
    audit.add_argument("--markdown", action="store_true", help="Print the audit as markdown.")
    audit.set_defaults(handler=_cmd_audit)

    ui_parser = commands.add_parser("ui", help="Serve the MLflow UI and optuna-dashboard on 127.0.0.1 until Ctrl-C or SIGTERM.")
    _add_ui_options(ui_parser)
    ui_parser.set_defaults(handler=_cmd_ui)

    add_bench_command(commands)
    add_report_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=True)],
    )
    # timm's checkpoint loader logs "Loaded  from checkpoint" with an empty key for safetensors
    # files (timm 1.0.31); research.backbone logs the loaded weights with their digest instead.
    for noisy in ("alembic", "urllib3", "PIL", "filelock", "timm.models._helpers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Heartbeats, metric names and stale-trial cleanup are marked experimental in Optuna 5.1. The
    # warning repeats on every sweep and needs no action from the user.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    try:
        return args.handler(args)
    except USER_ERRORS as error:
        log.error("%s", error)
        return 2
    except KeyboardInterrupt:
        log.error("Interrupted.")
        return 130


if __name__ == "__main__":
    sys.exit(main())
