"""Study definitions: a YAML file in ``sweeps/`` read into a validated search space.

A study file looks like::

    description: Linear SVM on relu7 features.
    classifier: svm
    layer: relu7
    sampler: {type: tpe, n_startup_trials: 5}
    params:
      svm_C: {type: float, low: 1.0e-5, high: 100.0, log: true}
      normalize: {type: categorical, choices: [standard, l2]}
    fixed:
      max_iter: 5000

A parameter may carry ``when: {classifier: head}``: it is drawn only in trials where the earlier
parameter ``classifier`` has that value (a conditional search space, as in ``full.yaml``). The
classifier is either the top-level ``classifier`` or a searched categorical ``params.classifier``.
``pruner`` selects an Optuna pruner for classifiers that report per epoch (the head)::

    pruner: {type: median, n_startup_trials: 3, n_warmup_steps: 5}

``cover`` lists categorical parameters whose every combination gets one trial first; the sampler
draws the other parameters of those trials, and the trials after them as usual::

    cover: [pooling, classifier]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import yaml

from research.pooling import POOLINGS

SWEEPS_DIR = Path(__file__).resolve().parent.parent / "sweeps"
CLASSIFIERS = ("svm", "head", "fc_width_svm")
# Feature layer of each classifier when the study file gives no ``layer``.
DEFAULT_LAYERS = {"svm": "relu7", "head": "pool5", "fc_width_svm": "relu7"}
PRUNERS = ("none", "median", "percentile", "hyperband", "successive_halving", "threshold")
SAMPLERS = ("tpe", "random", "grid")
PARAM_TYPES = ("float", "int", "categorical")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TOP_KEYS = {"description", "classifier", "layer", "sampler", "pruner", "params", "fixed", "direction", "cover"}


class StudyConfigError(ValueError):
    """Invalid study name or study file; the message names the value and the fix."""


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    when: tuple[tuple[str, object], ...] = ()

    def applies(self, drawn: dict) -> bool:
        """Tell whether this parameter is searched, given the values drawn before it."""
        return all(drawn.get(key) == value for key, value in self.when)

    def suggest(self, trial: optuna.Trial):
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.name, list(self.choices))


@dataclass(frozen=True)
class StudyConfig:
    """A parsed study file."""

    name: str
    path: Path
    description: str
    classifier: str
    layer: str | None
    params: tuple[ParamSpec, ...]
    fixed: dict = field(default_factory=dict)
    sampler: dict = field(default_factory=dict)
    pruner: dict = field(default_factory=dict)
    direction: str = "maximize"
    cover: tuple[str, ...] = ()

    def suggest(self, trial: optuna.Trial) -> dict:
        """Draw the searched parameters that apply to ``trial`` and add the fixed ones and ``classifier``."""
        params: dict = {"classifier": self.classifier, **self.fixed}
        for spec in self.params:
            if spec.applies(params):
                params[spec.name] = spec.suggest(trial)
        return params

    def layer_for(self, classifier: str) -> str:
        """Return the feature layer a classifier trains on: the file's ``layer``, else its default."""
        return self.layer or DEFAULT_LAYERS[classifier]

    def cover_combinations(self) -> list[dict]:
        """Return every combination of the ``cover`` parameters' choices, in the file's order."""
        specs = {spec.name: spec for spec in self.params}
        grid = [{}]
        for name in self.cover:
            grid = [{**combo, name: choice} for combo in grid for choice in specs[name].choices]
        return grid

    def classifiers(self) -> tuple[str, ...]:
        """Return every classifier that trials of this study may use."""
        for spec in self.params:
            if spec.name == "classifier":
                return tuple(spec.choices)
        return (self.classifier,)


