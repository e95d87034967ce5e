"""Dataset scanning: layouts, class aliases, splits, grayscale input and bad folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from research.data import CANONICAL_CLASSES, DatasetError, canonical_class_name, load_dataset, open_rgb
from tests.conftest import make_image, make_tree, require_scene_data


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("MITcoast", "coast"),
        ("Coast", "coast"),
        ("coast", "coast"),
        ("CALsuburb", "suburb"),
        ("PARoffice", "office"),
        ("livingRoom", "livingroom"),
        ("living_room", "livingroom"),
        ("TallBuilding", "tallbuilding"),
        ("MITtallbuilding", "tallbuilding"),
        ("OpenCountry", "opencountry"),
        ("Insidecity", "insidecity"),
    ],
)
def test_canonical_class_name(folder: str, expected: str) -> None:
    assert canonical_class_name(folder) == expected


def test_unknown_class_name_folds_case() -> None:
    assert canonical_class_name("Zebra Crossing") == "zebracrossing"


def test_presplit_matches_aliases(presplit_tree: Path) -> None:
    dataset = load_dataset(presplit_tree, seed=0)

    assert dataset.layout == "pre-split"
    assert dataset.classes == ["coast", "forest", "livingroom"]
    assert len(dataset.test) == 12
    assert len(dataset.train) + len(dataset.val) == 18


def test_flat_tree_uses_protocol_split(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "flat", ["MITcoast", "bedroom"], {"MITcoast": 8, "bedroom": 10})

    dataset = load_dataset(root, seed=3, train_per_class=5, val_fraction=0.2)

    assert dataset.layout == "flat"
    assert dataset.classes == ["bedroom", "coast"]
    train_val = dataset.train + dataset.val
    assert sum(1 for s in train_val if s.label == 0) == 5
    assert sum(1 for s in train_val if s.label == 1) == 5
    assert sum(1 for s in dataset.test if s.label == 0) == 5
    assert sum(1 for s in dataset.test if s.label == 1) == 3


def test_splits_are_disjoint_and_seeded(presplit_tree: Path) -> None:
    first = load_dataset(presplit_tree, seed=1)
    again = load_dataset(presplit_tree, seed=1)
    other = load_dataset(presplit_tree, seed=2)

    paths = {name: {s.path for s in first.split(name)} for name in ("train", "val", "test")}
    assert not paths["train"] & paths["val"]
    assert not paths["train"] & paths["test"]
    assert not paths["val"] & paths["test"]
    assert [s.path for s in again.val] == [s.path for s in first.val]
    assert [s.path for s in other.val] != [s.path for s in first.val]


def test_validation_is_stratified(presplit_tree: Path) -> None:
    dataset = load_dataset(presplit_tree, seed=0, val_fraction=0.34)

    per_class = [sum(1 for s in dataset.val if s.label == label) for label in range(3)]
    assert per_class == [2, 2, 2]


def test_limit_per_class(presplit_tree: Path) -> None:
    dataset = load_dataset(presplit_tree, seed=0, limit_per_class=3)

    assert len(dataset.train) + len(dataset.val) == 9
    assert len(dataset.test) == 9


def test_grayscale_becomes_rgb(tmp_path: Path) -> None:
    gray = make_image(tmp_path / "gray.jpg", 1, mode="L")
    gray_as_rgb = make_image(tmp_path / "gray_rgb.png", 2, mode="RGB")

    for path in (gray, gray_as_rgb):
        image = open_rgb(path)
        assert image.mode == "RGB"
        assert len(image.getbands()) == 3


def test_missing_folder_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist") as error:
        load_dataset(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value)


def test_no_class_folders_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="No class folders"):
        load_dataset(tmp_path / "empty")


def test_empty_class_error(presplit_tree: Path) -> None:
    (presplit_tree / "test" / "coast").rename(presplit_tree / "test" / "old")
    (presplit_tree / "test" / "coast").mkdir()
    with pytest.raises(DatasetError, match="contains no image files") as error:
        load_dataset(presplit_tree)
    assert "coast" in str(error.value)


def test_missing_test_folder_error(presplit_tree: Path) -> None:
    (presplit_tree / "test").rename(presplit_tree / "elsewhere")
    with pytest.raises(DatasetError, match="no test/ folder"):
        load_dataset(presplit_tree)


def test_different_class_sets_error(presplit_tree: Path) -> None:
    (presplit_tree / "test" / "Forest").rename(presplit_tree / "test" / "mountain")
    with pytest.raises(DatasetError, match="differ") as error:
        load_dataset(presplit_tree)
    assert "forest" in str(error.value)
    assert "mountain" in str(error.value)


def test_two_folders_one_class_error(presplit_tree: Path) -> None:
    make_tree(presplit_tree / "train", ["MITcoast"], 2)
    with pytest.raises(DatasetError, match="both map to class 'coast'"):
        load_dataset(presplit_tree)


def test_non_image_file_skipped(presplit_tree: Path) -> None:
    notes = presplit_tree / "train" / "Coast" / "notes.txt"
    notes.write_text("not an image")
    (presplit_tree / "train" / "Coast" / ".DS_Store").write_bytes(b"\0")

    dataset = load_dataset(presplit_tree)

    assert dataset.skipped == [str(notes)]
    assert all(s.path.suffix == ".jpg" for s in dataset.train + dataset.val + dataset.test)


def test_corrupt_image_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(DatasetError, match="Cannot read image") as error:
        open_rgb(broken)
    assert str(broken) in str(error.value)


def test_real_scene_classes() -> None:
    root = require_scene_data()

    dataset = load_dataset(root, seed=0, limit_per_class=2)

    assert dataset.layout == "pre-split"
    assert dataset.classes == sorted(CANONICAL_CLASSES)
    assert len(dataset.test) == 30
