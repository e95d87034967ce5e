"""Report sections about the studies: SVM, FC width, pooling, Optuna, environment."""

from __future__ import annotations

import logging
import math
import statistics

import optuna

from research import plots
from research.report import Context, format_params, markdown_table, weights_cell
from research.report_runs import RunRecord, Sweep, best_trial, objective_value

log = logging.getLogger(__name__)

# Trial params that Optuna never searches: settings shared by every trial of a sweep, and the
# head's ``stable`` result, which is logged as a param.
SHARED_PARAMS = frozenset({"backbone", "weights", "image_size", "seed", "precision", "layer", "feature_cache_key", "stable"})
CURVE_METRICS = ("train_loss", "val_loss", "train_accuracy", "val_accuracy")
ENVIRONMENT_ARTIFACT = "environment.json"


def _best_of(trials: list[RunRecord]) -> RunRecord | None:
    scored = [trial for trial in trials if objective_value(trial) is not None]
    return max(scored, key=lambda trial: (objective_value(trial), -trial.trial_number), default=None)


def _varying(trials: list[RunRecord], name: str) -> list[str]:
    """Return the distinct values of a param across trials, numbers in numeric order."""
    values = {trial.params[name] for trial in trials if name in trial.params}

    def key(value: str):
        try:
            return (0, float(value), value)
        except ValueError:
            return (1, 0.0, value)

    return sorted(values, key=key)


def _classifier(trial: RunRecord, sweep: Sweep) -> str:
    return trial.params.get("classifier", sweep.classifier)


def _sweep_heading(ctx: Context, sweep: Sweep) -> list[str]:
    """Return a sub-heading naming a sweep's backbone, weights, study and parent run.

    Several sweeps may share a section, and two sweeps may differ only by seed or data limit, so
    the parent run's short id keeps every heading distinct.
    """
    weights = ctx.text("random_mark") if sweep.parent.weights_random else sweep.parent.param("weights")
    return [f"### `{sweep.parent.param('backbone')}`, {weights} (`{sweep.study}`, `{sweep.parent.run_id[:8]}`)", ""]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def svm_section(ctx: Context) -> list[str]:
    t = ctx.text
    lines = [f"## {t('h_svm')}", ""]
    # Studies that also search the pooling or the classifier (full.yaml, pooling.yaml) go to section 7.
    sweeps = [
        sweep for sweep in ctx.sweeps
        if sweep.classifier == "svm" and len(_varying(sweep.trials, "pooling")) <= 1 and _varying(sweep.trials, "classifier") in ([], ["svm"])
    ]
    if not sweeps:
        return lines + ctx.missing("svm_missing")
    for sweep in sweeps:
        lines += _sweep_heading(ctx, sweep)
        trials = [trial for trial in sweep.trials if trial.param_float("svm_C") is not None and objective_value(trial) is not None]
        best = best_trial(sweep)
        layer = best.params.get("layer", "relu7") if best else "relu7"
        lines += [t("svm_intro", study=sweep.study_name, trials=len(trials), layer=layer), ""]
        if trials and best is not None:
            figure = plots.svm_figure([trial.param_float("svm_C") for trial in trials], [objective_value(trial) for trial in trials], (best.param_float("svm_C"), objective_value(best)), t)
            lines += [ctx.figure(figure, f"svm-C-{sweep.parent.run_id[:8]}", t("fig_svm_title")), ""]
            best_c = sweep.parent.param_float("best_svm_C") or best.param_float("svm_C")
            best_val = sweep.parent.metrics.get("best_val_accuracy", objective_value(best))
            test = sweep.parent.metrics.get("test_accuracy")
            lines += [t("svm_result", C=t.scientific(best_c, 3), trial=best.trial_number, val=t.percent(best_val), test=t.percent(test)), ""]
            rows = [
                [t("row_this_run"), t.percent(test), weights_cell(sweep.parent, t)],
                [t("row_lab_vgg"), t.percent(0.8915), t("lab_figure")],
                [t("row_lab_bow"), t.percent(0.736, 1), t("lab_figure")],
            ]
            lines += markdown_table([t("col_source"), t("col_accuracy"), t("col_weights")], rows, right={1})
        lines += ctx.sources([sweep.parent, *trials]) + [""]
    return lines + [t("svm_lab")]


