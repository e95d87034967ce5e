"""15 Scene image folders: class discovery, train/validation/test splits and image loading.

Two layouts are accepted:

* pre-split: ``DATA_DIR/train/CLASS/*`` and ``DATA_DIR/test/CLASS/*``;
* flat: ``DATA_DIR/CLASS/*``, split by the standard 15 Scene protocol (Lazebnik et al., CVPR 2006):
  100 images per class for training, the rest for testing, drawn with a seed.

Class folders are matched case-insensitively and through the known names of the 15 Scene
distributions (``MITcoast``, ``CALsuburb``, ``PARoffice``, ``livingRoom``, ...), and every class is
reported under one canonical name.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"})
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini"})
TRAIN_PER_CLASS = 100

# Canonical 15 Scene class names. The keys are folded spellings seen in the published copies:
# the original distribution prefixes some classes with the lab that collected them (MIT, CAL, PAR).
CANONICAL_CLASSES = (
    "bedroom",
    "coast",
    "forest",
    "highway",
    "industrial",
    "insidecity",
    "kitchen",
    "livingroom",
    "mountain",
    "office",
    "opencountry",
    "store",
    "street",
    "suburb",
    "tallbuilding",
)
_ALIASES = {
    "calsuburb": "suburb",
    "mitcoast": "coast",
    "mitforest": "forest",
    "mithighway": "highway",
    "mitinsidecity": "insidecity",
    "mitmountain": "mountain",
    "mitopencountry": "opencountry",
    "mitstreet": "street",
    "mittallbuilding": "tallbuilding",
    "paroffice": "office",
    "insidecities": "insidecity",
}


class DatasetError(ValueError):
    """Invalid dataset folder or image, with the path at fault and the fix in the message."""


@dataclass(frozen=True)
class Sample:
    """One image file and the index of its class."""

    path: Path
    label: int


@dataclass
class Dataset:
    """Class names and the three splits of one image folder."""

    root: Path
    layout: str
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    skipped: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[Sample]:
        """Return the samples of split ``name`` (``train``, ``val`` or ``test``)."""
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def canonical_class_name(folder_name: str) -> str:
    """Map a class folder name to its canonical 15 Scene name.

    Case, spaces, hyphens and underscores are ignored. A name that is not a known 15 Scene class is
    returned folded to lower case, so that other datasets still work with the same matching rule.
    """
    folded = re.sub(r"[\s_\-]+", "", folder_name).lower()
    return _ALIASES.get(folded, folded)


def _is_hidden_or_system(path: Path) -> bool:
    return path.name.startswith(".") or path.name.lower() in IGNORED_NAMES


def _class_folders(split_dir: Path) -> dict[str, Path]:
    """Find the class folders of one split and key them by canonical name."""
    folders = [p for p in sorted(split_dir.iterdir()) if p.is_dir() and not _is_hidden_or_system(p)]
    if not folders:
        raise DatasetError(
            f"No class folders found in {split_dir}. Expected one sub-folder per class "
            f"(for example {split_dir}/coast/*.jpg)."
        )

    by_name: dict[str, Path] = {}
    for folder in folders:
        name = canonical_class_name(folder.name)
        if name in by_name:
            raise DatasetError(
                f"Folders {by_name[name]} and {folder} both map to class '{name}'. "
                "Merge them or rename one of them."
            )
        by_name[name] = folder
    return by_name


def _image_files(folder: Path, skipped: list[str]) -> list[Path]:
    """List the image files of a class folder; other files are skipped and recorded."""
    images = []
    for path in sorted(folder.iterdir()):
        if path.is_dir() or _is_hidden_or_system(path):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        else:
            skipped.append(str(path))
            log.warning("Skipping %s: not an image file (suffix %r).", path, path.suffix)
    if not images:
        raise DatasetError(
            f"Class folder {folder} contains no image files. Add images or remove the folder."
        )
    return images


def _find_split_dir(root: Path, name: str) -> Path | None:
    for child in root.iterdir():
        if child.is_dir() and child.name.lower() == name:
            return child
    return None


def _scan_split(split_dir: Path, skipped: list[str]) -> dict[str, list[Path]]:
    return {name: _image_files(folder, skipped) for name, folder in _class_folders(split_dir).items()}


def _check_same_classes(train: dict[str, list[Path]], test: dict[str, list[Path]], root: Path) -> None:
    only_train = sorted(set(train) - set(test))
    only_test = sorted(set(test) - set(train))
    if only_train or only_test:
        raise DatasetError(
            f"Train and test class folders of {root} differ: only in train: {only_train or 'none'}; "
            f"only in test: {only_test or 'none'}. Both splits need the same classes."
        )


def _protocol_split(
    files: dict[str, list[Path]], train_per_class: int, rng: np.random.Generator
) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Split a flat tree: ``train_per_class`` random images per class for training, the rest for testing."""
    train, test = {}, {}
    for name, paths in files.items():
        if len(paths) <= train_per_class:
            raise DatasetError(
                f"Class '{name}' has {len(paths)} images, but the flat-layout protocol takes "
                f"{train_per_class} per class for training and needs at least one more for testing. "
                "Add images, or pass a pre-split tree with train/ and test/ folders."
            )
        order = rng.permutation(len(paths))
        train[name] = [paths[i] for i in sorted(order[:train_per_class])]
        test[name] = [paths[i] for i in sorted(order[train_per_class:])]
    return train, test


