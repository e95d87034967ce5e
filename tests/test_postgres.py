"""Two workers, as on two machines, on a PostgreSQL Optuna storage and an MLflow tracking server.

``.ci/run`` starts both servers on 127.0.0.1 and exports their URLs; without them the test is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from research.optimize import open_storage
from tests.test_resume import sweep_arguments
from tests.test_workers import check_shared_study

N_TRIALS = 6

pytestmark = pytest.mark.postgres


@pytest.fixture
def servers() -> dict[str, str]:
    postgres_url = os.environ.get("RESEARCH_TEST_POSTGRES_URL")
    mlflow_uri = os.environ.get("RESEARCH_TEST_MLFLOW_URI")
    if not postgres_url or not mlflow_uri:
        pytest.skip("RESEARCH_TEST_POSTGRES_URL and RESEARCH_TEST_MLFLOW_URI are not set; .ci/run starts both servers")
    return {"storage": postgres_url, "tracking_uri": mlflow_uri}


def test_two_workers_postgres_mlflow_server(presplit_tree: Path, servers: dict, tmp_path: Path) -> None:
    experiment = f"postgres-test-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": servers["tracking_uri"]}
    env.pop("MLFLOW_RUN_ID", None)

    workers = []
    for index in range(2):
        # Each worker gets its own working folder and feature cache, as on separate machines.
        folder = tmp_path / f"machine-{index}"
        folder.mkdir()
        stores = {"storage": servers["storage"], "cache_dir": str(folder / "cache")}
        arguments = sweep_arguments(presplit_tree, stores, N_TRIALS)
        arguments[arguments.index("resume-test")] = experiment
        command = [sys.executable, "-m", "research", *arguments, "--study-name", experiment]
        workers.append(subprocess.Popen(command, env=env, cwd=folder, stderr=subprocess.PIPE, text=True))
    errors = [worker.communicate(timeout=900)[1] for worker in workers]

    assert [worker.returncode for worker in workers] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    storage = open_storage(servers["storage"])
    assert experiment in optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=experiment, storage=storage)
    assert [t.state for t in study.trials].count(TrialState.COMPLETE) == N_TRIALS
    check_shared_study_on_server(storage, servers["tracking_uri"], experiment)


def check_shared_study_on_server(storage, tracking_uri: str, experiment: str) -> None:
    """Check the study and the run tree, then that both workers logged into one parent run."""
    check_shared_study(storage, tracking_uri, experiment, N_TRIALS, study_name=experiment)
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"
