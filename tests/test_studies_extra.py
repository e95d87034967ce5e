"""Head, pooling and full studies: conditional search space, pruning in MLflow, one extraction per pooling, seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from research import sweep as sweep_module
from research.cache import CacheEntry
from research.objectives import MLFLOW_RUN_ID_ATTR, TrainSettings, make_objective
from research.optimize import enqueue_cover
from research.studies import StudyConfigError, load_study, make_pruner
from research.sweep import SweepConfig, run_sweep
from research.variants import FeatureProvider, Features, Variant, check_backbone_variants
from tests.conftest import REPO_ROOT

HEAD_ONLY_STUDY = """
description: Head with a pruner that stops every trial after its second epoch.
classifier: head
layer: pool5
sampler: {type: random}
pruner: {type: threshold, lower: 2.0, n_warmup_steps: 1}
params:
  learning_rate: {type: float, low: 0.01, high: 0.1, log: true}
fixed: {fc_width: 8, dropout: 0.0, max_epochs: 6, patience: 6, batch_size: 8, head_normalize: standard}
"""

SMALL_POOLING_STUDY = """
description: Two poolings, SVM and a short head, for tests.
sampler: {type: random}
pruner: {type: none}
params:
  pooling: {type: categorical, choices: [max, lp1]}
  classifier: {type: categorical, choices: [svm, head]}
  svm_C: {type: float, low: 0.001, high: 1.0, log: true, when: {classifier: svm}}
  learning_rate: {type: float, low: 0.001, high: 0.01, log: true, when: {classifier: head}}
fixed: {fc_width: 16, dropout: 0.0, max_epochs: 3, patience: 3, batch_size: 8, normalize: standard, head_normalize: standard}
"""


def _write_study(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(text)
    return folder


def _children(client: MlflowClient, parent_id: str) -> list:
    experiment_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def _record_extractions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, study: str, text: str) -> list[str]:
    """Make the sweep load ``study`` from ``text`` and return the list that collects each backbone pass.

    Every call of ``extract_features`` appends the class name of VGG's first pooling layer.
    """
    sweeps = _write_study(tmp_path / "sweeps", study, text)
    monkeypatch.setattr(sweep_module, "load_study", lambda name: load_study(name, sweeps))
    extracted: list[str] = []
    real_extract = sweep_module.extract_features

    def counting_extract(model, *args, **kwargs):
        extracted.append(type(model.features[4]).__name__)
        return real_extract(model, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "extract_features", counting_extract)
    return extracted


def _small_vgg_sweep(data: Path, stores: dict, study: str, n_trials: int, seeds: int) -> SweepConfig:
    """Return a sweep of a random VGG16 at 32 px on a synthetic tree, in the test's own stores."""
    return SweepConfig(
        data_dir=str(data), study=study, n_trials=n_trials, backbone="vgg16", weights="none", image_size=32,
        storage=stores["storage"], cache_dir=stores["cache_dir"], experiment=f"test-{study}",
        num_workers=0, batch_size=8, seeds=seeds,
    )


def test_full_study_conditional_params() -> None:
    study = load_study("full")
    svm = study.suggest(optuna.trial.FixedTrial({"pooling": "avg", "classifier": "svm", "svm_C": 0.1}))
    head = study.suggest(optuna.trial.FixedTrial({"pooling": "lp2", "classifier": "head", "fc_width": 8196, "dropout": 0.3, "learning_rate": 0.01}))

    assert study.classifiers() == ("svm", "head")
    assert svm["classifier"] == "svm"
    assert svm["svm_C"] == 0.1
    assert "dropout" not in svm
    assert head["fc_width"] == 8196
    assert "svm_C" not in head
    assert study.layer_for("svm") == "relu7"
    assert study.layer_for("head") == "pool5"


@pytest.mark.parametrize("name", ["head", "pooling", "full", "fc_width_svm"])
def test_study_files_load(name: str) -> None:
    study = load_study(name)

    assert study.name == name
    assert make_pruner(study) is not None


def test_head_study_widths_include_lab_value() -> None:
    widths = next(spec.choices for spec in load_study("head").params if spec.name == "fc_width")

    assert widths == (1024, 4096, 8196, 16384)


def test_unknown_pruner_rejected(tmp_path: Path) -> None:
    text = HEAD_ONLY_STUDY.replace("type: threshold, lower: 2.0, n_warmup_steps: 1", "type: sometimes")
    _write_study(tmp_path, "bad", text)
    with pytest.raises(StudyConfigError, match="pruner.type = 'sometimes' is invalid"):
        load_study("bad", tmp_path)


def test_bad_classifier_choice_rejected(tmp_path: Path) -> None:
    _write_study(tmp_path, "bad", SMALL_POOLING_STUDY.replace("[svm, head]", "[svm, forest]"))
    with pytest.raises(StudyConfigError, match="invalid: \\['forest'\\]"):
        load_study("bad", tmp_path)