def _limit(files: dict[str, list[Path]], limit_per_class: int, rng: np.random.Generator) -> dict[str, list[Path]]:
    if limit_per_class <= 0:
        return files
    limited = {}
    for name, paths in files.items():
        if len(paths) > limit_per_class:
            chosen = sorted(rng.choice(len(paths), size=limit_per_class, replace=False))
            paths = [paths[i] for i in chosen]
        limited[name] = paths
    return limited


def _carve_validation(
    train: dict[str, list[Path]], val_fraction: float, rng: np.random.Generator
) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Move a stratified random fraction of each training class to the validation split."""
    kept, val = {}, {}
    for name, paths in train.items():
        n_val = int(round(len(paths) * val_fraction))
        n_val = min(max(n_val, 1), len(paths) - 1)
        if len(paths) < 2:
            raise DatasetError(
                f"Class '{name}' has {len(paths)} training image; at least 2 are needed to carve a "
                "validation split. Add images or raise limit_per_class."
            )
        order = rng.permutation(len(paths))
        val[name] = [paths[i] for i in sorted(order[:n_val])]
        kept[name] = [paths[i] for i in sorted(order[n_val:])]
    return kept, val


def _samples(files: dict[str, list[Path]], classes: list[str]) -> list[Sample]:
    index = {name: i for i, name in enumerate(classes)}
    return [Sample(path, index[name]) for name in classes for path in files[name]]


def load_dataset(
    root: str | Path,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    limit_per_class: int = 0,
    train_per_class: int = TRAIN_PER_CLASS,
) -> Dataset:
    """Scan an image folder and build its train, validation and test splits.

    Args:
        root: Dataset folder, pre-split (``train/``, ``test/``) or flat (one folder per class).
        seed: Seed of every random draw (protocol split, limit, validation carve-out).
        val_fraction: Fraction of each training class moved to the validation split.
        limit_per_class: If positive, keep at most this many images per class in train and in test
            (before the validation carve-out), for quick runs.
        train_per_class: Training images per class when a flat tree is split.

    Raises:
        DatasetError: The folder is missing, has no class folders, has an empty class, or its train
            and test classes differ.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"Dataset folder {root} does not exist or is not a folder. Pass the 15 Scene folder that "
            "contains train/ and test/, or one folder per class."
        )
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction={val_fraction} is invalid; use a value between 0 and 1 (for example 0.2).")

    skipped: list[str] = []
    train_dir, test_dir = _find_split_dir(root, "train"), _find_split_dir(root, "test")
    if (train_dir is None) != (test_dir is None):
        present, missing = ("train", "test") if train_dir else ("test", "train")
        raise DatasetError(
            f"{root} has a {present}/ folder but no {missing}/ folder. Add {root}/{missing}/CLASS/*, "
            f"or remove {present}/ and pass one folder per class to split by the standard protocol."
        )

    rng = np.random.default_rng(seed)
    if train_dir is not None:
        layout = "pre-split"
        train_files, test_files = _scan_split(train_dir, skipped), _scan_split(test_dir, skipped)
        _check_same_classes(train_files, test_files, root)
    else:
        layout = "flat"
        train_files, test_files = _protocol_split(_scan_split(root, skipped), train_per_class, rng)

    classes = sorted(train_files)
    train_files = _limit(train_files, limit_per_class, rng)
    test_files = _limit(test_files, limit_per_class, rng)
    train_files, val_files = _carve_validation(train_files, val_fraction, rng)

    dataset = Dataset(
        root=root,
        layout=layout,
        classes=classes,
        train=_samples(train_files, classes),
        val=_samples(val_files, classes),
        test=_samples(test_files, classes),
        skipped=skipped,
    )
    log.info(
        "Dataset %s (%s): %d classes, %d train, %d validation, %d test images.",
        root, layout, len(classes), len(dataset.train), len(dataset.val), len(dataset.test),
    )
    return dataset


def open_rgb(path: Path) -> Image.Image:
    """Decode an image file as 3-channel RGB; grayscale and palette images are converted.

    Raises:
        DatasetError: The file is empty, truncated or not a decodable image.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DatasetError(
            f"Cannot read image {path}: {error}. Replace or delete the file (it is empty, truncated "
            "or not an image)."
        ) from error
