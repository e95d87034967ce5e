"""Parallel workers on one study: ``research sweep --workers N`` starts N processes.

The starting process prepares everything the workers share before any of them starts: the MLflow
tracking database and experiment, the Optuna study, the parent run and the feature cache. Each
worker is ``python -m research.workers CONFIG_JSON INDEX``: it runs the same sweep code on the same
study and parent run, skips the test pass, and stops when finished plus running trials reach
``n_trials``. The starting process then evaluates the best trial on the test set.

Copies of ``research sweep`` started by hand on one study (on one machine or several) share it the
same way, each with its own test pass at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

import mlflow
import optuna
from rich.progress import Progress

from research import optimize, resume

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
HEALTH_TIMEOUT_SECONDS = 10


class WorkerError(RuntimeError):
    """A worker process exited with an error; its log above names the cause."""


def check_tracking_server(uri: str | None = None) -> None:
    """Check that an ``http(s)://`` MLflow tracking server responds on ``/health``.

    Raises:
        ConnectionError: The server does not respond within ``HEALTH_TIMEOUT_SECONDS``.
    """
    uri = uri or mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urlopen(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_SECONDS):
            pass
    except (URLError, OSError) as error:
        raise ConnectionError(
            f"MLflow tracking server {uri} cannot be reached ({getattr(error, 'reason', error)}). Start it "
            "(mlflow server --host 127.0.0.1 --port PORT) or fix MLFLOW_TRACKING_URI."
        ) from error


def initialise_stores(config) -> None:
    """Create the MLflow tracking database and the Optuna storage once, before workers open them.

    Raises:
        ConnectionError: The MLflow tracking server cannot be reached.
        optimize.StorageError: The Optuna storage URL is invalid or cannot be reached.
    """
    check_tracking_server()
    resume.initialise_tracking_store()
    optimize.open_storage(config.storage, config.heartbeat_seconds)


def _write_config(config, parent_run_id: str, folder: Path) -> Path:
    fields = dataclasses.asdict(config)
    fields.update(workers=1, parent_run_id=parent_run_id)
    path = folder / "worker-config.json"
    path.write_text(json.dumps(fields))
    return path


def _watch(processes: list[subprocess.Popen], study_name: str, config) -> None:
    """Wait for the workers, showing the study's finished trials as progress."""
    storage = optimize.open_storage(config.storage, config.heartbeat_seconds)
    study = optuna.load_study(study_name=study_name, storage=storage)
    with Progress() as progress:
        task = progress.add_task(f"trials ({len(processes)} workers)", total=config.n_trials)
        while any(process.poll() is None for process in processes):
            counts = optimize.trial_counts(study)
            progress.update(task, completed=counts["COMPLETE"] + counts["PRUNED"])
            time.sleep(POLL_SECONDS)


def run_worker_processes(config, study_name: str, parent_run_id: str) -> None:
    """Run ``config.workers`` worker processes on the prepared study and wait for all of them.

    Raises:
        WorkerError: At least one worker exited with a non-zero status.
    """
    with tempfile.TemporaryDirectory(prefix="research-workers-") as folder:
        config_path = _write_config(dataclasses.replace(config, study_name=study_name), parent_run_id, Path(folder))
        env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
        env.pop("MLFLOW_RUN_ID", None)
        log.info("Starting %d workers on study '%s'.", config.workers, study_name)
        processes = [
            subprocess.Popen(
                [sys.executable, "-m", "research.workers", str(config_path), str(index)], env={**env, optimize.WORKER_ENV: str(index)}
            )
            for index in range(config.workers)
        ]
        try:
            _watch(processes, study_name, config)
        finally:
            for process in processes:
                process.wait()

    failed = {index: process.returncode for index, process in enumerate(processes) if process.returncode != 0}
    if failed:
        raise WorkerError(f"Workers {sorted(failed)} of study '{study_name}' exited with status {sorted(set(failed.values()))}; see their log above.")
    log.info("All %d workers of study '%s' exited normally.", config.workers, study_name)


def main(argv: list[str] | None = None) -> int:
    """Entry point of one worker process: ``python -m research.workers CONFIG_JSON INDEX``."""
    from research.cli import USER_ERRORS
    from research.sweep import SweepConfig, run_sweep

    config_path, index = (argv or sys.argv[1:])[:2]
    logging.basicConfig(level=logging.INFO, format=f"[worker {index}] %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "urllib3", "PIL", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    config = SweepConfig(**json.loads(Path(config_path).read_text()))
    try:
        run_sweep(config)
    except USER_ERRORS as error:
        log.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