def _curves(ctx: Context, trial: RunRecord) -> dict[str, list[tuple[int, float]]]:
    return {name: ctx.store.history(trial.run_id, name) for name in CURVE_METRICS}


def fc_width_section(ctx: Context) -> list[str]:
    t = ctx.text
    lines = [f"## {t('h_fc_width')}", ""]
    sweeps = [sweep for sweep in ctx.sweeps if len(_varying(sweep.trials, "fc_width")) > 1]
    if not sweeps:
        return lines + ctx.missing("fc_width_missing") + ["", t("fc_width_lab")]
    for sweep in sweeps:
        lines += _sweep_heading(ctx, sweep)
        classifiers = sorted({_classifier(trial, sweep) for trial in sweep.trials if "fc_width" in trial.params})
        # The FC-width SVM has no dropout, so its intro names the width alone.
        intro = "fc_width_intro" if any("dropout" in trial.params for trial in sweep.trials) else "fc_width_intro_svm"
        lines += [t(intro, study=sweep.study_name, classifier=", ".join(classifiers)), ""]
        rows, curves, used = [], {}, []
        for width in _varying(sweep.trials, "fc_width"):
            at_width = [trial for trial in sweep.trials if trial.params.get("fc_width") == width]
            groups = {}
            for trial in at_width:
                groups.setdefault((_classifier(trial, sweep), trial.params.get("dropout", "")), []).append(trial)
            for (classifier, dropout), trials in sorted(groups.items()):
                best = _best_of(trials)
                if best is None:
                    continue
                used.append(best)
                epoch = best.metrics.get("best_epoch")
                dropout_text = t.number(float(dropout), 2) if dropout else "-"
                extra = format_params({k: v for k, v in best.params.items() if k in ("svm_C", "learning_rate")}, t)
                rows.append([
                    width, classifier, dropout_text, str(len(trials)), f"{best.trial_number} ({extra})" if extra else str(best.trial_number),
                    t.integer(epoch) if epoch is not None else "-", t.percent(_train_accuracy(ctx, best)), t.percent(objective_value(best)), weights_cell(sweep.parent, t),
                ])
            head_trials = [trial for trial in at_width if _classifier(trial, sweep) == "head"]
            best_head = _best_of(head_trials)
            if best_head is not None:
                curves[f"fc_width={width}"] = _curves(ctx, best_head)
        headers = ["fc_width", "classifier", "dropout", t("col_trials_n"), t("col_best_trial"), t("col_epochs"), t("col_train_acc"), t("col_val_acc"), t("col_weights")]
        lines += markdown_table(headers, rows, right={3, 5, 6, 7})
        lines += ctx.sources([sweep.parent, *used]) + [""]
        if curves:
            lines += [ctx.figure(plots.curves_figure(curves, t), f"fc-width-curves-{sweep.parent.run_id[:8]}", t("curves_caption")), "", t("curves_caption"), ""]
    return lines + [t("fc_width_lab")]


def _train_accuracy(ctx: Context, trial: RunRecord) -> float | None:
    """Return the training accuracy at the trial's best epoch when it has one, else its last value."""
    epoch = trial.metrics.get("best_epoch")
    if epoch is not None:
        at_epoch = dict(ctx.store.history(trial.run_id, "train_accuracy")).get(int(epoch))
        if at_epoch is not None:
            return at_epoch
    return trial.metrics.get("train_accuracy")