def test_mlproject_defaults() -> None:
    project = yaml.safe_load((REPO_ROOT / "MLproject").read_text())
    parameters = project["entry_points"]["sweep"]["parameters"]

    assert parameters["study"]["default"] == "full"
    assert parameters["seeds"]["default"] == 3
    assert "--seeds {seeds}" in project["entry_points"]["sweep"]["command"]


def _synthetic_features(seed: int = 0) -> Features:
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % 3
        return (rng.normal(labels[:, None], 1.0, size=(n, 10)).astype(np.float32), labels)

    return Features("pool5", *split(24), *split(9), *split(9), cache_key="synthetic")


def test_pruned_trial_recorded_in_mlflow(tmp_path: Path, isolated_stores: dict) -> None:
    study_config = load_study("headonly", _write_study(tmp_path / "sweeps", "headonly", HEAD_ONLY_STUDY))
    client = MlflowClient()
    experiment_id = client.create_experiment("prune-test")
    parent_id = client.create_run(experiment_id).info.run_id
    features = _synthetic_features()
    entry = CacheEntry("synthetic", tmp_path, {}, {"images_per_second": 10.0, "batch_seconds": [0.1, 0.2]}, hit=True)
    provider = FeatureProvider(lambda _variant: entry, lambda _entry, _layer, _variant: features, client, parent_id)
    settings = TrainSettings(device=__import__("torch").device("cpu"), bf16=False, seed=0)
    objective = make_objective(client, parent_id, experiment_id, study_config, provider, {"backbone": "synthetic"}, settings)

    study = optuna.create_study(direction="maximize", pruner=make_pruner(study_config), sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(objective, n_trials=2)

    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.PRUNED
        run = client.get_run(trial.user_attrs[MLFLOW_RUN_ID_ATTR])
        assert run.info.status == "KILLED"
        assert run.data.tags["optuna.trial_state"] == "PRUNED"
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        # ThresholdPruner with n_warmup_steps=1 prunes at epoch 1: two epochs of curves.
        for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == [0, 1]
        batches = client.get_metric_history(run.info.run_id, "train_batch_seconds")
        assert sorted(m.step for m in batches) == list(range(6))  # 24 rows / 8 per batch x 2 epochs
        assert run.data.params["learning_rate"] == str(trial.params["learning_rate"])
    # The first trial asked for the variant, so it carries the extraction record.
    first = client.get_run(study.trials[0].user_attrs[MLFLOW_RUN_ID_ATTR])
    assert first.data.metrics["images_per_second"] == 10.0
    assert client.get_run(parent_id).data.metrics["max_images_per_second"] == 10.0


def test_variant_from_params() -> None:
    assert Variant.from_params({"classifier": "head", "fc_width": 8196, "pooling": "avg"}) == Variant("avg")
    assert Variant.from_params({"classifier": "fc_width_svm", "fc_width": 4096, "fc_pretrained": True}) == Variant("max")
    assert Variant.from_params({"classifier": "fc_width_svm", "fc_width": 8196}) == Variant("max", 8196)
    assert Variant("lp2", 16384).prefix == "lp2_fc16384"


def test_pooling_sweep_extracts_once_per_pooling(
    presplit_tree: Path, isolated_stores: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extracted = _record_extractions(monkeypatch, tmp_path, "smallpool", SMALL_POOLING_STUDY)
    result = run_sweep(_small_vgg_sweep(presplit_tree, isolated_stores, "smallpool", n_trials=8, seeds=3))
    client = MlflowClient()
    parent = client.get_run(result["parent_run_id"])
    children = _children(client, parent.info.run_id)
    poolings = {child.data.params["pooling"] for child in children}

    assert len(children) == 8
    assert result["variant_cache_hits"] == {pooling: False for pooling in poolings | {"max"}}
    # The parent extracts max pooling up front; every other pooling is extracted once.
    assert sorted(extracted) == sorted({"MaxPool2d"} | {"Fp32LPPool2d" for p in poolings if p == "lp1"})
    for pooling in poolings | {"max"}:
        for layer in range(1, 6):
            assert f"{pooling}_act_max_pool{layer}" in parent.data.metrics
            assert f"{pooling}_act_mean_pool{layer}" in parent.data.metrics
        assert parent.data.metrics[f"{pooling}_images_per_second"] > 0
    for child in children:
        assert child.data.tags["optuna.trial_state"] == "COMPLETE"
        if child.data.params["classifier"] == "head":
            epochs = int(child.data.metrics["epochs_trained"])
            assert len(client.get_metric_history(child.info.run_id, "val_loss")) == epochs
            assert child.data.params["stable"] in {"True", "False"}
            assert "svm_C" not in child.data.params
        else:
            assert "fc_width" not in child.data.params

    seeds = client.get_metric_history(parent.info.run_id, "test_accuracy_seed")
    assert sorted(m.step for m in seeds) == [0, 1, 2]
    values = np.array([m.value for m in sorted(seeds, key=lambda m: m.step)])
    assert parent.data.metrics["test_accuracy_mean"] == pytest.approx(values.mean())
    assert parent.data.metrics["test_accuracy_std"] == pytest.approx(values.std(ddof=1))
    assert parent.data.params["seeds"] == "3"


def test_cover_enqueues_each_combination_once(tmp_path: Path) -> None:
    _write_study(tmp_path, "covered", SMALL_POOLING_STUDY + "cover: [pooling, classifier]\n")
    config = load_study("covered", tmp_path)
    study = optuna.create_study(direction="maximize")

    first = enqueue_cover(study, config)
    again = enqueue_cover(study, config)
    drawn = []
    study.optimize(lambda trial: drawn.append(config.suggest(trial)) or 0.5, n_trials=4)

    assert first == 4
    assert again == 0
    assert sorted((p["pooling"], p["classifier"]) for p in drawn) == [("lp1", "head"), ("lp1", "svm"), ("max", "head"), ("max", "svm")]
    assert all(("svm_C" in p) == (p["classifier"] == "svm") for p in drawn)
    assert enqueue_cover(study, config) == 0


def test_cover_enqueues_a_failed_combination_again(tmp_path: Path) -> None:
    _write_study(tmp_path, "covered", SMALL_POOLING_STUDY + "cover: [pooling]\n")
    config = load_study("covered", tmp_path)
    study = optuna.create_study(direction="maximize")
    enqueue_cover(study, config)

    def objective(trial: optuna.Trial) -> float:
        if config.suggest(trial)["pooling"] == "lp1":
            raise RuntimeError("this trial fails on purpose")
        return 0.5

    study.optimize(objective, n_trials=2, catch=(RuntimeError,))

    assert config.cover_combinations() == [{"pooling": "max"}, {"pooling": "lp1"}]
    assert enqueue_cover(study, config) == 1
    assert study.get_trials(states=(optuna.trial.TrialState.WAITING,))[0].system_attrs["fixed_params"] == {"pooling": "lp1"}


@pytest.mark.parametrize("cover", ["[svm_C]", "[learning_rate]", "[nothing]", "pooling"])
def test_cover_rejects_names_it_cannot_enumerate(tmp_path: Path, cover: str) -> None:
    _write_study(tmp_path, "bad", SMALL_POOLING_STUDY + f"cover: {cover}\n")

    with pytest.raises(StudyConfigError, match="cover"):
        load_study("bad", tmp_path)


FC_WIDTH_STUDY = """
description: Two fresh FC widths and VGG's own, SVM on relu7, for tests.
classifier: fc_width_svm
layer: relu7
sampler: {type: random}
cover: [fc_width]
params:
  fc_width: {type: categorical, choices: [16, 32, 4096]}
  svm_C: {type: float, low: 0.01, high: 1.0, log: true}
fixed: {pooling: max, fc_pretrained: true, normalize: standard}
"""


def test_fc_width_sweep_runs_the_convolutions_once(
    presplit_tree: Path, isolated_stores: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extracted = _record_extractions(monkeypatch, tmp_path, "smallfc", FC_WIDTH_STUDY)
    result = run_sweep(_small_vgg_sweep(presplit_tree, isolated_stores, "smallfc", n_trials=3, seeds=1))
    client = MlflowClient()
    parent = client.get_run(result["parent_run_id"])
    children = {child.data.params["fc_width"]: child for child in _children(client, parent.info.run_id)}

    assert len(extracted) == 1
    assert set(children) == {"16", "32", "4096"}
    assert children["16"].data.tags["fc_init"] == "fresh"
    assert children["4096"].data.tags["fc_init"] == "pretrained"
    assert parent.data.metrics["max_fc16_images_per_second"] > 0
    assert parent.data.metrics["max_fc32_act_max_pool5"] == parent.data.metrics["max_act_max_pool5"]
    assert 0.0 <= children["32"].data.metrics["val_accuracy"] <= 1.0


@pytest.mark.parametrize(
    ("study", "backbone", "message"),
    [
        ("pooling", "tf_efficientnet_lite0", "has no MaxPool2d layer to replace"),
        ("full", "tf_efficientnet_lite0", "has no MaxPool2d layer to replace"),
        ("full", "resnet18", "cannot replace a MaxPool2d with padding=1"),
        ("fc_width_svm", "tf_efficientnet_lite0", "only a timm VGG has"),
    ],
)
def test_backbone_variants_rejected_up_front(study: str, backbone: str, message: str) -> None:
    with pytest.raises(StudyConfigError, match=message):
        check_backbone_variants(load_study(study), backbone)


@pytest.mark.parametrize("study", ["pooling", "full", "fc_width_svm", "svm", "head"])
def test_backbone_variants_vgg16_accepted(study: str) -> None:
    assert check_backbone_variants(load_study(study), "vgg16") is None


def test_sweep_checks_backbone_before_any_run(presplit_tree: Path, isolated_stores: dict) -> None:
    config = SweepConfig(
        data_dir=str(presplit_tree), study="pooling", n_trials=2, backbone="tf_efficientnet_lite0", weights="none",
        image_size=32, storage=isolated_stores["storage"], cache_dir=isolated_stores["cache_dir"], experiment="test-early",
    )

    with pytest.raises(StudyConfigError, match="Use backbone=vgg16"):
        run_sweep(config)
    assert MlflowClient().get_experiment_by_name("test-early") is None