def study_path(name: str, sweeps_dir: Path = SWEEPS_DIR) -> Path:
    """Resolve a study name (``svm`` or ``svm.yaml``) to its file in ``sweeps_dir``.

    Raises:
        StudyConfigError: The name contains a path or the file does not exist.
    """
    stem = name[:-5] if name.endswith(".yaml") else name
    if not _NAME.match(stem) or "/" in stem or ".." in stem:
        raise StudyConfigError(
            f"Study name {name!r} is invalid: use the name of a file in {sweeps_dir} without any folder, "
            "for example 'svm'."
        )
    path = sweeps_dir / f"{stem}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in sweeps_dir.glob("*.yaml"))
        raise StudyConfigError(f"Study '{stem}' not found: no file {path}. Known studies: {', '.join(known) or 'none'}.")
    return path


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StudyConfigError(f"{where} = {value!r} is invalid: expected a number.")
    return float(value)


def _parse_param(name: str, raw, where: str) -> ParamSpec:
    if not isinstance(raw, dict):
        raise StudyConfigError(f"{where}.{name} must be a mapping with a 'type' key, got {raw!r}.")
    kind = raw.get("type")
    if kind not in PARAM_TYPES:
        raise StudyConfigError(f"{where}.{name}.type = {kind!r} is invalid; use one of {', '.join(PARAM_TYPES)}.")

    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise StudyConfigError(f"{where}.{name}.choices must be a non-empty list, got {choices!r}.")
        return ParamSpec(name, kind, choices=tuple(choices), when=_parse_when(raw, f"{where}.{name}"))

    low = _number(raw.get("low"), f"{where}.{name}.low")
    high = _number(raw.get("high"), f"{where}.{name}.high")
    log_scale = bool(raw.get("log", False))
    step = raw.get("step")
    if not low < high:
        raise StudyConfigError(f"{where}.{name}: low = {low} must be smaller than high = {high}.")
    if log_scale and low <= 0:
        raise StudyConfigError(f"{where}.{name}: low = {low} must be positive on a log scale.")
    if step is not None:
        step = _number(step, f"{where}.{name}.step")
    return ParamSpec(name, kind, low, high, log_scale, step, when=_parse_when(raw, f"{where}.{name}"))


def _parse_when(raw: dict, where: str) -> tuple[tuple[str, object], ...]:
    when = raw.get("when") or {}
    if not isinstance(when, dict):
        raise StudyConfigError(f"{where}.when must map an earlier parameter to a value, got {when!r}.")
    return tuple(sorted(when.items()))