def _pooling_rows(ctx: Context, sweep: Sweep) -> tuple[list[list[str]], list[RunRecord]]:
    t = ctx.text
    rows, used = [], []
    parent = sweep.parent
    for pooling in _varying(sweep.trials, "pooling"):
        source = sweep.variant_run(pooling)
        extraction = _mean([value for _, value in ctx.store.history(source.run_id, f"{pooling}_extract_batch_seconds")])
        images_per_second = source.metrics.get(f"{pooling}_images_per_second")
        by_classifier = {}
        for trial in sweep.trials:
            if trial.params.get("pooling") == pooling:
                by_classifier.setdefault(_classifier(trial, sweep), []).append(trial)
        for classifier, trials in sorted(by_classifier.items()):
            best = _best_of(trials)
            if best is None:
                continue
            used.append(best)
            epoch = best.metrics.get("best_epoch")
            train_accuracy = _train_accuracy(ctx, best)
            training = _mean([value for _, value in ctx.store.history(best.run_id, "train_batch_seconds")])
            test = "-"
            is_best = parent.params.get("best_pooling") == pooling and parent.params.get("best_classifier", sweep.classifier) == classifier
            if is_best and "test_accuracy" in parent.metrics:
                test = t.percent(parent.metrics["test_accuracy"])
            stable = best.params.get("stable")
            stable_text = "-"
            if best.tags.get("head_diverged") == "True":
                stable_text = t("diverged")
            elif stable is not None:
                stable_text = t("yes") if stable == "True" else t("no")
            rows.append([
                pooling, classifier, f"{best.trial_number}", t.integer(epoch) if epoch is not None and epoch >= 0 else "-",
                t.percent(train_accuracy), t.percent(objective_value(best)), test,
                stable_text,
                t.number(extraction, 3) if extraction is not None else "-", t.number(training, 4) if training is not None else "-",
                t.number(images_per_second, 1) if images_per_second is not None else "-", weights_cell(parent, t),
            ])
    return rows, used


def _activation_scales(sweep: Sweep) -> tuple[dict[str, list[float]], list[str]]:
    """Read ``<pooling>_act_mean_poolK`` from the parent run that extracted each pooling the trials used."""
    scales, layers = {}, []
    for pooling in _varying(sweep.trials, "pooling"):
        metrics = sweep.variant_run(pooling).metrics
        values, k = [], 1
        while f"{pooling}_act_mean_pool{k}" in metrics:
            value = metrics[f"{pooling}_act_mean_pool{k}"]
            # A log axis cannot show zero, negative, NaN or infinite values: they are left as gaps.
            values.append(value if math.isfinite(value) and value > 0 else math.nan)
            k += 1
        if values:
            scales[pooling] = values
            layers = [f"pool{i}" for i in range(1, len(values) + 1)] if len(values) > len(layers) else layers
    # A line needs a value for every layer; shorter ones come from a backbone with fewer poolings.
    return {pooling: values for pooling, values in scales.items() if len(values) == len(layers)}, layers


def _ranking(ctx: Context) -> list[str]:
    t = ctx.text
    lines = [f"### {t('h_ranking')}", ""]
    sweeps = [sweep for sweep in ctx.sweeps if "test_accuracy_mean" in sweep.parent.metrics]
    if not sweeps:
        return lines + ctx.missing("ranking_missing")
    rows = []
    for sweep in sorted(sweeps, key=lambda s: (-s.parent.metrics["test_accuracy_mean"], s.parent.run_id)):
        parent = sweep.parent
        best = {k.removeprefix("best_"): v for k, v in parent.params.items() if k.startswith("best_") and k != "best_trial_number"}
        config = format_params({k: v for k, v in best.items() if k in ("pooling", "classifier", "svm_C", "fc_width", "dropout", "learning_rate")}, t)
        n_seeds = len(ctx.store.history(parent.run_id, "test_accuracy_seed")) or parent.param("seeds")
        std = parent.metrics.get("test_accuracy_std")
        rows.append([f"`{sweep.study}`", config, t.percent(parent.metrics["test_accuracy_mean"]), t.percent(std) if std is not None and math.isfinite(std) else "-", str(n_seeds), weights_cell(parent, t)])
    headers = [t("col_study"), t("col_best_config"), t("col_mean"), t("col_std"), t("col_seeds"), t("col_weights")]
    return lines + markdown_table(headers, rows, right={2, 3, 4}) + ctx.sources([sweep.parent for sweep in sweeps])


