"""Read an MLflow experiment into plain records for the report: sweeps, their trials, command runs.

A sweep is a finished top-level run with a ``study`` param. Its trials are the child runs that
carry the same ``optuna.study_name`` tag, from this parent and from earlier parents of the same
study (a re-run resumes the Optuna study and only logs its new trials). Runs are sorted by start
time, then id, so two reads of the same store give the same order.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
STUDY_TAG = "optuna.study_name"
TRIAL_TAG = "optuna.trial_number"
COMMAND_TAG = "research.command"
PAGE_SIZE = 1000
# A pruned trial's run ends KILLED and a failed one FAILED.
RUN_STATUS_TO_TRIAL_STATE = {"FINISHED": "COMPLETE", "KILLED": "PRUNED", "FAILED": "FAIL"}


class ReportError(ValueError):
    """The runs needed for a report are missing; the message names the experiment and the fix."""


@dataclass(frozen=True)
class RunRecord:
    """The params, last metric values and tags of one MLflow run."""

    run_id: str
    name: str
    status: str
    start_time: int
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]

    @property
    def weights_random(self) -> bool:
        return self.tags.get("weights_random") == "True"

    @property
    def parent_id(self) -> str | None:
        return self.tags.get(PARENT_TAG)

    @property
    def trial_number(self) -> int | None:
        value = self.tags.get(TRIAL_TAG)
        return int(value) if value is not None and value.lstrip("-").isdigit() else None

    def param(self, key: str, default: str = "?") -> str:
        """Return a param, preferring ``resolved_<key>``.

        Under ``mlflow run`` the parent run already contains the raw ``-P`` text (``weights=none``),
        so the sweep logs the resolved value (``random``) as ``resolved_<key>``.
        """
        return self.params.get(f"resolved_{key}", self.params.get(key, default))

    def param_float(self, key: str) -> float | None:
        """Return a param as a float, or None when it is absent or not a number."""
        try:
            return float(self.param(key))
        except ValueError:
            return None


@dataclass
class Sweep:
    """A finished parent run and every finished trial of its Optuna study."""

    parent: RunRecord
    trials: list[RunRecord] = field(default_factory=list)
    # Finished parent runs of the same Optuna study before ``parent``, newest first (runs resumed by `mlflow run`).
    earlier: list[RunRecord] = field(default_factory=list)

    def variant_run(self, prefix: str) -> RunRecord:
        """Return the newest parent run that recorded the extraction of variant ``prefix``, else ``parent``.

        A resumed sweep extracts only what its cache lacks, so a variant's speed and activation
        statistics may sit on an earlier parent run of the study.
        """
        for run in (self.parent, *self.earlier):
            if f"{prefix}_images_per_second" in run.metrics:
                return run
        return self.parent

    @property
    def study(self) -> str:
        return self.parent.params.get("study", "")

    @property
    def study_name(self) -> str:
        return self.parent.tags.get(STUDY_TAG) or self.parent.params.get("study_name", "")

    @property
    def classifier(self) -> str:
        return self.parent.params.get("classifier", "")

    @property
    def weights_random(self) -> bool:
        return self.parent.weights_random or any(trial.weights_random for trial in self.trials)


def objective_value(trial: RunRecord) -> float | None:
    """Return the value a trial gave Optuna: the head's accuracy at its best epoch, else ``val_accuracy``.

    A head whose loss diverged before its first validation logged neither and gave Optuna 0.
    """
    value = trial.metrics.get("val_accuracy_at_best_epoch", trial.metrics.get("val_accuracy"))
    if value is None and trial.tags.get("head_diverged") == "True":
        return 0.0
    return value


def best_trial(sweep: Sweep) -> RunRecord | None:
    """Return the trial the parent names as best, else the one with the highest objective value."""
    number = sweep.parent.params.get("best_trial_number")
    for trial in sweep.trials:
        if number is not None and str(trial.trial_number) == number:
            return trial
    scored = [trial for trial in sweep.trials if objective_value(trial) is not None]
    return max(scored, key=lambda trial: (objective_value(trial), -trial.trial_number), default=None)


def _record(run) -> RunRecord:
    return RunRecord(
        run_id=run.info.run_id,
        name=run.info.run_name or "",
        status=run.info.status,
        start_time=int(run.info.start_time or 0),
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        tags=dict(run.data.tags),
    )


def experiment_names(experiment: str) -> list[str]:
    """Split ``a,b`` into experiment names; a report may cover studies tracked in several experiments."""
    names = [name.strip() for name in experiment.split(",") if name.strip()]
    if not names:
        raise ReportError(f"experiment={experiment!r} is invalid: give an MLflow experiment name, or several separated by commas.")
    return names


class RunStore:
    """The runs of one or more MLflow experiments, read once, with artifact and metric-history access."""

    def __init__(self, client: MlflowClient, experiment: str) -> None:
        self.client = client
        self.experiment = experiment
        self.experiment_ids = []
        for name in experiment_names(experiment):
            found = client.get_experiment_by_name(name)
            if found is None:
                names = sorted(e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY))
                raise ReportError(
                    f"MLflow experiment '{name}' not found at the current tracking URI. Known experiments: "
                    f"{', '.join(names) or 'none'}. Pass --experiment NAME, or set MLFLOW_TRACKING_URI to the store of the runs."
                )
            self.experiment_ids.append(found.experiment_id)
        self.runs = self._search()
        self._downloads = tempfile.TemporaryDirectory(prefix="research-report-")

    def _search(self) -> list[RunRecord]:
        runs, token = [], None
        while True:
            page = self.client.search_runs(self.experiment_ids, max_results=PAGE_SIZE, page_token=token)
            runs.extend(_record(run) for run in page)
            token = page.token
            if not token:
                break
        return sorted(runs, key=lambda run: (run.start_time, run.run_id))

    def close(self) -> None:
        self._downloads.cleanup()

    def sweeps(self) -> list[Sweep]:
        """Return the finished sweeps, the latest parent of each Optuna study only.

        Raises:
            ReportError: The experiment has no finished sweep.
        """
        parents = [run for run in self.runs if run.parent_id is None and "study" in run.params and run.status == "FINISHED"]
        if not parents:
            raise ReportError(
                f"MLflow experiment '{self.experiment}' has no finished sweep (a top-level run with a 'study' param and "
                "status FINISHED). Run `research sweep` or `mlflow run . -e sweep --experiment-name NAME` first and let it "
                "finish, or pass the experiment that holds your sweeps (`mlflow run` without --experiment-name uses 'Default')."
            )
        by_study: dict[str, list[RunRecord]] = {}
        for parent in parents:
            by_study.setdefault(parent.tags.get(STUDY_TAG) or parent.run_id, []).append(parent)
        sweeps = [Sweep(runs[-1], self._trials(runs[-1]), runs[-2::-1]) for runs in by_study.values()]
        return sorted(sweeps, key=lambda sweep: (sweep.parent.start_time, sweep.parent.run_id))

    def _trials(self, parent: RunRecord) -> list[RunRecord]:
        """Return the finished trials of a parent's Optuna study, the latest run of each trial number."""
        study_name = parent.tags.get(STUDY_TAG)
        by_number: dict[int, RunRecord] = {}
        for run in self.runs:
            if run.status != "FINISHED" or run.trial_number is None:
                continue
            same_study = study_name is not None and run.tags.get(STUDY_TAG) == study_name
            if same_study or run.parent_id == parent.run_id:
                by_number[run.trial_number] = run
        return [by_number[number] for number in sorted(by_number)]

    def command_runs(self, command: str) -> list[RunRecord]:
        """Return the finished runs of a ``research`` command (``predict``, ``featuremaps``), oldest first."""
        return [run for run in self.runs if run.tags.get(COMMAND_TAG) == command and run.status == "FINISHED"]

    def trial_states(self, study_name: str) -> dict[str, int]:
        """Count the trials of an Optuna study per state (COMPLETE, PRUNED, FAIL, RUNNING), the latest run of each."""
        latest: dict[int, RunRecord] = {}
        for run in self.runs:
            if run.tags.get(STUDY_TAG) == study_name and run.trial_number is not None:
                latest[run.trial_number] = run
        counts: dict[str, int] = {}
        for run in latest.values():
            # Runs logged before the sweep tagged trial states carry only the MLflow run status.
            state = run.tags.get("optuna.trial_state", RUN_STATUS_TO_TRIAL_STATE.get(run.status, run.status))
            counts[state] = counts.get(state, 0) + 1
        return dict(sorted(counts.items()))

    def children(self, parent_id: str) -> list[RunRecord]:
        """Return the finished direct child runs of a run."""
        return [run for run in self.runs if run.parent_id == parent_id and run.status == "FINISHED"]

    def artifact_path(self, run_id: str, path: str) -> Path | None:
        """Download one artifact file of a run and return its local path, or None when it is absent."""
        folder, _, name = path.rpartition("/")
        try:
            listed = {item.path for item in self.client.list_artifacts(run_id, folder or None)}
        except (MlflowException, OSError) as error:
            log.warning("Listing the artifacts of run %s under '%s' failed: %s", run_id, folder, error)
            return None
        if path not in listed:
            return None
        target = Path(self._downloads.name) / run_id
        target.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, path, str(target)))

    def artifact_json(self, run_id: str, path: str) -> dict | None:
        """Return a JSON artifact of a run, or None when it is absent."""
        local = self.artifact_path(run_id, path)
        return json.loads(local.read_text()) if local is not None else None

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """Return a metric's (step, value) pairs sorted by step; the last value logged wins on a step."""
        values: dict[int, float] = {}
        for metric in sorted(self.client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
            values[int(metric.step)] = float(metric.value)
        return sorted(values.items())
