"""The report, generated from a small tracked sweep and command runs made in the test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from PIL import Image

from research.cli import main
from research.featuremaps import run_featuremaps
from research.layers import describe_model
from research.predict import run_predict
from research.report import write_report
from research.report_runs import ReportError, RunRecord, Sweep, objective_value
from research.report_studies import importances
from research.report_text import Text
from research.sweep import SweepConfig, run_sweep
from tests.conftest import make_image, make_tree

EXPERIMENT = "test-report"
HEADINGS_EN = (
    "## 1. VGG16's layers and parameters", "## 2. Classifying our own photos", "## 3. Feature maps of the first convolution",
    "## 4. Protocol", "## 5. Linear SVM on relu7 features", "## 6. Width of the fully connected layers", "## 7. Pooling layers",
    "## 8. Optuna studies", "## 9. Environment",
)
HEADINGS_FR = (
    "## 1. Les couches de VGG16 et leurs paramètres", "## 2. Classification de nos propres photos",
    "## 3. Cartes de caractéristiques de la première convolution", "## 4. Protocole", "## 5. SVM linéaire sur les caractéristiques relu7",
    "## 6. Largeur des couches entièrement connectées", "## 7. Couches de pooling", "## 8. Études Optuna", "## 9. Environnement",
)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One SVM sweep on a random VGG16 at 32 px, one predict run and one featuremaps run."""
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        patch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        patch.chdir(root)
        data = root / "scene"
        make_tree(data / "train", ["coast", "forest", "kitchen"], 6)
        make_tree(data / "test", ["coast", "forest", "kitchen"], 4, offset=500)
        picture = make_image(root / "pictures" / "noise.png", 1000, size=48, mode="RGB")
        sweep = run_sweep(SweepConfig(
            data_dir=str(data), study="svm", n_trials=3, backbone="vgg16", weights="none", image_size=32,
            storage=f"sqlite:///{root / 'optuna.db'}", cache_dir=str(root / "cache"), experiment=EXPERIMENT, num_workers=0, batch_size=8,
        ))
        predict = run_predict([str(picture)], backbone="resnet18", weights="none", experiment=EXPERIMENT)
        maps = run_featuremaps([str(picture)], backbone="resnet18", weights="none", experiment=EXPERIMENT)
        reports = {lang: write_report(EXPERIMENT, root / "out", lang) for lang in ("en", "fr")}
        yield {"root": root, "sweep": sweep, "predict": predict, "maps": maps, "reports": reports, "client": MlflowClient()}


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def test_report_sections_in_order(tracked: dict) -> None:
    text = tracked["reports"]["en"].read_text()
    positions = [text.index(heading) for heading in HEADINGS_EN]

    assert positions == sorted(positions)
    assert text.startswith("# Transfer learning with vgg16 on 15 Scene")
    assert "No tracked runs for this part yet" in _section(text, "## 6.")
    assert "No tracked runs for this part yet" not in _section(text, "## 5.")


def test_report_numbers_equal_mlflow(tracked: dict) -> None:
    text = tracked["reports"]["en"].read_text()
    t = Text("en")
    client = tracked["client"]
    parent = client.get_run(tracked["sweep"]["parent_run_id"]).data

    svm = _section(text, "## 5.")
    best_c = float(parent.params["best_svm_C"])
    assert f"Best C = {t.scientific(best_c, 3)}" in svm
    assert f"**test accuracy {t.percent(parent.metrics['test_accuracy'])}**" in svm
    assert f"validation accuracy {t.percent(parent.metrics['best_val_accuracy'])}" in svm
    protocol = _section(text, "## 4.")
    assert f"{int(parent.metrics['n_train'])} training, {int(parent.metrics['n_val'])} validation" in protocol
    assert f"and {int(parent.metrics['n_test'])} test images" in protocol
    assert f"refits the best configuration with {int(parent.params['seeds'])} seeds (from 0)" in protocol
    assert "Trial runs per state: COMPLETE 3." in _section(text, "## 8.")
    assert "**138,357,544 parameters**" in _section(text, "## 1.")
    assert "138,344,128 weights + 13,416 biases" in _section(text, "## 1.")
    predict = client.get_run(tracked["predict"]["run_id"])
    top1 = tracked["predict"]["predictions"][0]
    assert f"| `noise.png` | {top1['top1']} | {t.percent(top1['probability'], 1)} |" in _section(text, "## 2.")
    assert predict.info.run_id in _section(text, "## 2.")


