"""The sweep's MLflow parent run across re-runs and workers: reused, linked or shared.

* ``research sweep`` reuses the latest parent run of the same Optuna study (tag
  ``optuna.study_name``), so the trials of a resumed study stay under one parent. The reused run is
  set RUNNING again and its tag ``resume_count`` goes up by one.
* Under ``mlflow run`` MLflow creates the parent run itself; a previous parent of the same study is
  linked from it with the tag ``resumed_from``, and ended as KILLED if it was left RUNNING.
* A worker process started by ``research sweep --workers N`` logs into the parent run of the
  process that started it and never ends that run.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager, nullcontext

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from research import tracking
from research.optimize import sqlite_path, store_lock

log = logging.getLogger(__name__)

PARENT_ROLE_TAG = "sweep.role"


def tracking_store_lock():
    """Return a lock on the local SQLite tracking database, or a no-op for other tracking stores."""
    database = sqlite_path(mlflow.get_tracking_uri())
    return store_lock(database) if database is not None else nullcontext()


def initialise_tracking_store() -> None:
    """Create or migrate the MLflow tracking database once, before workers use it.

    Several processes that open a fresh SQLite tracking database at the same time each run
    MLflow's schema migrations and fail with "duplicate column name"; the lock makes one of them
    do it while the others wait.
    """
    database = sqlite_path(mlflow.get_tracking_uri())
    if database is not None and not database.parent.is_dir():
        raise FileNotFoundError(
            f"MLflow tracking database {database}: folder {database.parent} does not exist. Create it or set "
            "MLFLOW_TRACKING_URI to another sqlite:/// path or to an MLflow server URL."
        )
    with tracking_store_lock():
        MlflowClient().search_experiments(max_results=1)


def previous_parent_run(client: MlflowClient, experiment_id: str, study_name: str, exclude: str = "") -> Run | None:
    """Return the most recent sweep parent run of ``study_name`` in the experiment, or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`optuna.study_name` = '{study_name}' and tags.`{PARENT_ROLE_TAG}` = 'parent'",
        order_by=["attributes.start_time DESC"],
        max_results=10,
    )
    return next((run for run in runs if run.info.run_id != exclude), None)


def _link_previous(client: MlflowClient, run_id: str, study_name: str) -> None:
    """Tag an ``mlflow run`` parent with the previous parent of its study and end that one if left RUNNING."""
    experiment_id = client.get_run(run_id).info.experiment_id
    previous = previous_parent_run(client, experiment_id, study_name, exclude=run_id)
    tracking.set_tags(client, run_id, {"optuna.study_name": study_name, PARENT_ROLE_TAG: "parent"})
    if previous is None:
        return
    tracking.set_tags(client, run_id, {"resumed_from": previous.info.run_id})
    log.info("MLflow parent run %s resumes study '%s' of run %s.", run_id, study_name, previous.info.run_id)
    if previous.info.status == "RUNNING":
        # NOTE: a previous parent that is still alive (another `mlflow run` worker of the same
        # study) is ended too; its process keeps logging into it, which MLflow allows.
        client.set_terminated(previous.info.run_id, status="KILLED")


def _create_first_parent(client: MlflowClient, experiment_id: str, run_name: str, study_name: str) -> str:
    """Create the study's parent run; when workers race to do so, all keep the oldest one.

    Workers on other machines do not share the local lock, so two of them can each create a parent.
    Each then lists the parents of the study and keeps the oldest (by start time, then run id).
    A worker whose own run lost deletes it.
    """
    tags = {"optuna.study_name": study_name, PARENT_ROLE_TAG: "parent"}
    own_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`optuna.study_name` = '{study_name}' and tags.`{PARENT_ROLE_TAG}` = 'parent'",
        max_results=100,
    )
    oldest = min(runs, key=lambda run: (run.info.start_time, run.info.run_id))
    if oldest.info.run_id != own_id:
        client.delete_run(own_id)
        log.info("Parent run %s of study '%s' was created by another worker at the same time; using it.", oldest.info.run_id, study_name)
    return oldest.info.run_id


def _claim_parent(client: MlflowClient, experiment_name: str, run_name: str, study_name: str) -> str:
    """Reuse the latest parent run of the study, or create one; serialised on a local SQLite store."""
    with tracking_store_lock():
        experiment_id = tracking.resolve_experiment(client, experiment_name)
        previous = previous_parent_run(client, experiment_id, study_name)
        if previous is None:
            return _create_first_parent(client, experiment_id, run_name, study_name)

    run_id = previous.info.run_id
    count = int(previous.data.tags.get("resume_count", "0")) + 1
    client.update_run(run_id, status="RUNNING")
    tracking.set_tags(client, run_id, {"resume_count": count, "resumed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    log.info("Resuming MLflow parent run %s of study '%s' (previous status %s).", run_id, study_name, previous.info.status)
    return run_id


@contextmanager
def sweep_parent_run(client: MlflowClient, experiment_name: str, run_name: str, study_name: str, worker_of: str = ""):
    """Yield the parent run id of a sweep on ``study_name``.

    Args:
        client: MLflow client.
        experiment_name: Experiment of a new parent run, when not under ``mlflow run``.
        run_name: Name of a new parent run.
        study_name: Optuna study name; parent runs carry it in the tag ``optuna.study_name``.
        worker_of: Parent run id of the process that started this worker; empty otherwise.

    The run ends FINISHED, FAILED on an exception or KILLED on Ctrl-C, except in a worker and
    under ``mlflow run`` (where MLflow ends it).
    """
    if worker_of:
        yield worker_of
        return

    if os.environ.get("MLFLOW_RUN_ID"):
        with tracking.parent_run(client, experiment_name, run_name) as run_id:
            _link_previous(client, run_id, study_name)
            yield run_id
        return

    run_id = _claim_parent(client, experiment_name, run_name, study_name)
    log.info("MLflow parent run %s (tracking URI %s).", run_id, tracking.redact_url(mlflow.get_tracking_uri()))
    with tracking.terminate_on_exit(client, run_id):
        yield run_id

