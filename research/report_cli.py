"""The ``research report``, ``research predict`` and ``research featuremaps`` subcommands."""

from __future__ import annotations

import argparse
import json
import os

from rich.console import Console

from research.featuremaps import DEFAULT_QUANTILE
from research.report_text import LANGS

DEFAULT_EXPERIMENT = "15-scene"


def _cmd_report(args: argparse.Namespace) -> int:
    from research.report import write_report

    # MLflow draws a progress bar for every artifact download; the report downloads many small files.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    langs = LANGS if args.lang == "all" else (args.lang,)
    paths = [str(write_report(args.experiment, args.out or None, lang)) for lang in langs]
    Console().print_json(json.dumps({"reports": paths}))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from research.predict import run_predict

    result = run_predict(args.images, args.backbone, args.weights, args.experiment, args.top_k)
    Console().print_json(json.dumps(result))
    return 0


def _cmd_featuremaps(args: argparse.Namespace) -> int:
    from research.featuremaps import run_featuremaps

    result = run_featuremaps(args.images, args.backbone, args.weights, args.experiment, args.quantile)
    Console().print_json(json.dumps(result))
    return 0


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="Picture files (any format Pillow reads).")
    parser.add_argument("--backbone", default="vgg16", help="timm model name (default: %(default)s).")
    parser.add_argument(
        "--weights", default="imagenet",
        help="'imagenet' (timm hub weights), 'none' (random init) or a checkpoint path (default: %(default)s).",
    )
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment of the run (default: %(default)s).")


def add_report_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``report``, ``predict`` and ``featuremaps`` on the ``research`` command's subparsers."""
    report = commands.add_parser("report", help="Write the markdown report of an MLflow experiment, from its tracked runs alone.")
    report.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name, or several separated by commas (default: %(default)s).")
    report.add_argument("--out", default="", help="Output folder (default: reports/EXPERIMENT, several names joined by '+').")
    report.add_argument("--lang", choices=(*LANGS, "all"), default="en", help="Report language; 'all' writes each one (default: %(default)s).")
    report.set_defaults(handler=_cmd_report)

    predict = commands.add_parser("predict", help="Classify pictures with the backbone's ImageNet head and log the top classes to MLflow.")
    _add_model_options(predict)
    predict.add_argument("--top-k", type=int, default=5, help="Classes listed per picture (default: %(default)s).")
    predict.set_defaults(handler=_cmd_predict)

    featuremaps = commands.add_parser("featuremaps", help="Log the first convolution's feature maps of pictures to MLflow.")
    _add_model_options(featuremaps)
    featuremaps.add_argument(
        "--quantile", type=float, default=DEFAULT_QUANTILE,
        help="Per map, pixels at or above this quantile are drawn as its most active region (default: %(default)s).",
    )
    featuremaps.set_defaults(handler=_cmd_featuremaps)
