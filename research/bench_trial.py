"""Benchmark items on whole trials and studies: the cost of MLflow tracking, and a study's wall time.

``time_mlflow_calls`` wraps every public method of ``MlflowClient`` with a timer for the duration
of a block (outermost calls only, since client methods call each other), so the time spent in
tracking can be subtracted from a study's wall time without changing the study's code.
"""

from __future__ import annotations

import functools
import logging
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from mlflow.tracking import MlflowClient

from research.bench import BenchConfig, PeakRss, isolated_tracking, load_average, sweep_config

log = logging.getLogger(__name__)


@dataclass
class CallTimer:
    """Seconds and number of outermost calls made through a wrapped API."""

    seconds: float = 0.0
    calls: int = 0
    _depth: int = 0


@contextmanager
def time_mlflow_calls() -> Iterator[CallTimer]:
    """Time every public ``MlflowClient`` method called inside the block (single-threaded use)."""
    timer = CallTimer()
    originals = {}
    for name, attribute in vars(MlflowClient).items():
        # Static and class methods, properties and private helpers stay as they are.
        if name.startswith("_") or not callable(attribute) or isinstance(attribute, (staticmethod, classmethod, type)):
            continue
        originals[name] = attribute
        setattr(MlflowClient, name, _timed(attribute, timer))
    try:
        yield timer
    finally:
        for name, original in originals.items():
            setattr(MlflowClient, name, original)


def _timed(method, timer: CallTimer):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        timer._depth += 1
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            timer._depth -= 1
            if timer._depth == 0:
                timer.seconds += time.perf_counter() - start
                timer.calls += 1

    return wrapper


# --- item 5: one head-training trial with and without its MLflow logging ----------------------


def synthetic_features(n: int, dims: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw class-clustered Gaussian features (non-negative like ReLU outputs) and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    centres = rng.normal(0, 1, size=(n_classes, dims)).astype(np.float32)
    features = np.maximum(centres[labels] + rng.normal(0, 2, size=(n, dims)).astype(np.float32), 0)
    return features, labels


def _head_trial(config: BenchConfig, data: dict, client: MlflowClient | None, experiment_id: str, naive: bool) -> dict:
    """Train one head as a study trial does, then log it (batched, or one call per value when ``naive``).

    Returns the seconds of training and of tracking (run creation, logging, run end).
    """
    from research.head import HeadConfig, HeadHistory, train_head
    from research.objectives import log_head_history

    head = HeadConfig(fc_width=config.head_width, max_epochs=config.head_epochs, patience=config.head_epochs, batch_size=64)
    start = time.perf_counter()
    history = HeadHistory()
    train_head(
        data["x_train"], data["y_train"], data["x_val"], data["y_val"], head, n_classes=15, seed=0,
        device=torch.device("cpu"), bf16=True, history=history,
    )
    trained = time.perf_counter()
    if client is not None:
        run_id = client.create_run(experiment_id, run_name="bench head trial").info.run_id
        if naive:
            _log_one_call_per_value(client, run_id, history)
        else:
            log_head_history(client, run_id, history)
        client.set_terminated(run_id, status="FINISHED")
    return {"train": trained - start, "tracking": time.perf_counter() - trained}


def _log_one_call_per_value(client: MlflowClient, run_id: str, history) -> None:
    """Log the same curves with one ``log_metric`` call per value, as a per-batch logger would."""
    series = {
        "train_batch_seconds": history.batch_seconds,
        "train_loss": history.train_loss,
        "val_loss": history.val_loss,
        "train_accuracy": history.train_accuracy,
        "val_accuracy": history.val_accuracy,
        "epoch_seconds": history.epoch_seconds,
    }
    for key, values in series.items():
        for step, value in enumerate(values):
            client.log_metric(run_id, key, float(value), step=step)


def tracking_overhead(config: BenchConfig, root: Path) -> dict:
    """Time one head trial without tracking, with the project's batched logging, and with per-value calls.

    The three variants alternate within each repetition, so that they see the same load. The
    overhead is the tracking time over the training time of the same trial (median over the
    repetitions); the totals with and without tracking are reported too, but on a shared machine
    their difference is mostly noise.

    NOTE: the per-value variant issues its calls after training rather than between batches; the
    call count and cost are those of a per-batch logger, the interleaving is not.
    """
    n_train, n_val = 1200, 300
    x, y = synthetic_features(n_train + n_val, config.head_in_features, 15, seed=0)
    data = {"x_train": x[:n_train], "y_train": y[:n_train], "x_val": x[n_train:], "y_val": y[n_train:]}
    runs: dict[str, list[dict]] = {"without": [], "batched": [], "per_value": []}
    load_before = load_average()
    with isolated_tracking(root):
        client = MlflowClient()
        experiment_id = client.create_experiment("bench-tracking")
        _head_trial(config, data, client, experiment_id, naive=False)  # warm-up: store creation, kernels
        for _ in range(config.repeats):
            runs["without"].append(_head_trial(config, data, None, experiment_id, naive=False))
            runs["batched"].append(_head_trial(config, data, client, experiment_id, naive=False))
            runs["per_value"].append(_head_trial(config, data, client, experiment_id, naive=True))

    result = {
        "in_features": config.head_in_features, "width": config.head_width, "epochs": config.head_epochs,
        "n_train": n_train, "load_before": load_before, "load_after": load_average(),
    }
    for name, trials in runs.items():
        result[name] = {
            "median_seconds": statistics.median(t["train"] + t["tracking"] for t in trials),
            "median_tracking_seconds": statistics.median(t["tracking"] for t in trials),
            "seconds": [t["train"] + t["tracking"] for t in trials],
        }
    result["largest_head_estimate"] = largest_head_estimate(config.head_in_features)
    result["batched_overhead"] = statistics.median(t["tracking"] / t["train"] for t in runs["batched"])
    result["per_value_overhead"] = statistics.median(t["tracking"] / t["train"] for t in runs["per_value"])
    return result


def largest_head_estimate(in_features: int) -> dict:
    """Estimate the training memory of the widest head from its parameter count.

    Per parameter: fp32 weight, gradient and SGD momentum (12 bytes) plus the bf16 copy that
    autocast makes of each weight (2 bytes); activations and the features are left out.
    """
    from research.head import WIDTHS, head_parameter_count

    width = max(WIDTHS)
    parameters = head_parameter_count(in_features, width, 15)
    return {"width": width, "in_features": in_features, "parameters": parameters, "bytes": 14 * parameters}


def largest_head_memory(config: BenchConfig) -> dict:
    """Peak resident memory of one short epoch of the widest head (16384) on pool5-sized features."""
    from research.head import WIDTHS, HeadConfig, head_parameter_count, train_head

    width = max(WIDTHS)
    x, y = synthetic_features(256, config.head_in_features, 15, seed=1)
    head = HeadConfig(fc_width=width, max_epochs=1, patience=1, batch_size=64)
    load_before = load_average()
    with PeakRss() as memory:
        start = time.perf_counter()
        train_head(x[:192], y[:192], x[192:], y[192:], head, n_classes=15, device=torch.device("cpu"), bf16=True)
        seconds = time.perf_counter() - start
    return {
        "width": width,
        "in_features": config.head_in_features,
        "parameters": head_parameter_count(config.head_in_features, width, 15),
        "peak_rss_bytes": memory.peak_bytes,
        "rss_increase_bytes": memory.peak_bytes - memory.start_bytes,
        "epoch_seconds": seconds,
        "load_before": load_before,
        "load_after": load_average(),
    }


# --- item 6: the default study on the full data, split into its parts -------------------------


@contextmanager
def _time_function(module, name: str, timer: CallTimer) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, _timed(original, timer))
    try:
        yield
    finally:
        setattr(module, name, original)


