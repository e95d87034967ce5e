"""Optuna objectives: one trial fits a classifier on cached training features and scores it on validation."""

from __future__ import annotations

import optuna
from mlflow.tracking import MlflowClient

from research import tracking
from research.classifiers import fit_linear_svm
from research.studies import StudyConfig

MLFLOW_RUN_ID_ATTR = "mlflow_run_id"


def _trial_run_name(trial_number: int, params: dict) -> str:
    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return f"trial-{trial_number:03d} {shown}"


def make_objective(client: MlflowClient, parent_id: str, experiment_id: str, study: StudyConfig, features, shared_params: dict, seed: int):
    """Build the Optuna objective: fit on train, score on validation, one MLflow child run per trial."""

    def objective(trial: optuna.Trial) -> float:
        params = study.suggest(trial)
        searched = {spec.name: params[spec.name] for spec in study.params}
        run = client.create_run(
            experiment_id,
            run_name=_trial_run_name(trial.number, searched),
            tags={
                "mlflow.parentRunId": parent_id,
                "optuna.study_name": trial.study.study_name,
                "optuna.trial_number": str(trial.number),
            },
        )
        run_id = run.info.run_id
        trial.set_user_attr(MLFLOW_RUN_ID_ATTR, run_id)

        try:
            tracking.log_params(client, run_id, {**shared_params, **params, "classifier": study.classifier, "layer": features.layer})
            result = fit_linear_svm(
                features.x_train, features.y_train, C=params["svm_C"],
                normalize=params.get("normalize", "standard"), max_iter=int(params.get("max_iter", 5000)), seed=seed,
            )
            val_accuracy = result.accuracy(features.x_val, features.y_val)
            tracking.log_metrics(client, run_id, {
                "val_accuracy": val_accuracy,
                "train_accuracy": result.accuracy(features.x_train, features.y_train),
                "fit_seconds": result.fit_seconds,
            })
            tracking.set_tags(client, run_id, {"svm_converged": result.converged})
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id, status="FINISHED")
        return val_accuracy

    return objective
