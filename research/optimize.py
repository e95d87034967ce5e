"""Optuna study creation and resumption on its storage (SQLite, journal file or PostgreSQL)."""

from __future__ import annotations

import logging

import optuna
from rich.progress import Progress

from research import tracking
from research.studies import StudyConfig, make_pruner, make_sampler

log = logging.getLogger(__name__)


def run_study(config, study_config: StudyConfig, study_name: str, objective) -> optuna.Study:
    """Create or resume the Optuna study and run trials until ``n_trials`` are finished."""
    study = optuna.create_study(
        study_name=study_name,
        storage=config.storage,
        sampler=make_sampler(study_config, config.seed),
        pruner=make_pruner(study_config),
        direction=study_config.direction,
        load_if_exists=True,
    )
    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=done_states))
    remaining = config.n_trials - done
    log.info("Optuna study '%s' (%s): %d trials finished, %d to run.", study_name, tracking.redact_url(config.storage), done, max(remaining, 0))
    if remaining <= 0:
        return study

    with Progress() as progress:
        task = progress.add_task("trials", total=remaining)
        study.optimize(
            objective,
            n_trials=remaining,
            callbacks=[
                optuna.study.MaxTrialsCallback(config.n_trials, states=done_states),
                lambda _study, _trial: progress.advance(task),
            ],
        )
    return study
