"""Optuna study creation and resumption on its storage (SQLite, PostgreSQL or a journal file).

RDB storages (``sqlite:///``, ``postgresql://``, ``mysql://``) run Optuna's heartbeat: while a
trial runs, its worker records a heartbeat every ``heartbeat_seconds``. Before it asks for a new
trial, any worker marks a trial whose last heartbeat is older than twice that interval as FAIL,
enqueues a retry with the same params (``RetryHeartbeatStaleTrialCallback``, the Optuna 5 name of
``RetryFailedTrialCallback``) and ends the trial's MLflow run as KILLED.

A journal file (a plain path such as ``optuna-journal.log``, or ``journal://PATH``) suits parallel workers
on one machine or on a shared file system. NOTE: Optuna 5.1 has no heartbeat for journal storage,
so a trial of a killed worker stays RUNNING there and is not retried; use an RDB storage where
workers may die.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import sqlalchemy.exc
from filelock import FileLock
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from rich.progress import Progress

from research import tracking
from research.studies import StudyConfig, make_pruner, make_sampler

log = logging.getLogger(__name__)

# Index of a worker process started by ``research sweep --workers N``, set in its environment.
WORKER_ENV = "RESEARCH_WORKER_INDEX"

JOURNAL_PREFIX = "journal://"
RDB_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg", "postgresql+psycopg2", "mysql", "mysql+pymysql")
DONE_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
# A trial whose worker died is retried at most this many times. A trial that kills its worker
# every time (out of memory, say) then stays FAIL instead of looping.
MAX_RETRY = 3
# Same user attribute as research.objectives stores on each trial.
MLFLOW_RUN_ID_ATTR = "mlflow_run_id"
CONNECT_TIMEOUT_SECONDS = 10
# Every objective returns the validation accuracy (at the best epoch for the MLP head).
OBJECTIVE_METRIC = "val_accuracy"


class StorageError(ValueError):
    """Invalid or unreachable Optuna storage URL; the message names the URL and the fix."""


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def sqlite_path(url: str) -> Path | None:
    """Return the database file of a ``sqlite:///`` URL, or None for other URLs and in-memory SQLite."""
    if not url.startswith("sqlite:///") or url in ("sqlite://", "sqlite:///:memory:"):
        return None
    return Path(url[len("sqlite:///") :])


def journal_path(url: str) -> Path | None:
    """Return the journal file of a storage value, ``journal://PATH`` or a plain PATH; None for other URLs."""
    if url.startswith(JOURNAL_PREFIX):
        return Path(url[len(JOURNAL_PREFIX) :])
    if url and "://" not in url and not url.startswith("sqlite:"):
        return Path(url)
    return None


def store_lock(path: Path) -> FileLock:
    """Return the lock that serialises the creation of the store file ``path`` by local workers."""
    return FileLock(str(path) + ".lock", timeout=120)


