"""Data audit: counts, sizes, modes and identical images within and across splits."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from research.audit import audit_dataset, audit_markdown
from research.cli import main
from research.data import DatasetError, load_dataset
from tests.conftest import make_image


def test_audit_counts_and_modes(presplit_tree: Path) -> None:
    make_image(presplit_tree / "train" / "Coast" / "rgb.png", 77, size=50, mode="RGB")

    audit = audit_dataset(load_dataset(presplit_tree, seed=0))

    assert audit.n_images == 31
    assert sum(audit.counts["test"].values()) == 12
    assert audit.counts["test"]["coast"] == 4
    assert audit.sizes == {"40x40": 30, "50x50": 1}
    assert audit.modes == {"L": 30, "RGB": 1}


def test_audit_finds_duplicates(presplit_tree: Path) -> None:
    train_file = presplit_tree / "train" / "Coast" / "image_0000.jpg"
    shutil.copy(train_file, presplit_tree / "test" / "coast" / "copy_of_train.jpg")
    shutil.copy(presplit_tree / "test" / "Forest" / "image_0001.jpg", presplit_tree / "test" / "Forest" / "twin.jpg")

    audit = audit_dataset(load_dataset(presplit_tree, seed=0))

    assert len(audit.duplicates_across) == 1
    assert any("copy_of_train.jpg" in member for member in audit.duplicates_across[0])
    assert len(audit.duplicates_within) == 1
    assert any("twin.jpg" in member for member in audit.duplicates_within[0])
    assert "Identical images across splits: 1 groups" in audit_markdown(audit)


def test_audit_zero_byte_image_error(presplit_tree: Path) -> None:
    empty = presplit_tree / "test" / "coast" / "empty.jpg"
    empty.write_bytes(b"")

    with pytest.raises(DatasetError, match="empty file") as error:
        audit_dataset(load_dataset(presplit_tree, seed=0))
    assert str(empty) in str(error.value)


def test_audit_truncated_jpeg_error(presplit_tree: Path) -> None:
    source = presplit_tree / "test" / "coast" / "image_0000.jpg"
    truncated = presplit_tree / "test" / "coast" / "truncated.jpg"
    truncated.write_bytes(source.read_bytes()[:200])

    with pytest.raises(DatasetError, match="Cannot read image") as error:
        audit_dataset(load_dataset(presplit_tree, seed=0))
    assert "truncated.jpg" in str(error.value)


def test_audit_command_prints_table(presplit_tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", str(presplit_tree)]) == 0

    output = capsys.readouterr().out
    assert "livingroom" in output
    assert "Identical images across splits (leakage): 0 groups" in output


def test_audit_command_missing_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["audit", str(tmp_path / "missing")]) == 2
    assert "does not exist" in caplog.text


def test_audit_lists_every_unreadable_image(presplit_tree: Path) -> None:
    (presplit_tree / "test" / "coast" / "empty.jpg").write_bytes(b"")
    (presplit_tree / "train" / "Coast" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")

    with pytest.raises(DatasetError, match="2 images cannot be read") as error:
        audit_dataset(load_dataset(presplit_tree, seed=0))
    assert "empty.jpg" in str(error.value)
    assert "broken.jpg" in str(error.value)
