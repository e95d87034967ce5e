"""Arguments of ``research bench`` (registered by ``research.cli``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from research.bench import BenchConfig


def _items(text: str) -> tuple[int, ...]:
    try:
        items = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--items={text!r} is invalid; give item numbers such as 1,2,3") from None
    if not items or any(item not in range(1, 7) for item in items):
        raise argparse.ArgumentTypeError(f"--items={text!r} is invalid; item numbers go from 1 to 6")
    return items


def _cmd_bench(args: argparse.Namespace) -> int:
    from research.bench_report import run_bench

    fields = BenchConfig.__dataclass_fields__
    config = BenchConfig(**{k: v for k, v in vars(args).items() if k in fields})
    record = run_bench(config, Path(args.output))
    summary = {k: v for k, v in record.items() if k.startswith("item")}
    Console().print(f"Wrote {args.output}; items stored: {', '.join(sorted(summary))}.", markup=False, highlight=False)
    return 0


def add_bench_command(commands) -> None:
    """Add the ``bench`` subcommand to the ``research`` parser's subcommands."""
    defaults = BenchConfig(data_dir="")
    bench = commands.add_parser(
        "bench",
        help="Measure extraction speed, the matmul ceiling, bf16 accuracy, tracking overhead and a study's wall time.",
        description="Run benchmark items and write a markdown report (and its JSON record beside it). Items: 1 plain loop, "
        "2 project extraction path and levers, 3 matmul ceiling, 4 bf16 against fp32 accuracy, 5 tracking overhead, "
        "6 a study's wall time on the whole dataset. A later run of some items keeps the others' stored results.",
    )
    bench.add_argument("--data-dir", required=True, help="15 Scene folder (pre-split or flat).")
    bench.add_argument("--weights", default="", help=f"Checkpoint of --accuracy-backbone for item 4; item 4 is skipped without it.")
    bench.add_argument("--items", type=_items, default=defaults.items, help="Comma-separated item numbers (default: 1,2,3,4,5).")
    bench.add_argument("--output", default="reports/benchmarks.md", help="Markdown report; the JSON record goes beside it (default: %(default)s).")
    bench.add_argument("--backbone", default=defaults.backbone, help="Backbone timed in items 1-3 and 6, random weights (default: %(default)s).")
    bench.add_argument("--image-size", type=int, default=defaults.image_size, help="Input side in pixels (default: %(default)s).")
    bench.add_argument("--n-images", type=int, default=defaults.n_images, help="Images timed in items 1-2 (default: %(default)s).")
    bench.add_argument("--repeats", type=int, default=defaults.repeats, help="Repetitions per measurement; the median is reported (default: %(default)s).")
    bench.add_argument("--matmul-size", type=int, default=defaults.matmul_size, help="Side of the square matrices of item 3 (default: %(default)s).")
    bench.add_argument("--no-levers", dest="levers", action="store_false", help="Skip the per-lever measurements of item 2.")
    bench.add_argument("--try-compile", action="store_true", help="Also time torch.compile on the backbone (slow to compile on a few cores).")
    bench.add_argument("--accuracy-backbone", default=defaults.accuracy_backbone, help="Backbone of item 4 (default: %(default)s).")
    bench.add_argument("--accuracy-trials", type=int, default=defaults.accuracy_trials, help="SVM study trials in item 4 (default: %(default)s).")
    bench.add_argument("--limit-per-class", type=int, default=0, help="At most this many images per class and split in items 4 and 6; 0 keeps all.")
    bench.add_argument("--head-in-features", type=int, default=defaults.head_in_features, help="Feature size of the head in item 5 (default: VGG16 pool5, %(default)s).")
    bench.add_argument("--head-width", type=int, default=defaults.head_width, help="Head width of the item 5 trial (default: %(default)s).")
    bench.add_argument("--head-epochs", type=int, default=defaults.head_epochs, help="Epochs of the item 5 trial (default: %(default)s).")
    bench.add_argument("--largest-head", action="store_true", help="Also measure the peak memory of the widest head (about 10 GiB).")
    bench.add_argument("--study", default=defaults.study, help="Study timed in item 6 (default: %(default)s).")
    bench.add_argument("--study-trials", type=int, default=defaults.study_trials, help="Trials of the item 6 study (default: %(default)s).")
    bench.add_argument("--study-seeds", type=int, default=defaults.study_seeds, help="Seeds of the item 6 study (default: %(default)s).")
    bench.add_argument("--workdir", default="", help="Folder for the temporary stores and caches (default: the system's temporary folder).")
    bench.set_defaults(handler=_cmd_bench)
