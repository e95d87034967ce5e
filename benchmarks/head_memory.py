"""Measure the MLP head's peak memory and time per epoch for each width, one process per width.

Usage: ``python benchmarks/head_memory.py [--in-features 25088] [--rows 320] [--widths 1024 4096 8196 16384]``.
The features are random, so no dataset is needed. Each width trains for one epoch and validates on
the same rows, with bf16 autocast where the CPU supports it and SGD with momentum as in
``sweeps/head.yaml``. Peak memory is the child process's ``ru_maxrss``, so each width runs in a
fresh process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import torch

from research.features import cpu_supports_bf16
from research.head import HeadConfig, HeadHistory, head_parameter_count, peak_rss_bytes, train_head


def measure(in_features: int, width: int, rows: int, epochs: int) -> dict:
    """Train one head on random features and return its size, time and peak memory."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, in_features)).astype(np.float32)
    y = np.arange(rows) % 15
    history = HeadHistory()
    config = HeadConfig(fc_width=width, dropout=0.5, learning_rate=1e-3, max_epochs=epochs, patience=epochs, batch_size=64)
    bf16 = cpu_supports_bf16()
    train_head(x, y, x, y, config, n_classes=15, bf16=bf16, history=history)
    return {
        "width": width,
        "parameters": head_parameter_count(in_features, width, 15),
        "bf16": bf16,
        "rows": rows,
        "epoch_seconds": history.epoch_seconds,
        "batch_seconds_mean": float(np.mean(history.batch_seconds)),
        "rss_after_epoch_gib": history.rss_bytes / 2**30,
        "peak_rss_gib": peak_rss_bytes() / 2**30,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-features", type=int, default=25088, help="Input features (25,088 = VGG16 pool5 at 224 px).")
    parser.add_argument("--rows", type=int, default=320, help="Synthetic training rows.")
    parser.add_argument("--epochs", type=int, default=1, help="Epochs per width.")
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 4096, 8196, 16384], help="Head widths to measure.")
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.in_features, args.one, args.rows, args.epochs)))
        return
    for width in args.widths:
        command = [sys.executable, __file__, "--one", str(width), "--in-features", str(args.in_features), "--rows", str(args.rows), "--epochs", str(args.epochs)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        print(output.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
