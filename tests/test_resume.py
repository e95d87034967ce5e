"""Kill -9 a sweep in the middle of a trial, re-run the same command, and check the study and MLflow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.conftest import REPO_ROOT

HEARTBEAT_SECONDS = 1
N_TRIALS = 4
KILLED_TRIAL = 2

# Runs the CLI with LinearSVC.fit hanging on its third call (the third trial), after writing a
# marker file, so that the test can kill the process while that trial is RUNNING.
HANGING_SWEEP = """
import sys, time
from pathlib import Path
import sklearn.svm

marker = Path(sys.argv[1])
original_fit = sklearn.svm.LinearSVC.fit
calls = []

def hanging_fit(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        marker.write_text("trial running")
        time.sleep(600)
    return original_fit(self, *args, **kwargs)

sklearn.svm.LinearSVC.fit = hanging_fit
from research.cli import main
sys.exit(main(sys.argv[2:]))
"""


def sweep_arguments(data_dir: Path, stores: dict, n_trials: int) -> list[str]:
    """Return the ``research sweep`` arguments of a tiny random-weight SVM sweep on the stores."""
    return [
        "sweep", "--data-dir", str(data_dir), "--study", "svm", "--n-trials", str(n_trials),
        "--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--seeds", "1",
        "--num-workers", "0", "--batch-size", "16", "--storage", stores["storage"],
        "--cache-dir", stores["cache_dir"], "--experiment", "resume-test",
        "--heartbeat-seconds", str(HEARTBEAT_SECONDS),
    ]


def _environment(stores: dict) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": stores["tracking_uri"], "PYTHONPATH": str(REPO_ROOT)}
    env.pop("MLFLOW_RUN_ID", None)
    return env


def _wait_for(path: Path, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the sweep exited with {process.returncode} before the hanging trial"
        assert time.monotonic() < deadline, f"no hanging trial after {timeout} s"
        time.sleep(0.2)


def test_kill_mid_trial_then_resume(presplit_tree: Path, isolated_stores: dict, tmp_path: Path) -> None:
    env = _environment(isolated_stores)
    marker = tmp_path / "hanging-trial"
    script = tmp_path / "hanging_sweep.py"
    script.write_text(HANGING_SWEEP)
    arguments = sweep_arguments(presplit_tree, isolated_stores, N_TRIALS)

    first = subprocess.Popen([sys.executable, str(script), str(marker), *arguments], env=env, cwd=tmp_path)
    try:
        _wait_for(marker, first, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL

    study_name = optuna.get_all_study_names(isolated_stores["storage"])[0]
    study = optuna.load_study(study_name=study_name, storage=isolated_stores["storage"])
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.RUNNING]
    dead_run_id = study.trials[KILLED_TRIAL].user_attrs["mlflow_run_id"]
    client = MlflowClient(isolated_stores["tracking_uri"])
    assert client.get_run(dead_run_id).info.status == "RUNNING"

    # The heartbeat grace period is twice the interval; after it the dead trial is stale.
    time.sleep(2 * HEARTBEAT_SECONDS + 1)
    second = subprocess.run(
        [sys.executable, "-m", "research", *arguments], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert second.returncode == 0, second.stderr[-3000:]

    study = optuna.load_study(study_name=study_name, storage=isolated_stores["storage"])
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == N_TRIALS
    assert states.count(TrialState.FAIL) == 1
    assert TrialState.RUNNING not in states
    assert study.trials[KILLED_TRIAL].state == TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == KILLED_TRIAL]
    assert len(retries) == 1
    assert retries[0].state == TrialState.COMPLETE
    assert retries[0].params == study.trials[KILLED_TRIAL].params

    dead_run = client.get_run(dead_run_id)
    assert dead_run.info.status == "KILLED"
    assert dead_run.data.tags["optuna.trial_state"] == "FAIL"
    retry_run = client.get_run(retries[0].user_attrs["mlflow_run_id"])
    assert retry_run.info.status == "FINISHED"
    assert retry_run.data.tags["optuna.retry_of_trial"] == str(KILLED_TRIAL)

    experiment = client.get_experiment_by_name("resume-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["resume_count"] == "1"
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert len(children) == len(study.trials)
