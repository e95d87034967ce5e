"""Optuna objectives: one trial fits a classifier on cached training features and scores it on validation.

Each trial is one MLflow child run of the sweep's parent run, tagged ``optuna.study_name``,
``optuna.trial_number`` and, once it ends, ``optuna.trial_state`` (COMPLETE, PRUNED or FAIL). A
pruned trial's run ends with status KILLED, a failed one with FAILED.

The head's run logs ``train_loss``, ``val_loss``, ``train_accuracy``, ``val_accuracy`` with
step = epoch, ``train_batch_seconds`` with step = global batch index, ``epoch_seconds`` with step =
epoch, and the scalars ``best_epoch``, ``val_accuracy_at_best_epoch`` (the trial's Optuna value,
since the weights of the best epoch are restored), ``val_loss_stability``, ``rss_bytes`` and the
param ``stable``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import optuna
import torch
from mlflow.tracking import MlflowClient

from research import tracking
from research.classifiers import fit_linear_svm
from research.head import HeadConfig, HeadHistory, train_head
from research.studies import StudyConfig
from research.variants import FeatureProvider, Features, Variant

MLFLOW_RUN_ID_ATTR = "mlflow_run_id"
BEST_EPOCH_ATTR = "best_epoch"


@dataclass(frozen=True)
class TrainSettings:
    """Training settings of the classifiers: device, bf16 autocast for the head, seed."""

    device: torch.device
    bf16: bool
    seed: int


HEAD_ONLY = frozenset({"fc_width", "dropout", "learning_rate", "max_epochs", "patience", "batch_size", "optimizer", "head_normalize", "weight_decay"})
SVM_ONLY = frozenset({"svm_C", "normalize", "max_iter"})


def classifier_params(params: dict) -> dict:
    """Drop the fixed params of the other classifier, so a run lists only what its classifier used."""
    classifier = params["classifier"]
    if classifier == "head":
        return {k: v for k, v in params.items() if k not in SVM_ONLY}
    keep = {"fc_width"} if classifier == "fc_width_svm" else set()
    return {k: v for k, v in params.items() if k not in HEAD_ONLY or k in keep}


def _trial_run_name(trial_number: int, params: dict) -> str:
    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return f"trial-{trial_number:03d} {shown}"


def head_config(params: dict) -> HeadConfig:
    """Build the head's configuration from a trial's params (searched and fixed)."""
    fields = HeadConfig.__dataclass_fields__
    values = {k: params[k] for k in fields if k in params and k != "normalize"}
    # ``normalize`` belongs to the SVM (standard or l2); the head's input scaling is ``head_normalize``.
    if "head_normalize" in params:
        values["normalize"] = params["head_normalize"]
    return HeadConfig(**values)


def fit_svm_trial(client: MlflowClient, run_id: str, params: dict, features: Features, seed: int) -> float:
    """Fit the linear SVM on training features, log its metrics and return the validation accuracy."""
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
    return val_accuracy


def log_head_history(client: MlflowClient, run_id: str, history: HeadHistory) -> None:
    """Log the head's curves in a few batched calls, and its stability measure."""
    tracking.log_curves(client, run_id, {
        "train_loss": history.train_loss,
        "val_loss": history.val_loss,
        "train_accuracy": history.train_accuracy,
        "val_accuracy": history.val_accuracy,
        "epoch_seconds": history.epoch_seconds,
        "train_batch_seconds": history.batch_seconds,
    })
    scalars = {
        "epochs_trained": history.epochs,
        "best_epoch": history.best_epoch,
        "rss_bytes": history.rss_bytes,
        "head_parameters": history.parameter_count,
    }
    stability = history.val_loss_stability()
    if math.isfinite(stability):
        scalars["val_loss_stability"] = stability
    if history.val_accuracy and history.best_epoch >= 0:
        scalars["val_accuracy_at_best_epoch"] = history.val_accuracy[history.best_epoch]
    tracking.log_metrics(client, run_id, scalars)
    tracking.log_params(client, run_id, {"stable": history.is_stable()})
    tracking.set_tags(client, run_id, {"head_diverged": history.diverged})


def fit_head_trial(client: MlflowClient, run_id: str, trial: optuna.Trial, params: dict, features: Features, settings: TrainSettings) -> float:
    """Train the head, reporting validation accuracy to Optuna each epoch; return it at the best epoch.

    Raises:
        optuna.TrialPruned: The pruner stopped the trial; its curves are logged first.
    """
    history = HeadHistory()
    n_classes = int(max(features.y_train.max(), features.y_val.max())) + 1

    def report(epoch: int, current: HeadHistory) -> None:
        trial.report(current.val_accuracy[-1], epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} with validation accuracy {current.val_accuracy[-1]:.4f}")

    try:
        train_head(
            features.x_train, features.y_train, features.x_val, features.y_val, head_config(params),
            n_classes=n_classes, seed=settings.seed, device=settings.device, bf16=settings.bf16,
            history=history, on_epoch=report,
        )
    finally:
        log_head_history(client, run_id, history)
        trial.set_user_attr(BEST_EPOCH_ATTR, history.best_epoch)
    if not history.val_accuracy:
        # Diverged before the first validation: Optuna gets 0, and the run records the same value.
        tracking.log_metrics(client, run_id, {"val_accuracy_at_best_epoch": 0.0})
        return 0.0
    return history.val_accuracy[history.best_epoch] if history.best_epoch >= 0 else history.val_accuracy[-1]


def make_objective(
    client: MlflowClient, parent_id: str, experiment_id: str, study: StudyConfig,
    provider: FeatureProvider, shared_params: dict, settings: TrainSettings,
):
    """Build the Optuna objective: fit on train, score on validation, one MLflow child run per trial."""

    def objective(trial: optuna.Trial) -> float:
        params = classifier_params(study.suggest(trial))
        classifier = params["classifier"]
        searched = {k: v for k, v in params.items() if k in trial.params}
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
            variant = Variant.from_params(params)
            tracking.log_params(client, run_id, {**shared_params, **params, "pooling": variant.pooling})
            features = provider.get(variant, study.layer_for(classifier), run_id=run_id)
            tracking.log_params(client, run_id, {"layer": features.layer, "feature_cache_key": features.cache_key})
            if classifier == "fc_width_svm":
                tracking.set_tags(client, run_id, {"fc_init": "fresh" if variant.fc_width is not None else "pretrained"})
            if classifier == "head":
                value = fit_head_trial(client, run_id, trial, params, features, settings)
            else:
                value = fit_svm_trial(client, run_id, params, features, settings.seed)
        except optuna.TrialPruned:
            tracking.set_tags(client, run_id, {"optuna.trial_state": "PRUNED"})
            client.set_terminated(run_id, status="KILLED")
            raise
        except BaseException:
            tracking.set_tags(client, run_id, {"optuna.trial_state": "FAIL"})
            client.set_terminated(run_id, status="FAILED")
            raise
        tracking.set_tags(client, run_id, {"optuna.trial_state": "COMPLETE"})
        client.set_terminated(run_id, status="FINISHED")
        return value

    return objective
