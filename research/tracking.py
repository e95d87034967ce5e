"""MLflow run tree helpers: parent and child runs, batched metric writes, environment capture."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import mlflow
import psutil
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

# MLflow accepts at most 1000 metrics, 100 params and 100 tags in one log_batch call.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
PACKAGES = ("torch", "torchvision", "timm", "mlflow", "optuna", "scikit-learn", "numpy", "pillow")


def redact_url(url: str) -> str:
    """Hide the password of a storage URL such as ``postgresql://user:secret@host/db``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    """Log params in batches; values are converted to strings."""
    items = [Param(key, str(value)) for key, value in params.items()]
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + MAX_PARAMS_PER_BATCH])


def log_new_params(client: MlflowClient, run_id: str, params: dict) -> None:
    """Log params on a run that may already have some, as the parent run created by ``mlflow run`` has.

    MLflow forbids changing a logged param, so a key already logged with another value (the raw
    ``-P`` text, say) keeps it and the resolved value goes to ``resolved_<key>``.
    """
    existing = client.get_run(run_id).data.params
    new = {}
    for key, value in params.items():
        if key not in existing:
            new[key] = value
        elif existing[key] != str(value):
            new[f"resolved_{key}"] = value
    log_params(client, run_id, new)


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log scalar metrics in one call."""
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()])


def log_series(client: MlflowClient, run_id: str, key: str, values: list[float], first_step: int = 0) -> None:
    """Log a metric series (step = index + ``first_step``) with a few batched calls, not one per value."""
    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, first_step + i) for i, value in enumerate(values)]
    for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])


def log_curves(client: MlflowClient, run_id: str, series: dict[str, list[float]], first_step: int = 0) -> None:
    """Log several metric series (step = index + ``first_step``) together, 1000 values per call."""
    now = int(time.time() * 1000)
    metrics = [
        Metric(key, float(value), now, first_step + i) for key, values in series.items() for i, value in enumerate(values)
    ]
    for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])


def set_tags(client: MlflowClient, run_id: str, tags: dict) -> None:
    client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])


def log_text(client: MlflowClient, run_id: str, text: str, artifact_file: str) -> None:
    client.log_text(run_id, text, artifact_file)


def log_json(client: MlflowClient, run_id: str, data: dict, artifact_file: str) -> None:
    client.log_text(run_id, json.dumps(data, indent=2, sort_keys=True, default=str), artifact_file)


def git_commit(cwd: Path | None = None) -> str:
    """Return the git commit of ``cwd`` (``-dirty`` when it has uncommitted changes), or ``unknown``."""
    cwd = cwd or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if status else commit


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info() -> dict:
    """Describe the hardware, the package versions and the code revision."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_physical_cores": psutil.cpu_count(logical=False),
        "cpu_logical_cores": psutil.cpu_count(logical=True),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "git_commit": git_commit(),
        "packages": versions,
    }


def resolve_experiment(client: MlflowClient, name: str) -> str:
    """Return the id of experiment ``name``, creating it when absent."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except mlflow.exceptions.MlflowException:
        # Another worker created it between the lookup and the create.
        return client.get_experiment_by_name(name).experiment_id


@contextmanager
def parent_run(client: MlflowClient, experiment_name: str, run_name: str):
    """Yield the sweep's parent run id.

    Under ``mlflow run`` the parent is the run that MLflow created (``MLFLOW_RUN_ID``); otherwise a
    new run is created in ``experiment_name``. The run ends FINISHED, or FAILED on an exception
    (KILLED on Ctrl-C).
    """
    existing = os.environ.get("MLFLOW_RUN_ID")
    if existing:
        run_id = existing
        client.set_tag(run_id, "mlflow.runName", run_name)
        owned = False
    else:
        experiment_id = resolve_experiment(client, experiment_name)
        run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
        owned = True
    log.info("MLflow parent run %s (tracking URI %s).", run_id, redact_url(mlflow.get_tracking_uri()))

    with terminate_on_exit(client, run_id, finish=owned):
        yield run_id


@contextmanager
def terminate_on_exit(client: MlflowClient, run_id: str, finish: bool = True):
    """End the run KILLED on Ctrl-C, FAILED on any other exception, and FINISHED if ``finish`` on success."""
    try:
        yield
    except KeyboardInterrupt:
        client.set_terminated(run_id, status="KILLED")
        raise
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    if finish:
        client.set_terminated(run_id, status="FINISHED")