def study_wall_time(config: BenchConfig, root: Path) -> dict:
    """Run the study once from an empty cache and split its wall time into extraction, tracking and the rest.

    The backbone has random weights (``weights=none``): its speed is that of the real weights.
    "Training" is everything else: audit, classifier fits, Optuna and the test refit.
    """
    import research.sweep as sweep_module

    extraction, audit = CallTimer(), CallTimer()
    with isolated_tracking(root) as stores, time_mlflow_calls() as tracking:
        with _time_function(sweep_module, "extract_features", extraction), _time_function(sweep_module, "audit_dataset", audit):
            load_before = load_average()
            start = time.perf_counter()
            result = sweep_module.run_sweep(sweep_config(
                data_dir=config.data_dir, study=config.study, n_trials=config.study_trials, seeds=config.study_seeds,
                backbone=config.backbone, weights="none", image_size=config.image_size,
                limit_per_class=config.limit_per_class, study_name="bench-study", **stores,
            ))
            total = time.perf_counter() - start
    return {
        "study": config.study,
        "trials": config.study_trials,
        "seeds": config.study_seeds,
        "total_seconds": total,
        "extraction_seconds": extraction.seconds,
        "extractions": extraction.calls,
        "audit_seconds": audit.seconds,
        "tracking_seconds": tracking.seconds,
        "tracking_calls": tracking.calls,
        "training_seconds": total - extraction.seconds - audit.seconds - tracking.seconds,
        "test_accuracy": result.get("test_accuracy"),
        "load_before": load_before,
        "load_after": load_average(),
    }


def scratch_dir(config: BenchConfig) -> tempfile.TemporaryDirectory:
    """Return a temporary folder for the stores and caches of one benchmark run."""
    return tempfile.TemporaryDirectory(prefix="research-bench-", dir=config.workdir or None)
