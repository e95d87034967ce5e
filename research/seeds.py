"""The test pass: the best configuration refit with several seeds, each evaluated once on the test set.

Each seed refits the best trial's classifier on train + validation. The SVM uses the seed for
liblinear. The head uses it for initialisation, dropout and batch order, and trains for as many
epochs as the best trial's best epoch, because no validation set is left to stop on. The splits stay those
of the sweep's seed. The repeats are logged on the parent run, not as child runs, so that the
parent's children are exactly the Optuna trials: ``test_accuracy_mean``, ``test_accuracy_std``
(sample standard deviation, ddof = 1, NaN with a single seed), ``test_accuracy`` (equal to the
mean), and the series ``test_accuracy_seed`` and ``refit_train_accuracy_seed`` with step = repeat
index (the seed is the sweep's seed plus that index).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import optuna
from mlflow.tracking import MlflowClient

from research import tracking
from research.classifiers import fit_linear_svm
from research.head import train_head
from research.objectives import BEST_EPOCH_ATTR, TrainSettings, head_config
from research.variants import FeatureProvider, Variant

log = logging.getLogger(__name__)


def refit_and_test(params: dict, features, settings: TrainSettings, refit_epochs: int) -> dict[str, float]:
    """Refit one classifier on train + validation with ``settings.seed`` and return its accuracies."""
    x = np.concatenate([features.x_train, features.x_val])
    y = np.concatenate([features.y_train, features.y_val])
    if params["classifier"] == "head":
        config = dataclasses.replace(head_config(params), max_epochs=max(refit_epochs, 1))
        n_classes = int(max(y.max(), features.y_test.max())) + 1
        model = train_head(x, y, None, None, config, n_classes=n_classes, seed=settings.seed, device=settings.device, bf16=settings.bf16)
    else:
        model = fit_linear_svm(
            x, y, C=params["svm_C"], normalize=params.get("normalize", "standard"), seed=settings.seed,
            max_iter=int(params.get("max_iter", 5000)),
        )
    return {"test_accuracy": model.accuracy(features.x_test, features.y_test), "refit_train_accuracy": model.accuracy(x, y)}


def run_seed_repeats(
    client: MlflowClient, parent_id: str, study: optuna.Study, params: dict,
    provider: FeatureProvider, layer: str, settings: TrainSettings, seeds: int,
) -> dict[str, float]:
    """Refit the best configuration with seeds ``settings.seed`` .. ``settings.seed + seeds - 1`` and log the test spread.

    Raises:
        ValueError: ``seeds`` is smaller than 1.
    """
    if seeds < 1:
        raise ValueError(f"seeds={seeds} is invalid; it must be at least 1.")
    best = study.best_trial
    features = provider.get(Variant.from_params(params), layer)
    refit_epochs = int(best.user_attrs.get(BEST_EPOCH_ATTR, params.get("max_epochs", 1) - 1)) + 1

    accuracies, train_accuracies = [], []
    for repeat in range(seeds):
        seed = settings.seed + repeat
        metrics = refit_and_test(params, features, dataclasses.replace(settings, seed=seed), refit_epochs)
        accuracies.append(metrics["test_accuracy"])
        train_accuracies.append(metrics["refit_train_accuracy"])
        log.info("Seed %d: test accuracy %.4f.", seed, metrics["test_accuracy"])

    values = np.asarray(accuracies)
    summary = {
        "best_val_accuracy": best.value,
        "test_accuracy": float(values.mean()),
        "test_accuracy_mean": float(values.mean()),
        "test_accuracy_std": float(values.std(ddof=1)) if len(values) > 1 else float("nan"),
    }
    tracking.log_metrics(client, parent_id, summary)
    tracking.log_curves(client, parent_id, {"test_accuracy_seed": accuracies, "refit_train_accuracy_seed": train_accuracies})
    tracking.log_new_params(client, parent_id, {f"best_{k}": v for k, v in params.items()} | {"best_trial_number": best.number, "seeds": seeds, "refit_epochs": refit_epochs})
    spread = f"+- {summary['test_accuracy_std']:.4f} over {seeds} seeds" if seeds > 1 else "with 1 seed"
    log.info("Best trial %d: %s, validation accuracy %.4f, test accuracy %.4f %s.", best.number, params, best.value, summary["test_accuracy_mean"], spread)
    return summary