def _on_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Retry a trial whose worker stopped sending heartbeats, and end its MLflow run as KILLED."""
    log.warning("Trial %d of study '%s' lost its worker (no heartbeat); it is marked FAIL and retried.", trial.number, study.study_name)
    RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)
    end_dead_run(MlflowClient(), trial)


def end_dead_run(client: MlflowClient, trial: FrozenTrial) -> bool:
    """End the MLflow run of a FAIL trial as KILLED if it is still RUNNING; return whether it was.

    The run of a worker killed mid-trial is never ended by that worker, so whichever worker finds
    the dead trial ends it.
    """
    run_id = trial.user_attrs.get(MLFLOW_RUN_ID_ATTR)
    if not run_id:
        return False
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        log.warning("MLflow run %s of failed trial %d cannot be read (%s); it is left as it is.", run_id, trial.number, error)
        return False
    if run.info.status != "RUNNING":
        return False
    tracking.set_tags(client, run_id, {"optuna.trial_state": "FAIL", "optuna.failure": "worker died (no heartbeat)"})
    client.set_terminated(run_id, status="KILLED")
    log.info("MLflow run %s of dead trial %d ended as KILLED.", run_id, trial.number)
    return True


def _rdb_storage(url: str, heartbeat_seconds: int) -> RDBStorage:
    engine_kwargs = {}
    if _scheme(url).startswith("postgresql"):
        engine_kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_SECONDS}, "pool_pre_ping": True}
    elif _scheme(url) == "sqlite":
        # Wait for another worker's write lock instead of failing at once with "database is locked".
        engine_kwargs = {"connect_args": {"timeout": 60}}
    return RDBStorage(
        url,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=heartbeat_seconds,
        grace_period=2 * heartbeat_seconds,
        heartbeat_stale_trial_callback=_on_stale_trial,
    )


def _rdb_storage_with_retry(url: str, heartbeat_seconds: int, attempts: int = 5) -> BaseStorage:
    """Open a server database, retrying when another worker is creating Optuna's tables at the same moment.

    NOTE: when two processes create the tables of a fresh PostgreSQL database at once, one of them
    fails with a unique-constraint violation on ``pg_type``. A retry then finds the tables made.
    """
    for attempt in range(1, attempts + 1):
        try:
            return _rdb_storage(url, heartbeat_seconds)
        except sqlalchemy.exc.IntegrityError as error:
            if attempt == attempts:
                raise
            log.info("Optuna storage tables are being created by another worker (%s); retry %d of %d.", type(error.orig).__name__, attempt, attempts - 1)
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


def open_storage(url: str, heartbeat_seconds: int = 60) -> BaseStorage:
    """Connect to the Optuna storage, creating its tables or file on first use.

    Args:
        url: ``sqlite:///PATH``, ``postgresql://USER:PASSWORD@HOST:PORT/DB``, ``mysql://...`` or
            a journal file given as a plain PATH or as ``journal://PATH``.
        heartbeat_seconds: Interval of the trial heartbeat on RDB storages.

    Raises:
        StorageError: Unknown scheme, a folder that does not exist, or a server that cannot be reached.
    """
    redacted_url = tracking.redact_url(url)
    if heartbeat_seconds < 1:
        raise StorageError(f"heartbeat_seconds={heartbeat_seconds} is invalid; use a whole number of seconds of at least 1 (default 60).")

    journal = journal_path(url)
    if journal is not None:
        if not journal.parent.is_dir():
            raise StorageError(f"Optuna storage {redacted_url}: folder {journal.parent} does not exist. Create it or pass another journal path.")
        return JournalStorage(JournalFileBackend(str(journal)))

    if _scheme(url) not in RDB_SCHEMES:
        raise StorageError(
            f"Optuna storage {redacted_url!r} is invalid: use sqlite:///PATH, postgresql://USER:PASSWORD@HOST:PORT/DB "
            "or the PATH of a journal file."
        )
    database = sqlite_path(url)
    if database is not None and not database.parent.is_dir():
        raise StorageError(f"Optuna storage {redacted_url}: folder {database.parent} does not exist. Create it or pass another sqlite:/// path.")

    try:
        if database is None:
            return _rdb_storage_with_retry(url, heartbeat_seconds)
        with store_lock(database):
            return _rdb_storage(url, heartbeat_seconds)
    except ImportError as error:
        raise StorageError(
            f"Optuna storage {redacted_url}: the database driver is not installed ({error.__cause__ or error}). "
            "Install it with pip install 'psycopg[binary]' for postgresql:// or pymysql for mysql+pymysql://."
        ) from error
    except sqlalchemy.exc.SQLAlchemyError as error:
        reason = str(error).strip().splitlines()[0]
        raise StorageError(
            f"Optuna storage {redacted_url} cannot be reached: {reason}. Check that the database server is running "
            "and that host, port, user, password and database name are right."
        ) from error


def prepare_study(config, study_config: StudyConfig, study_name: str) -> optuna.Study:
    """Create the study, or load it to resume it, and clean up after dead workers.

    Trials whose heartbeat is stale are marked FAIL and retried, and every FAIL trial whose MLflow
    run is still RUNNING gets that run ended as KILLED.
    """
    storage = open_storage(config.storage, config.heartbeat_seconds)
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        sampler=make_sampler(study_config, config.seed),
        pruner=make_pruner(study_config),
        direction=study_config.direction,
        load_if_exists=True,
    )
    # A resumed study or a second worker must not replay the first draws of the same seed, so the
    # sampler's seed is offset by the trials already stored (and by the process for parallel workers).
    offset = len(study.get_trials(deepcopy=False))
    if os.environ.get(WORKER_ENV):
        offset += 1000 * int(os.environ[WORKER_ENV])
    study.sampler = make_sampler(study_config, config.seed + offset)
    # optuna-dashboard shows this name in place of "Objective 0"; it matches the MLflow metric.
    study.set_metric_names([OBJECTIVE_METRIC])
    optuna.storages.fail_stale_trials(study)
    client = MlflowClient()
    ended = sum(end_dead_run(client, trial) for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
    if ended:
        log.info("Study '%s': %d MLflow runs of dead trials ended as KILLED.", study_name, ended)
    return study


def _has_combination(trial: FrozenTrial, combination: dict) -> bool:
    """Tell whether a trial drew, or was enqueued with, every value of ``combination``."""
    params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
    return all(params.get(name) == value for name, value in combination.items())


def enqueue_cover(study: optuna.Study, study_config: StudyConfig) -> int:
    """Enqueue one trial per ``cover`` combination that no trial of the study has yet; return how many.

    Failed trials do not count, so a combination whose trial failed is enqueued again on resume.
    NOTE: two processes that start the same new study at the same moment may both enqueue a
    combination. ``--workers N`` avoids it because only its first process calls this.
    """
    combinations = study_config.cover_combinations() if study_config.cover else []
    trials = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.FAIL]
    missing = [combo for combo in combinations if not any(_has_combination(t, combo) for t in trials)]
    for combo in missing:
        study.enqueue_trial(combo, user_attrs={"cover": True})
    if missing:
        log.info("Study '%s': %d of %d %s combinations enqueued first.", study.study_name, len(missing), len(combinations), " x ".join(study_config.cover))
    return len(missing)


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """Count the study's trials per state name (COMPLETE, PRUNED, FAIL, RUNNING, WAITING)."""
    counts = {state.name: 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] += 1
    return counts