def pooling_section(ctx: Context) -> list[str]:
    t = ctx.text
    lines = [f"## {t('h_pooling')}", ""]
    sweeps = [sweep for sweep in ctx.sweeps if len(_varying(sweep.trials, "pooling")) > 1]
    if not sweeps:
        lines += ctx.missing("pooling_missing") + [""]
    for sweep in sweeps:
        lines += _sweep_heading(ctx, sweep)
        lines += [t("pooling_intro", study=sweep.study_name), ""]
        rows, used = _pooling_rows(ctx, sweep)
        headers = [
            t("col_pooling"), "classifier", t("col_best_trial"), t("col_epoch"), t("col_train_acc"), t("col_val_acc"), t("col_test_best"), t("col_stable"),
            t("col_extract_s"), t("col_train_s"), t("col_images_s"), t("col_weights"),
        ]
        # Earlier parent runs of a resumed study that recorded a pooling's extraction are sources too.
        extractors = [run for run in sweep.earlier if any(sweep.variant_run(p) is run for p in _varying(sweep.trials, "pooling"))]
        lines += markdown_table(headers, rows, right={2, 3, 4, 5, 6, 8, 9, 10}) + ctx.sources([sweep.parent, *extractors, *used]) + [""]
        scales, layers = _activation_scales(sweep)
        if scales:
            figure = plots.activation_figure(scales, layers, t)
            lines += [ctx.figure(figure, f"pooling-activations-{sweep.parent.run_id[:8]}", t("fig_activation_title")), "", t("pooling_activation_caption"), ""]
    lines += [t("pooling_lab"), ""]
    return lines + _ranking(ctx)


def _distributions(trials: list[RunRecord], names: list[str]) -> dict[str, optuna.distributions.BaseDistribution]:
    """Infer each searched param's distribution from the values the trials logged."""
    distributions = {}
    for name in names:
        values = _varying(trials, name)
        try:
            numbers = [float(v) for v in values]
        except ValueError:
            distributions[name] = optuna.distributions.CategoricalDistribution(values)
            continue
        low, high = min(numbers), max(numbers)
        # NOTE: the search range is not tracked, so the range of the logged values replaces it.
        # A param spanning two decades or more is taken as log-scaled, as svm_C and learning_rate are.
        log_scale = low > 0 and high / low >= 100
        distributions[name] = optuna.distributions.FloatDistribution(low, high, log=log_scale)
    return distributions


def importances(trials: list[RunRecord]) -> dict[str, float]:
    """Compute fANOVA parameter importances (seeded) from the trials' params and objective values.

    Only params that vary and that every trial logged are used, because fANOVA needs a value for
    each one in every trial.
    """
    scored = [trial for trial in trials if objective_value(trial) is not None]
    if not scored:
        return {}
    common = set.intersection(*(set(trial.params) for trial in scored))
    names = sorted(name for name in common if name not in SHARED_PARAMS and len(_varying(scored, name)) > 1)
    if len(names) < 2:
        return {name: 1.0 for name in names}
    distributions = _distributions(scored, names)
    # An in-memory study only feeds fANOVA here, so Optuna's "new study created" message is noise.
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="maximize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    for trial in scored:
        params = {}
        for name in names:
            distribution = distributions[name]
            raw = trial.params[name]
            params[name] = raw if isinstance(distribution, optuna.distributions.CategoricalDistribution) else float(raw)
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=objective_value(trial)))
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    try:
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator, normalize=True))
    except RuntimeError as error:
        # fANOVA raises when every trial has the same value ("zero total variance").
        log.info("No parameter importances: %s", error)
        return {}


