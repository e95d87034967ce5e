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
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import yaml

SWEEPS_DIR = Path(__file__).resolve().parent.parent / "sweeps"
CLASSIFIERS = ("svm",)
SAMPLERS = ("tpe", "random", "grid")
PARAM_TYPES = ("float", "int", "categorical")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TOP_KEYS = {"description", "classifier", "layer", "sampler", "pruner", "params", "fixed", "direction"}


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
    layer: str
    params: tuple[ParamSpec, ...]
    fixed: dict = field(default_factory=dict)
    sampler: dict = field(default_factory=dict)
    pruner: dict = field(default_factory=dict)
    direction: str = "maximize"

    def suggest(self, trial: optuna.Trial) -> dict:
        """Draw every searched parameter for ``trial`` and add the fixed ones."""
        return {**self.fixed, **{spec.name: spec.suggest(trial) for spec in self.params}}


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
        return ParamSpec(name, kind, choices=tuple(choices))

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
    return ParamSpec(name, kind, low, high, log_scale, step)


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
    classifier = raw.get("classifier")
    if classifier not in CLASSIFIERS:
        raise StudyConfigError(f"{path}: classifier = {classifier!r} is invalid; use one of {', '.join(CLASSIFIERS)}.")
    sampler = raw.get("sampler") or {"type": "tpe"}
    if sampler.get("type") not in SAMPLERS:
        raise StudyConfigError(f"{path}: sampler.type = {sampler.get('type')!r} is invalid; use one of {', '.join(SAMPLERS)}.")
    direction = raw.get("direction", "maximize")
    if direction not in ("maximize", "minimize"):
        raise StudyConfigError(f"{path}: direction = {direction!r} is invalid; use maximize or minimize.")

    params_raw = raw.get("params") or {}
    if not isinstance(params_raw, dict) or not params_raw:
        raise StudyConfigError(f"{path}: 'params' must map at least one parameter name to its search range.")
    params = tuple(_parse_param(key, value, f"{path.name}: params") for key, value in params_raw.items())

    return StudyConfig(
        name=path.stem,
        path=path,
        description=str(raw.get("description", "")),
        classifier=classifier,
        layer=str(raw.get("layer", "relu7")),
        params=params,
        fixed=dict(raw.get("fixed") or {}),
        sampler=dict(sampler),
        pruner=dict(raw.get("pruner") or {}),
        direction=direction,
    )


def make_sampler(config: StudyConfig, seed: int) -> optuna.samplers.BaseSampler:
    """Build the Optuna sampler the study file asks for, seeded."""
    options = {k: v for k, v in config.sampler.items() if k != "type"}
    kind = config.sampler["type"]
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "grid":
        grid = {spec.name: list(spec.choices) for spec in config.params if spec.type == "categorical"}
        grid.update(options.get("search_space", {}))
        return optuna.samplers.GridSampler(grid, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, **options)