def test_report_tables_name_sources(tracked: dict) -> None:
    text = tracked["reports"]["en"].read_text()
    parent_id = tracked["sweep"]["parent_run_id"]

    for heading in ("## Tracked sweeps", "## 1.", "## 4.", "## 5.", "## 9."):
        section = _section(text, heading)
        assert "Source: " in section, heading
        assert parent_id in section, heading


def test_report_figures_are_png(tracked: dict) -> None:
    out = tracked["root"] / "out"
    for lang, path in tracked["reports"].items():
        links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", path.read_text())
        assert any("svm-C" in link for link in links)
        assert any("optuna-history" in link for link in links)
        assert any("predict-" in link for link in links)
        assert sum("featuremaps-" in link for link in links) == 2
        for link in links:
            assert link.endswith(f".{lang}.png")
            with Image.open(out / link) as image:
                assert image.format == "PNG"
                assert image.width > 100


def test_report_identical_on_second_call(tracked: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tracked["root"] / "out"
    first = {path: path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tracked['root'] / 'mlflow.db'}")
    for lang in ("en", "fr"):
        write_report(EXPERIMENT, out, lang)
    second = {path: path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}

    assert sorted(second) == sorted(first)
    for path, content in first.items():
        assert second[path] == content, path


def test_report_french(tracked: dict) -> None:
    text = tracked["reports"]["fr"].read_text()
    positions = [text.index(heading) for heading in HEADINGS_FR]

    assert positions == sorted(positions)
    assert tracked["reports"]["fr"].name == "report.fr.md"
    assert "**138\u202f357\u202f544 paramètres**" in text
    assert "| classe | apprentissage | validation | test |" in text
    assert "Source : " in text
    assert "Source: " not in text
    for english in ("Tracked sweeps", "No tracked runs", "Best C", "Hardware"):
        assert english not in text


def test_report_flags_random_weights(tracked: dict) -> None:
    text = tracked["reports"]["en"].read_text()
    head = text[: text.index("## Tracked sweeps")]

    assert "**Warning: random weights.**" in head
    # Every table of a section built from runs is followed by the random-weights note before the next heading.
    for block in re.split(r"\n#{2,3} ", text)[1:]:
        if "\n| " in block and "Source: " in block:
            assert "**Random weights**" in block or "**random weights** ⚠" in block, block[:60]


def test_report_missing_experiment(tracked: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tracked['root'] / 'mlflow.db'}")
    with pytest.raises(ReportError, match="experiment 'no-such-experiment' not found.*test-report"):
        write_report("no-such-experiment", tracked["root"] / "none", "en")


def test_report_two_experiments(tracked: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tracked['root'] / 'mlflow.db'}")
    client = MlflowClient()
    other = client.create_experiment("test-report-other")
    _log_run(client, other, {"study": "head", "classifier": "head", "backbone": "vgg16"}, {"test_accuracy": 0.5}, {"optuna.study_name": "other-study"})
    monkeypatch.chdir(tmp_path)
    text = write_report(f"{EXPERIMENT},test-report-other", None, "en").read_text()

    assert (tmp_path / "reports" / f"{EXPERIMENT}+test-report-other" / "report.md").is_file()
    assert "(MLflow experiments: `test-report`, `test-report-other`; finished sweeps: 2)" in text
    assert "`other-study`" in _section(text, "## Tracked sweeps")
    assert tracked["sweep"]["study_name"] in _section(text, "## Tracked sweeps")


def test_report_without_sweep(isolated_stores: dict, tmp_path: Path) -> None:
    client = MlflowClient()
    experiment_id = client.create_experiment("only-predict")
    run = client.create_run(experiment_id, tags={"research.command": "predict"})
    client.set_terminated(run.info.run_id)

    with pytest.raises(ReportError, match="no finished sweep"):
        write_report("only-predict", tmp_path / "out", "en")
    assert main(["report", "--experiment", "only-predict", "--out", str(tmp_path / "out")]) == 2


def test_report_cli_both_languages(tracked: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tracked['root'] / 'mlflow.db'}")
    assert main(["report", "--experiment", EXPERIMENT, "--out", str(tmp_path), "--lang", "all"]) == 0

    assert (tmp_path / "report.md").read_bytes() == tracked["reports"]["en"].read_bytes()
    assert (tmp_path / "report.fr.md").read_bytes() == tracked["reports"]["fr"].read_bytes()


def test_sweep_logs_layer_table(tracked: dict, tmp_path: Path) -> None:
    client = tracked["client"]
    parent_id = tracked["sweep"]["parent_run_id"]
    artifacts = {item.path for item in client.list_artifacts(parent_id, "model")}

    assert artifacts == {"model/layers.json", "model/layers.md"}
    markdown = Path(client.download_artifacts(parent_id, "model/layers.md", str(tmp_path))).read_text()
    assert "138,357,544 parameters" in markdown


def test_vgg16_layer_table() -> None:
    table = describe_model("vgg16", 224)
    types = [row["type"] for row in table["rows"]]

    assert table["totals"] == {"weights": 138_344_128, "biases": 13_416, "parameters": 138_357_544, "layers": 21}
    assert types.count("Conv2d") == 15  # 13 convolutions and fc6, fc7 as 7x7 and 1x1 convolutions
    assert types.count("MaxPool2d") == 5
    assert table["rows"][0] == {
        "name": "features.0", "type": "Conv2d", "in_channels": 3, "out_channels": 64, "kernel": "3x3",
        "weights": 1_728, "biases": 64, "output_size": [64, 224, 224],
    }
    last_pool = [row for row in table["rows"] if row["type"] == "MaxPool2d"][-1]
    assert last_pool["output_size"] == [512, 7, 7]
    assert table["rows"][-1]["output_size"] == [1000]
    assert table["num_classes"] == 1000


def test_layer_table_rejects_unknown_model() -> None:
    with pytest.raises(ValueError, match="Unknown timm model 'vgg17'"):
        describe_model("vgg17")


def _trial(number: int, params: dict, value: float) -> RunRecord:
    return RunRecord(f"run{number}", "", "FINISHED", number, {k: str(v) for k, v in params.items()}, {"val_accuracy": value}, {"optuna.trial_number": str(number)})


def test_importances_two_params() -> None:
    trials = [_trial(i, {"svm_C": 10 ** (i % 5 - 3), "pooling": ("max", "avg")[i % 2], "seed": 0}, 0.5 + 0.1 * (i % 5)) for i in range(12)]
    values = importances(trials)

    assert sorted(values) == ["pooling", "svm_C"]
    assert sum(values.values()) == pytest.approx(1.0)
    # The accuracy follows svm_C exactly and pooling only by chance, so C must dominate.
    assert values["svm_C"] > values["pooling"]
    assert importances(trials) == values


def _log_run(
    client: MlflowClient, experiment_id: str, params: dict, metrics: dict, tags: dict, series: dict | None = None, status: str = "FINISHED"
) -> str:
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    batch = [Metric(k, float(v), 0, 0) for k, v in metrics.items()]
    for key, values in (series or {}).items():
        batch += [Metric(key, float(v), 0, step) for step, v in enumerate(values)]
    client.log_batch(run_id, metrics=batch, params=[Param(k, str(v)) for k, v in params.items()], tags=[RunTag(k, str(v)) for k, v in tags.items()])
    client.set_terminated(run_id, status=status)
    return run_id


def test_report_pooling_and_width_sections(isolated_stores: dict, tmp_path: Path) -> None:
    """A pooling x width study logged with the sweep's tracked names fills sections 6 and 7."""
    client = MlflowClient()
    experiment_id = client.create_experiment("pooling-names")
    study = {"optuna.study_name": "pool-study"}
    parent_metrics = {"best_val_accuracy": 0.9, "test_accuracy": 0.85, "test_accuracy_mean": 0.85, "test_accuracy_std": 0.01}
    for pooling, scale in (("max", 2.0), ("lp1", 40.0)):
        parent_metrics[f"{pooling}_images_per_second"] = 50.0 if pooling == "max" else 45.0
        parent_metrics.update({f"{pooling}_act_mean_pool{k}": scale * k for k in range(1, 6)})
    parent_id = _log_run(
        client, experiment_id,
        {"study": "pooling", "classifier": "svm", "backbone": "vgg16", "weights": "/raw/x.safetensors", "resolved_weights": "x.safetensors", "best_trial_number": 1, "best_pooling": "max", "best_classifier": "head"},
        parent_metrics, study, {"max_extract_batch_seconds": [0.5, 0.7], "lp1_extract_batch_seconds": [0.6, 0.8]},
    )
    trial_tags = {**study, "mlflow.parentRunId": parent_id}
    # An earlier failed run of trial 0 (a resumed sweep retries it) and a pruned trial 3.
    _log_run(client, experiment_id, {"pooling": "lp1"}, {}, {**trial_tags, "optuna.trial_number": 0}, status="FAILED")
    _log_run(client, experiment_id, {"pooling": "avg"}, {"val_accuracy": 0.1}, {**trial_tags, "optuna.trial_number": 3}, status="KILLED")
    values = {0: ("lp1", 1024, 0.3, 0.1), 1: ("max", 1024, 0.9, 0.2), 2: ("max", 4096, 0.8, 0.2)}
    for number, (pooling, width, accuracy, dropout) in values.items():
        _log_run(
            client, experiment_id,
            {"pooling": pooling, "fc_width": width, "dropout": dropout, "classifier": "head", "learning_rate": 0.01, "stable": pooling == "max"},
            {"val_accuracy_at_best_epoch": accuracy, "best_epoch": 1},
            {**trial_tags, "optuna.trial_number": number},
            {"train_loss": [2.0, 1.0, 0.5], "val_loss": [2.1, 1.2, 0.9], "train_accuracy": [0.5, accuracy + 0.05, 0.99],
             "val_accuracy": [0.4, accuracy, accuracy - 0.01], "train_batch_seconds": [0.01, 0.03]},
        )

    text = write_report("pooling-names", tmp_path, "en").read_text()
    t = Text("en")
    pooling = _section(text, "## 7.")
    assert f"| max | head | 1 | 1 | {t.percent(0.95)} | {t.percent(0.9)} | {t.percent(0.85)} | yes | 0.600 | 0.0200 | 50.0 | `x.safetensors` |" in pooling
    assert f"| lp1 | head | 0 | 1 | {t.percent(0.35)} | {t.percent(0.3)} | - | no | 0.700 | 0.0200 | 45.0 |" in pooling
    assert "figures/pooling-activations-" in pooling
    assert f"| `pooling` | `best_pooling`" not in pooling
    assert f"{t.percent(0.85)} | {t.percent(0.01)} |" in pooling
    width = _section(text, "## 6.")
    assert f"| 1024 | head | 0.10 | 1 | 0 (`learning_rate`=0.01) | 1 | {t.percent(0.35)} | {t.percent(0.3)} | `x.safetensors` |" in width
    assert f"| 4096 | head | 0.20 | 1 | 2 (`learning_rate`=0.01) | 1 | {t.percent(0.85)} | {t.percent(0.8)} | `x.safetensors` |" in width
    assert "figures/fc-width-curves-" in width
    assert "Best trial per `fc_width` and `dropout`" in width
    assert "No tracked runs" not in width
    assert "**Warning: random weights.**" not in text
    assert "/raw/x.safetensors" not in text
    assert "No tracked runs for this part yet" in _section(text, "## 5.")  # pooling is searched, so not an SVM-only study
    assert "Trial runs per state: COMPLETE 3, PRUNED 1." in _section(text, "## 8.")


def test_importances_equal_values_empty() -> None:
    trials = [_trial(i, {"svm_C": 10 ** (i % 5 - 3), "pooling": ("max", "avg")[i % 2]}, 0.25) for i in range(8)]

    assert importances(trials) == {}


def test_failed_report_keeps_figures(isolated_stores: dict, tmp_path: Path) -> None:
    figures = tmp_path / "out" / "figures"
    figures.mkdir(parents=True)
    earlier = figures / "svm-C.en.png"
    earlier.write_bytes(b"an earlier figure")
    client = MlflowClient()
    client.create_experiment("no-sweep-yet")

    with pytest.raises(ReportError):
        write_report("no-sweep-yet", tmp_path / "out", "en")

    assert earlier.read_bytes() == b"an earlier figure"


def test_sweep_variant_run_falls_back_to_earlier_parent() -> None:
    first = RunRecord("first", "", "FINISHED", 1, {"study": "pooling"}, {"max_images_per_second": 9.0, "lp1_images_per_second": 7.0}, {})
    resumed = RunRecord("resumed", "", "FINISHED", 2, {"study": "pooling"}, {"max_images_per_second": 9.5}, {})
    sweep = Sweep(resumed, [], [first])

    assert sweep.variant_run("max") is resumed
    assert sweep.variant_run("lp1") is first
    assert sweep.variant_run("lp2") is resumed


def test_report_warns_before_removing_figures(tracked: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tracked['root'] / 'mlflow.db'}")
    foreign = tmp_path / "out" / "figures" / "svm-C-otherrun.en.png"
    unrelated = tmp_path / "out" / "figures" / "sketch.en.png"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"a figure of an earlier report")
    unrelated.write_bytes(b"a file no report wrote")
    (tmp_path / "out" / "report.md").write_text("![C](figures/svm-C-otherrun.en.png)\n")

    with caplog.at_level("WARNING", logger="research.report"):
        write_report(EXPERIMENT, tmp_path / "out", "en")

    assert not foreign.exists()
    assert unrelated.read_bytes() == b"a file no report wrote"
    assert "removing 1 figure(s) of the earlier report, from runs this report does not read" in caplog.text
    assert "svm-C-otherrun.en.png" in caplog.text
    assert "sketch.en.png" not in caplog.text
    assert "Pass --out" in caplog.text


def test_report_keeps_files_without_earlier_report(tracked: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tracked['root'] / 'mlflow.db'}")
    unrelated = tmp_path / "out" / "figures" / "x.en.png"
    unrelated.parent.mkdir(parents=True)
    unrelated.write_bytes(b"a file no report wrote")

    with caplog.at_level("WARNING", logger="research.report"):
        write_report(EXPERIMENT, tmp_path / "out", "en")

    assert unrelated.exists()
    assert "Replacing the report" not in caplog.text


def test_objective_value_of_diverged_head_is_zero() -> None:
    diverged = RunRecord("d", "", "FINISHED", 1, {"classifier": "head"}, {"epochs_trained": 0.0}, {"head_diverged": "True"})
    unscored = RunRecord("u", "", "FINISHED", 2, {"classifier": "head"}, {"epochs_trained": 0.0}, {"head_diverged": "False"})

    assert objective_value(diverged) == 0.0
    assert objective_value(unscored) is None