def load_study(name: str, sweeps_dir: Path = SWEEPS_DIR) -> StudyConfig:
    """Read and validate a study file.

    Raises:
        StudyConfigError: Unknown study, malformed YAML, unknown key or out-of-range value.
    """
    path = study_path(name, sweeps_dir)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise StudyConfigError(f"Study file {path} is not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise StudyConfigError(f"Study file {path} must contain a mapping at the top level.")

    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise StudyConfigError(f"Study file {path}: unknown keys {unknown}; allowed keys are {sorted(_TOP_KEYS)}.")
    params_raw = raw.get("params") or {}
    if not isinstance(params_raw, dict) or not params_raw:
        raise StudyConfigError(f"{path}: 'params' must map at least one parameter name to its search range.")
    params = tuple(_parse_param(key, value, f"{path.name}: params") for key, value in params_raw.items())
    classifier = _parse_classifier(raw.get("classifier"), params, path)
    pruner = dict(raw.get("pruner") or {"type": "none"})
    if pruner.get("type") not in PRUNERS:
        raise StudyConfigError(f"{path}: pruner.type = {pruner.get('type')!r} is invalid; use one of {', '.join(PRUNERS)}.")
    sampler = raw.get("sampler") or {"type": "tpe"}
    if sampler.get("type") not in SAMPLERS:
        raise StudyConfigError(f"{path}: sampler.type = {sampler.get('type')!r} is invalid; use one of {', '.join(SAMPLERS)}.")
    direction = raw.get("direction", "maximize")
    if direction not in ("maximize", "minimize"):
        raise StudyConfigError(f"{path}: direction = {direction!r} is invalid; use maximize or minimize.")
    _check_pooling(params, raw.get("fixed") or {}, path)
    cover = _parse_cover(raw.get("cover"), params, path)

    return StudyConfig(
        name=path.stem,
        path=path,
        description=str(raw.get("description", "")),
        classifier=classifier,
        layer=str(raw["layer"]) if raw.get("layer") else None,
        params=params,
        fixed=dict(raw.get("fixed") or {}),
        sampler=dict(sampler),
        pruner=pruner,
        direction=direction,
        cover=cover,
    )


def _parse_cover(raw, params: tuple[ParamSpec, ...], path: Path) -> tuple[str, ...]:
    """Validate ``cover``: a list of searched categorical parameters that apply to every trial."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(name, str) for name in raw):
        raise StudyConfigError(f"{path}: cover must be a list of parameter names, for example [pooling, classifier]; got {raw!r}.")
    specs = {spec.name: spec for spec in params}
    for name in raw:
        spec = specs.get(name)
        if spec is None or spec.type != "categorical" or spec.when:
            raise StudyConfigError(
                f"{path}: cover names {name!r}, which is not a categorical parameter drawn in every trial. "
                f"Use names from params with type categorical and no 'when'."
            )
    return tuple(raw)


def _check_pooling(params: tuple[ParamSpec, ...], fixed: dict, path: Path) -> None:
    """Reject pooling names that ``research.pooling`` cannot build, before any trial runs."""
    requested = [choice for spec in params if spec.name == "pooling" for choice in spec.choices]
    if "pooling" in fixed:
        requested.append(fixed["pooling"])
    invalid = [name for name in requested if name not in POOLINGS]
    if invalid:
        raise StudyConfigError(f"{path}: pooling {invalid} is invalid; use one of {', '.join(POOLINGS)}.")


def _parse_classifier(top_level, params: tuple[ParamSpec, ...], path: Path) -> str:
    """Validate the classifier; with a searched ``params.classifier`` the top-level one is its first choice."""
    searched = next((spec for spec in params if spec.name == "classifier"), None)
    if searched is not None:
        bad = [c for c in searched.choices if c not in CLASSIFIERS]
        if searched.type != "categorical" or bad:
            raise StudyConfigError(
                f"{path}: params.classifier must be categorical with choices among {', '.join(CLASSIFIERS)}; invalid: {bad}."
            )
        return str(top_level or searched.choices[0])
    if top_level not in CLASSIFIERS:
        raise StudyConfigError(f"{path}: classifier = {top_level!r} is invalid; use one of {', '.join(CLASSIFIERS)}.")
    return top_level


def make_pruner(config: StudyConfig) -> optuna.pruners.BasePruner:
    """Build the Optuna pruner that the study file sets; ``none`` never prunes."""
    options = {k: v for k, v in config.pruner.items() if k != "type"}
    kind = config.pruner.get("type", "none")
    try:
        if kind == "median":
            return optuna.pruners.MedianPruner(**options)
        if kind == "percentile":
            return optuna.pruners.PercentilePruner(**options)
        if kind == "hyperband":
            return optuna.pruners.HyperbandPruner(**options)
        if kind == "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(**options)
        if kind == "threshold":
            return optuna.pruners.ThresholdPruner(**options)
    except TypeError as error:
        raise StudyConfigError(f"{config.path}: pruner options {options} are invalid for {kind}: {error}") from error
    return optuna.pruners.NopPruner()


def make_sampler(config: StudyConfig, seed: int) -> optuna.samplers.BaseSampler:
    """Build the Optuna sampler that the study file requests, seeded."""
    options = {k: v for k, v in config.sampler.items() if k != "type"}
    kind = config.sampler["type"]
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "grid":
        grid = {spec.name: list(spec.choices) for spec in config.params if spec.type == "categorical"}
        grid.update(options.get("search_space", {}))
        return optuna.samplers.GridSampler(grid, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, **options)
