"""Whole SVM sweeps in tmp dirs: the MLflow run tree, the Optuna study and the feature cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from research import sweep as sweep_module
from research.cli import main
from research.audit import Audit
from research.backbone import Weights
from research.sweep import SweepConfig, default_study_name, run_sweep
from tests.conftest import REPO_ROOT, require_scene_data


def _config(data_dir: Path, stores: dict, **overrides) -> SweepConfig:
    values = dict(
        data_dir=str(data_dir), study="svm", n_trials=3, backbone="vgg16", weights="none", image_size=32,
        storage=stores["storage"], cache_dir=stores["cache_dir"], experiment="test-sweep", num_workers=0, batch_size=8,
    )
    values.update(overrides)
    return SweepConfig(**values)


def _children(client: MlflowClient, parent_id: str) -> list:
    experiment_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def test_sweep_run_tree(presplit_tree: Path, isolated_stores: dict) -> None:
    result = run_sweep(_config(presplit_tree, isolated_stores))
    client = MlflowClient()
    parent = client.get_run(result["parent_run_id"])

    assert parent.info.status == "FINISHED"
    assert parent.data.params["backbone"] == "vgg16"
    assert parent.data.params["weights"] == "random"
    assert parent.data.tags["weights_random"] == "True"
    assert "RANDOM WEIGHTS" in parent.data.tags["mlflow.note.content"]
    assert 0.0 <= parent.data.metrics["test_accuracy"] <= 1.0
    assert parent.data.metrics["best_val_accuracy"] == result["best_val_accuracy"]
    assert "best_svm_C" in parent.data.params
    assert parent.data.metrics["n_test"] == 12

    batches = client.get_metric_history(parent.info.run_id, "extract_batch_seconds")
    assert sorted(m.step for m in batches) == list(range(len(batches)))
    assert len(batches) == 4  # 30 images in batches of 8
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "audit")}
    assert artifacts == {"audit/audit.json", "audit/audit.md"}
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"environment.json"}

    children = _children(client, parent.info.run_id)
    assert len(children) == 3
    for child in children:
        assert child.info.status == "FINISHED"
        assert float(child.data.params["svm_C"]) > 0
        assert {"val_accuracy", "train_accuracy", "fit_seconds"} <= set(child.data.metrics)
        assert child.data.tags["optuna.study_name"] == result["study_name"]
        assert child.info.run_name.startswith(f"trial-{int(child.data.tags['optuna.trial_number']):03d}")


def test_sweep_optuna_study(presplit_tree: Path, isolated_stores: dict) -> None:
    result = run_sweep(_config(presplit_tree, isolated_stores))

    study = optuna.load_study(study_name=result["study_name"], storage=isolated_stores["storage"])
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 3
    client = MlflowClient()
    for trial in trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        assert run.data.metrics["val_accuracy"] == pytest.approx(trial.value)
    assert 1e-5 <= study.best_params["svm_C"] <= 100


def test_rerun_hits_cache_and_resumes(presplit_tree: Path, isolated_stores: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    first = run_sweep(_config(presplit_tree, isolated_stores, n_trials=2))

    def backbone_must_not_run(*args, **kwargs):
        raise AssertionError("the backbone ran although the features are cached")

    monkeypatch.setattr(sweep_module, "create_backbone", backbone_must_not_run)
    second = run_sweep(_config(presplit_tree, isolated_stores, n_trials=3))

    assert first["cache_hit"] is False
    assert second["cache_hit"] is True
    assert second["study_name"] == first["study_name"]
    study = optuna.load_study(study_name=second["study_name"], storage=isolated_stores["storage"])
    assert len(study.trials) == 3


def test_cache_key_changes_with_image_size(presplit_tree: Path, isolated_stores: dict) -> None:
    run_sweep(_config(presplit_tree, isolated_stores, n_trials=1))
    other = run_sweep(_config(presplit_tree, isolated_stores, n_trials=1, image_size=48))

    assert other["cache_hit"] is False
    assert len(list(Path(isolated_stores["cache_dir"]).glob("*/manifest.json"))) == 2


def test_sweep_on_real_scene_slice(isolated_stores: dict) -> None:
    root = require_scene_data()

    result = run_sweep(_config(root, isolated_stores, limit_per_class=3, n_trials=2, backbone="resnet18"))

    parent = MlflowClient().get_run(result["parent_run_id"])
    assert parent.data.metrics["n_test"] == 45
    assert parent.data.metrics["n_train"] + parent.data.metrics["n_val"] == 45


def test_cli_unknown_study(presplit_tree: Path, isolated_stores: dict, caplog: pytest.LogCaptureFixture) -> None:
    code = main(["sweep", "--data-dir", str(presplit_tree), "--study", "nosuch", "--weights", "none"])

    assert code == 2
    assert "Study 'nosuch' not found" in caplog.text


def test_cli_help_states_units() -> None:
    result = subprocess.run([sys.executable, "-m", "research", "sweep", "--help"], capture_output=True, text=True, check=True)

    assert "pixels" in result.stdout
    assert "default: vgg16" in result.stdout


def test_mlflow_run_entry_point(presplit_tree: Path, isolated_stores: dict, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "mlflow", "run", str(REPO_ROOT), "-e", "sweep", "--env-manager", "local",
        "--experiment-name", "mlproject-test", "-P", "study=svm",
        "-P", f"data_dir={presplit_tree}", "-P", "weights=none", "-P", "image_size=32", "-P", "n_trials=2",
        "-P", f"storage={isolated_stores['storage']}", "-P", f"cache_dir={isolated_stores['cache_dir']}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    client = MlflowClient()
    experiment = client.get_experiment_by_name("mlproject-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"
    assert "test_accuracy" in parents[0].data.metrics
    assert len(runs) == 3


def test_resume_draws_new_params(presplit_tree: Path, isolated_stores: dict) -> None:
    first = run_sweep(_config(presplit_tree, isolated_stores, n_trials=2, study="svm"))
    run_sweep(_config(presplit_tree, isolated_stores, n_trials=4, study="svm"))

    study = optuna.load_study(study_name=first["study_name"], storage=isolated_stores["storage"])
    values = [trial.params["svm_C"] for trial in study.trials]
    assert len(values) == 4
    assert len(set(values)) == 4


def test_study_name_has_weights_digest() -> None:
    audit = Audit("root", "pre-split", [], {}, {}, {}, [], [], [], file_digests={"a.jpg": "0" * 64})
    config = SweepConfig(data_dir="root", backbone="resnet18")
    first = Weights("a.safetensors", "file", "a", "1" * 64)
    second = Weights("b.safetensors", "file", "b", "2" * 64)

    assert default_study_name(config, first, audit) != default_study_name(config, second, audit)
    assert "file11111111" in default_study_name(config, first, audit)