class TrialBudget:
    """Stops a worker once finished trials plus trials running elsewhere reach ``n_trials``.

    Optuna's ``MaxTrialsCallback`` counts finished trials only, so N workers overshoot by up to
    N - 1 trials. Here a worker checks the count before each new trial, and a file lock keeps that
    check and Optuna's ``ask`` together, so workers on one machine never start a trial too many.
    NOTE: workers on different machines do not share the lock. Two of them that check within the
    same few milliseconds can still start one surplus trial each.
    """

    def __init__(self, study: optuna.Study, storage_url: str, n_trials: int) -> None:
        digest = hashlib.sha256(f"{storage_url}\n{study.study_name}".encode()).hexdigest()[:16]
        self.n_trials = n_trials
        self.lock = FileLock(str(Path(tempfile.gettempdir()) / f"research-trial-budget-{digest}.lock"), timeout=600)

    def claim(self, study: optuna.Study) -> bool:
        """Take the lock and return True if another trial fits the budget; the next trial start releases it."""
        self.lock.acquire()
        counts = trial_counts(study)
        claimed = counts["COMPLETE"] + counts["PRUNED"] + counts["RUNNING"]
        if claimed < self.n_trials:
            return True
        self.lock.release(force=True)
        if counts["RUNNING"]:
            log.info(
                "Study '%s': %d trials finished and %d running in other workers reach n_trials=%d; this worker stops.",
                study.study_name, counts["COMPLETE"] + counts["PRUNED"], counts["RUNNING"], self.n_trials,
            )
        return False

    def after_trial(self, study: optuna.Study, _trial: FrozenTrial) -> None:
        """Optuna callback: stop the worker unless another trial fits the budget."""
        if not self.claim(study):
            study.stop()

    def wrap(self, objective: Callable[[optuna.Trial], float]) -> Callable[[optuna.Trial], float]:
        """Return the objective with the budget lock released as soon as Optuna has created the trial."""

        def run(trial: optuna.Trial) -> float:
            self.lock.release(force=True)
            return objective(trial)

        return run


def _tag_retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna callback: tag the MLflow run of a retried trial with the trial it repeats."""
    retried = trial.system_attrs.get("failed_trial")
    run_id = trial.user_attrs.get(MLFLOW_RUN_ID_ATTR)
    if retried is None or not run_id:
        return
    tracking.set_tags(MlflowClient(), run_id, {"optuna.retry_of_trial": retried})


def run_study(config, study_config: StudyConfig, study_name: str, objective, show_progress: bool = True) -> optuna.Study:
    """Create or resume the Optuna study and run trials until ``n_trials`` are finished.

    Several processes may run this on the same study at once: each stops when the finished and
    running trials together reach ``n_trials``.
    """
    study = prepare_study(config, study_config, study_name)
    counts = trial_counts(study)
    done = counts["COMPLETE"] + counts["PRUNED"]
    log.info(
        "Optuna study '%s' (%s): %d trials finished, %d failed, %d running, %d to run.",
        study_name, tracking.redact_url(config.storage), done, counts["FAIL"], counts["RUNNING"], max(config.n_trials - done, 0),
    )

    budget = TrialBudget(study, config.storage, config.n_trials)
    if not budget.claim(study):
        return study

    try:
        with Progress(disable=not show_progress) as progress:
            task = progress.add_task("trials", total=max(config.n_trials - done, 0))
            study.optimize(
                budget.wrap(objective),
                callbacks=[_tag_retry, lambda _study, _trial: progress.advance(task), budget.after_trial],
            )
    finally:
        budget.lock.release(force=True)
    return study
