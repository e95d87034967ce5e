"""Data audit: images per class and split, sizes and modes, and identical images within and across splits."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from research.data import Dataset, DatasetError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class Audit:
    """Findings of the data audit; every field is JSON-serialisable."""

    root: str
    layout: str
    classes: list[str]
    counts: dict[str, dict[str, int]]
    sizes: dict[str, int]
    modes: dict[str, int]
    duplicates_within: list[list[str]]
    duplicates_across: list[list[str]]
    skipped_files: list[str]
    file_digests: dict[str, str] = field(repr=False)

    @property
    def n_images(self) -> int:
        return sum(sum(per_class.values()) for per_class in self.counts.values())

    def to_json(self) -> dict:
        """Return the audit as a dict, without the per-file digests."""
        data = {key: value for key, value in self.__dict__.items() if key != "file_digests"}
        data["n_images"] = self.n_images
        return data


def _read_image(path) -> tuple[str, str, str, str]:
    """Return the file's sha256, its decoded pixels' sha256, its size as WxH and its mode."""
    raw = path.read_bytes()
    if not raw:
        raise DatasetError(f"Image {path} is an empty file (0 bytes). Replace or delete it.")
    try:
        with Image.open(path) as image:
            image.load()
            pixels = hashlib.sha256(image.mode.encode() + str(image.size).encode() + image.tobytes()).hexdigest()
            return hashlib.sha256(raw).hexdigest(), pixels, f"{image.width}x{image.height}", image.mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DatasetError(
            f"Cannot read image {path}: {error}. Replace or delete the file (it is truncated or not an image)."
        ) from error


def _raise_unreadable(errors: list[DatasetError], shown: int = 20) -> None:
    """Raise one error that lists every unreadable image, so a user can fix them all at once."""
    if not errors:
        return
    if len(errors) == 1:
        raise errors[0]
    lines = [f"- {error}" for error in errors[:shown]]
    if len(errors) > shown:
        lines.append(f"- ... and {len(errors) - shown} more")
    raise DatasetError(f"{len(errors)} images cannot be read; replace or delete them:\n" + "\n".join(lines))


def audit_dataset(dataset: Dataset, progress=None) -> Audit:
    """Read every image of the dataset once and summarise it.

    Two images are identical when their decoded pixels are equal, whatever their file names or
    encodings. Groups are listed within one split and across splits (the latter is leakage).

    Args:
        dataset: The scanned dataset.
        progress: Optional callable invoked with the number of images read after each image.

    Raises:
        DatasetError: An image file is empty, truncated or not decodable.
    """
    counts = {split: {name: 0 for name in dataset.classes} for split in SPLITS}
    sizes: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    digests: dict[str, str] = {}

    unreadable: list[DatasetError] = []
    for split in SPLITS:
        for sample in dataset.split(split):
            try:
                file_digest, pixel_digest, size, mode = _read_image(sample.path)
            except DatasetError as error:
                unreadable.append(error)
                continue
            counts[split][dataset.classes[sample.label]] += 1
            sizes[size] += 1
            modes[mode] += 1
            rel = str(sample.path.relative_to(dataset.root))
            groups[pixel_digest].append((split, rel))
            digests[rel] = file_digest
            if progress is not None:
                progress(1)

    _raise_unreadable(unreadable)

    within, across = [], []
    for members in groups.values():
        if len(members) < 2:
            continue
        paths = [f"{split}:{rel}" for split, rel in members]
        (across if len({split for split, _ in members}) > 1 else within).append(paths)

    result = Audit(
        root=str(dataset.root),
        layout=dataset.layout,
        classes=dataset.classes,
        counts=counts,
        sizes=dict(sizes.most_common()),
        modes=dict(modes.most_common()),
        duplicates_within=sorted(within),
        duplicates_across=sorted(across),
        skipped_files=list(dataset.skipped),
        file_digests=digests,
    )
    log.info(
        "Audit: %d images, %d groups of identical images within a split, %d across splits.",
        result.n_images, len(within), len(across),
    )
    return result


def audit_markdown(audit: Audit) -> str:
    """Format the audit as a markdown document."""
    lines = [f"# Data audit of {audit.root}", "", f"Layout: {audit.layout}. Images: {audit.n_images}.", ""]
    lines += ["| class | train | val | test |", "|---|---:|---:|---:|"]
    for name in audit.classes:
        lines.append(f"| {name} | " + " | ".join(str(audit.counts[s][name]) for s in SPLITS) + " |")
    totals = " | ".join(str(sum(audit.counts[s].values())) for s in SPLITS)
    lines += [f"| **total** | {totals} |", ""]
    lines.append("Image sizes: " + ", ".join(f"{size} ({n})" for size, n in audit.sizes.items()) + ".")
    lines.append("Image modes: " + ", ".join(f"{mode} ({n})" for mode, n in audit.modes.items()) + ".")
    lines.append("")
    for title, groups in (("within a split", audit.duplicates_within), ("across splits", audit.duplicates_across)):
        lines.append(f"## Identical images {title}: {len(groups)} groups")
        lines += [f"- {', '.join(group)}" for group in groups] or ["- none"]
        lines.append("")
    lines.append(f"## Skipped files: {len(audit.skipped_files)}")
    lines += [f"- {path}" for path in audit.skipped_files] or ["- none"]
    return "\n".join(lines) + "\n"