def optuna_section(ctx: Context) -> list[str]:
    t = ctx.text
    lines = [f"## {t('h_optuna')}", ""]
    for sweep in ctx.sweeps:
        scored = [trial for trial in sweep.trials if objective_value(trial) is not None]
        best = best_trial(sweep)
        lines += _sweep_heading(ctx, sweep)
        if not scored or best is None:
            lines += ctx.missing("optuna_missing") + [""]
            continue
        searched = {k: v for k, v in best.params.items() if k not in SHARED_PARAMS and len(_varying(scored, k)) > 1}
        lines += [t(
            "optuna_intro", study=sweep.study_name, trials=len(scored), objective="val_accuracy", trial=best.trial_number,
            value=t.percent(objective_value(best)), params=format_params(searched, t) or "-", run=best.run_id, parent=sweep.parent.run_id,
            storage=sweep.parent.params.get("storage", "sqlite:///optuna.db"),
        ), ""]
        states = ctx.store.trial_states(sweep.study_name)
        if states:
            lines += [t("optuna_states", states=", ".join(f"{state} {count}" for state, count in states.items())), ""]
        # Full Optuna study names overflow a figure title; the text above gives them.
        label = f"{sweep.study}, {sweep.parent.param('backbone')}"
        figure = plots.history_figure([trial.trial_number for trial in scored], [objective_value(trial) for trial in scored], True, label, "val_accuracy", t)
        lines += [ctx.figure(figure, f"optuna-history-{sweep.parent.run_id[:8]}", t("fig_history_title", study=sweep.study)), ""]
        values = importances(scored)
        if len(values) >= 2:
            lines += [ctx.figure(plots.importance_figure(values, label, t), f"optuna-importance-{sweep.parent.run_id[:8]}", t("fig_importance_title", study=sweep.study)), ""]
            rows = [[f"`{name}`", t.number(value, 3)] for name, value in values.items()]
            lines += markdown_table([t("col_param"), t("fig_importance")], rows, right={1})
        else:
            lines += [t("optuna_importance_single" if values else "optuna_importance_none")]
        lines += ctx.sources([sweep.parent, best]) + [""]
    return lines


def environment_section(ctx: Context) -> list[str]:
    t = ctx.text
    lines = [f"## {t('h_environment')}", ""]
    latest = None
    for sweep in reversed(ctx.sweeps):
        environment = ctx.store.artifact_json(sweep.parent.run_id, ENVIRONMENT_ARTIFACT)
        if environment is not None:
            latest = (sweep, environment)
            break
    if latest is None:
        return lines + ctx.missing("env_missing")
    sweep, env = latest
    lines += [t(
        "env_hardware", cpu=env.get("cpu_model", "?"), physical=env.get("cpu_physical_cores", "?"), logical=env.get("cpu_logical_cores", "?"),
        torch_threads=env.get("torch_threads", "?"), capability=env.get("cpu_capability", "?"), memory=t.number(env.get("memory_gib", float("nan")), 1),
        gpu=env.get("cuda_device", "?"),
    ), ""]
    lines += [t("env_software", python=env.get("python", "?"), platform=env.get("platform", "?"), commit=env.get("git_commit", "?")), ""]
    commits = sorted({s.parent.tags["git_commit"] for s in ctx.sweeps if "git_commit" in s.parent.tags})
    if len(commits) > 1:
        lines += [t("env_commits", commits=", ".join(f"`{c}`" for c in commits)), ""]
    seconds = [s.parent.metrics["sweep_seconds"] for s in ctx.sweeps if "sweep_seconds" in s.parent.metrics]
    if seconds:
        total = sum(seconds)
        lines += [t("env_time", n=len(seconds), seconds=t.number(total, 0), minutes=t.number(total / 60, 1)), ""]
    rows = [[f"`{name}`", version] for name, version in sorted(env.get("packages", {}).items())]
    lines += markdown_table([t("col_package"), t("col_version")], rows)
    return lines + ctx.sources([sweep.parent])
