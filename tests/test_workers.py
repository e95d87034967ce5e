"""Several workers started at the same instant on fresh stores share one study without a failure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.test_resume import _environment, sweep_arguments

N_TRIALS = 8


def check_shared_study(storage, tracking_uri: str, experiment: str, n_trials: int, study_name: str = "") -> None:
    """Assert that the study (the only one by default) has exactly ``n_trials`` COMPLETE trials, each with one finished MLflow run."""
    study_name = study_name or optuna.get_all_study_names(storage)[0]
    study = optuna.load_study(study_name=study_name, storage=storage)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.FAIL) == 0
    assert states.count(TrialState.COMPLETE) == n_trials
    assert len(study.trials) == n_trials

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    numbers = sorted(int(r.data.tags["optuna.trial_number"]) for r in children)
    assert numbers == list(range(n_trials))
    assert {r.info.status for r in children} == {"FINISHED"}
    run_ids = {t.user_attrs["mlflow_run_id"] for t in study.trials}
    assert run_ids == {r.info.run_id for r in children}


def test_four_workers_fresh_sqlite(presplit_tree: Path, isolated_stores: dict, tmp_path: Path) -> None:
    arguments = sweep_arguments(presplit_tree, isolated_stores, N_TRIALS) + ["--workers", "4"]

    result = subprocess.run(
        [sys.executable, "-m", "research", *arguments],
        env=_environment(isolated_stores), cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "All 4 workers" in result.stderr
    check_shared_study(isolated_stores["storage"], isolated_stores["tracking_uri"], "resume-test", N_TRIALS)
    client = MlflowClient(isolated_stores["tracking_uri"])
    parents = client.search_runs(
        [client.get_experiment_by_name("resume-test").experiment_id], filter_string="tags.`sweep.role` = 'parent'",
    )
    assert len(parents) == 1
    assert "test_accuracy" in parents[0].data.metrics


@pytest.mark.slow
def test_four_copies_fresh_journal(presplit_tree: Path, isolated_stores: dict, tmp_path: Path) -> None:
    journal = tmp_path / "optuna-journal.log"
    stores = {**isolated_stores, "storage": str(journal)}
    arguments = sweep_arguments(presplit_tree, stores, N_TRIALS)
    env = _environment(stores)

    copies = [
        subprocess.Popen([sys.executable, "-m", "research", *arguments], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    errors = [copy.communicate(timeout=900)[1] for copy in copies]

    assert [copy.returncode for copy in copies] == [0, 0, 0, 0], errors[0][-3000:]
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    check_shared_study(storage, stores["tracking_uri"], "resume-test", N_TRIALS)
