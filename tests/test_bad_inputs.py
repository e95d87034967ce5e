"""Bad input: each case stops with a message naming the value and the fix, or is skipped and listed.

Decisions: an unreadable image (corrupt, truncated, zero bytes) stops the run, because dropping it
would silently change the splits that trials are compared on. A file that is not an image by its
suffix (notes, thumbnails) is skipped, logged and listed in the audit.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
import torch

from research import backbone
from research.audit import audit_dataset, audit_markdown
from research.backbone import Weights, WeightsError, create_backbone, resolve_weights
from research.cli import main
from research.data import DatasetError, load_dataset
from research.optimize import StorageError, open_storage
from research.studies import StudyConfigError, load_study, study_path
from research.workers import check_tracking_server
from tests.conftest import make_image, make_tree


def _run_cli(arguments: list[str], caplog: pytest.LogCaptureFixture) -> tuple[int, str]:
    with caplog.at_level(logging.ERROR, logger="research"):
        code = main(arguments)
    return code, caplog.text


def _sweep(data_dir: Path, stores: dict, *extra: str) -> list[str]:
    return [
        "sweep", "--data-dir", str(data_dir), "--study", "svm", "--n-trials", "1", "--backbone", "vgg16",
        "--weights", "none", "--image-size", "32", "--storage", stores["storage"], "--cache-dir", stores["cache_dir"],
        "--seeds", "1", *extra,
    ]


def test_corrupt_jpeg_stops(presplit_tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    broken = presplit_tree / "train" / "Coast" / "image_0001.jpg"
    broken.write_bytes(broken.read_bytes()[:200])

    code, text = _run_cli(["audit", str(presplit_tree)], caplog)

    assert code == 2
    assert f"Cannot read image {broken}" in text
    assert "Replace or delete the file" in text


def test_zero_byte_image_stops(presplit_tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    empty = presplit_tree / "test" / "coast" / "image_0002.jpg"
    empty.write_bytes(b"")

    code, text = _run_cli(["audit", str(presplit_tree)], caplog)

    assert code == 2
    assert f"Image {empty} is an empty file (0 bytes)" in text
    assert "Replace or delete it" in text


def test_non_image_file_skipped_and_listed(presplit_tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    notes = presplit_tree / "train" / "MITforest" / "notes.txt"
    notes.write_text("not an image")

    with caplog.at_level(logging.WARNING, logger="research.data"):
        dataset = load_dataset(presplit_tree)
    audit = audit_dataset(dataset)

    assert f"Skipping {notes}: not an image file" in caplog.text
    assert audit.skipped_files == [str(notes)]
    assert audit.to_json()["skipped_files"] == [str(notes)]
    assert f"- {notes}" in audit_markdown(audit)
    assert "## Skipped files: 1" in audit_markdown(audit)


def test_empty_class_stops(presplit_tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    empty = presplit_tree / "test" / "street"
    empty.mkdir()
    (presplit_tree / "train" / "street").mkdir()
    make_image(presplit_tree / "train" / "street" / "a.jpg", 1)

    code, text = _run_cli(["audit", str(presplit_tree)], caplog)

    assert code == 2
    assert f"Class folder {empty} contains no image files" in text
    assert "Add images or remove the folder" in text


@pytest.mark.parametrize("missing", ["train", "test"])
def test_missing_split_folder_stops(tmp_path: Path, missing: str) -> None:
    present = "test" if missing == "train" else "train"
    make_tree(tmp_path / present, ["coast", "forest"], 3)

    with pytest.raises(DatasetError) as error:
        load_dataset(tmp_path)

    assert f"has a {present}/ folder but no {missing}/ folder" in str(error.value)
    assert f"Add {tmp_path}/{missing}/CLASS/*" in str(error.value)


def test_different_class_sets_stop(tmp_path: Path) -> None:
    make_tree(tmp_path / "train", ["coast", "forest"], 3)
    make_tree(tmp_path / "test", ["coast", "kitchen"], 3)

    with pytest.raises(DatasetError) as error:
        load_dataset(tmp_path)

    assert "only in train: ['forest']" in str(error.value)
    assert "only in test: ['kitchen']" in str(error.value)
    assert "Both splits need the same classes" in str(error.value)


def test_unknown_study_name(presplit_tree: Path, isolated_stores: dict, caplog: pytest.LogCaptureFixture) -> None:
    arguments = _sweep(presplit_tree, isolated_stores)
    arguments[arguments.index("svm")] = "no_such_study"

    code, text = _run_cli(arguments, caplog)

    assert code == 2
    assert "Study 'no_such_study' not found" in text
    assert "Known studies:" in text
    assert "svm" in text.split("Known studies:")[1]


@pytest.mark.parametrize("name", ["../svm", "/etc/passwd", "sub/svm", "..", "svm/../../x"])
def test_path_like_study_name_rejected(name: str) -> None:
    with pytest.raises(StudyConfigError) as error:
        study_path(name)

    assert f"Study name {name!r} is invalid" in str(error.value)
    assert "without any folder" in str(error.value)


STUDY_FILES = {
    "malformed": ("classifier: svm\nparams: {svm_C: {type: float, low: 1\n", "is not valid YAML"),
    "low_above_high": ("classifier: svm\nparams:\n  svm_C: {type: float, low: 10.0, high: 1.0}\n", "low = 10.0 must be smaller than high = 1.0"),
    "log_nonpositive": ("classifier: svm\nparams:\n  svm_C: {type: float, low: 0.0, high: 1.0, log: true}\n", "low = 0.0 must be positive on a log scale"),
    "text_bound": ("classifier: svm\nparams:\n  svm_C: {type: float, low: small, high: 1.0}\n", "low = 'small' is invalid: expected a number"),
    "unknown_key": ("classifier: svm\ntrials: 5\nparams:\n  svm_C: {type: float, low: 0.1, high: 1.0}\n", "unknown keys ['trials']"),
    "unknown_pooling": (
        "classifier: svm\nparams:\n  pooling: {type: categorical, choices: [max, median]}\n  svm_C: {type: float, low: 0.1, high: 1.0}\n",
        "pooling ['median'] is invalid; use one of max, avg, lp1, lp2",
    ),
}


@pytest.mark.parametrize("case", sorted(STUDY_FILES))
def test_bad_study_file(tmp_path: Path, case: str) -> None:
    text, expected = STUDY_FILES[case]
    (tmp_path / f"{case}.yaml").write_text(text)

    with pytest.raises(StudyConfigError) as error:
        load_study(case, tmp_path)

    assert expected in str(error.value)
    assert str(tmp_path / f"{case}.yaml") in str(error.value) or f"{case}.yaml" in str(error.value)


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("--n-trials", "0", "n_trials=0 is invalid; it must be at least 1."),
    ("--image-size", "8", "image_size=8 is invalid; it must be at least 32."),
    ("--workers", "0", "workers=0 is invalid; it must be at least 1."),
])
def test_out_of_range_option(presplit_tree: Path, isolated_stores: dict, caplog: pytest.LogCaptureFixture, option: str, value: str, expected: str) -> None:
    code, text = _run_cli(_sweep(presplit_tree, isolated_stores, option, value), caplog)

    assert code == 2
    assert expected in text


def test_imagenet_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(backbone.socket, "create_connection", no_network)

    with pytest.raises(WeightsError) as error:
        resolve_weights("vgg16", "imagenet")

    assert "weights=imagenet" in str(error.value)
    assert "'vgg16' cannot be downloaded" in str(error.value)
    assert "(--weights, or -P weights=... under mlflow run) to a local checkpoint file, or to none" in str(error.value)
    assert socket.create_connection is no_network


def test_unwritable_cache_dir_stops(presplit_tree: Path, isolated_stores: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    stores = {**isolated_stores, "cache_dir": str(blocker / "cache")}

    code, text = _run_cli(_sweep(presplit_tree, stores), caplog)

    assert code == 2
    assert f"cache_dir={blocker / 'cache'} cannot be written" in text
    assert "Pass cache_dir with a folder you can write to" in text


def test_unreachable_postgres_storage() -> None:
    url = "postgresql://sweeper:secret-password@127.0.0.1:9/optuna"

    with pytest.raises(StorageError) as error:
        open_storage(url)

    message = str(error.value)
    assert "postgresql://sweeper:***@127.0.0.1:9/optuna cannot be reached" in message
    assert "secret-password" not in message
    assert "Check that the database server is running" in message


@pytest.mark.parametrize(("url", "expected"), [
    ("sqlite:////no/such/folder/optuna.db", "folder /no/such/folder does not exist"),
    ("redis://127.0.0.1/0", "'redis://127.0.0.1/0' is invalid: use sqlite:///PATH"),
    ("/no/such/folder/journal.log", "folder /no/such/folder does not exist"),
])
def test_invalid_storage_url(url: str, expected: str) -> None:
    with pytest.raises(StorageError) as error:
        open_storage(url)

    assert expected in str(error.value)


def test_unreachable_tracking_server() -> None:
    with pytest.raises(ConnectionError) as error:
        check_tracking_server("http://127.0.0.1:9")

    assert "MLflow tracking server http://127.0.0.1:9 cannot be reached" in str(error.value)
    assert "fix MLFLOW_TRACKING_URI" in str(error.value)


class NotWeights:
    """An arbitrary object: loading it from a checkpoint needs full unpickling."""


def test_pickled_checkpoint_rejected(tmp_path: Path) -> None:
    model = backbone.timm.create_model("resnet18", pretrained=False)
    checkpoint = tmp_path / "resnet18.pth"
    torch.save({"state_dict": model.state_dict(), "extra": NotWeights()}, checkpoint)
    weights = Weights(str(checkpoint), "file", checkpoint.name, "digest")

    with pytest.raises(WeightsError) as error:
        create_backbone("resnet18", weights)

    assert f"Loading weights '{checkpoint}' into 'resnet18' failed" in str(error.value)
    assert "weights_only" in str(error.value) or "Unsupported global" in str(error.value)
