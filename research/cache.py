"""On-disk feature cache: one folder per key, ``.npy`` arrays and a JSON manifest, no pickles.

An entry is written to a temporary folder and renamed into place, so it is complete or absent.
The manifest stores each array's sha256; an entry whose arrays do not match is rebuilt. A file
lock per key makes concurrent workers extract a key once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from research.backbone import file_sha256

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class CacheEntry:
    """Arrays of one cache entry and its manifest (file rows, timings, key fields)."""

    key: str
    path: Path
    arrays: dict[str, np.ndarray]
    manifest: dict
    hit: bool

    @property
    def rows(self) -> dict[str, int]:
        return {rel: i for i, rel in enumerate(self.manifest["files"])}


class OutputDirError(ValueError):
    """A folder the run must write to cannot be created or written; the message names the fix."""


def ensure_writable(path: Path, option: str) -> None:
    """Create folder ``path`` if needed and check that a file can be written in it.

    Raises:
        OutputDirError: The folder cannot be created (a file is in the way, say) or written.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise OutputDirError(
            f"{option}={path} cannot be written ({error.strerror or error}). Pass {option} with a folder you can write to."
        ) from error


def cache_key(fields: dict) -> str:
    """Hash the fields that change the features (model, weights, pooling, size, precision, files)."""
    text = json.dumps({"format": FORMAT_VERSION, **fields}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _load(path: Path) -> tuple[dict[str, np.ndarray], dict] | None:
    """Load an entry and verify its checksums; return None if it is absent or damaged."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        arrays = {}
        for name, digest in manifest["arrays"].items():
            file = path / f"{name}.npy"
            if file_sha256(file) != digest:
                log.warning("Feature cache %s: %s does not match its checksum; rebuilding the entry.", path, file.name)
                return None
            arrays[name] = np.load(file, allow_pickle=False)
        return arrays, manifest
    except (OSError, ValueError, KeyError) as error:
        log.warning("Feature cache %s is unreadable (%s); rebuilding the entry.", path, error)
        return None


def _write(path: Path, arrays: dict[str, np.ndarray], manifest: dict) -> None:
    """Write an entry into a temporary sibling folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        digests = {}
        for name, array in arrays.items():
            file = tmp / f"{name}.npy"
            np.save(file, array, allow_pickle=False)
            digests[name] = file_sha256(file)
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "arrays": digests}, indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_or_build(
    cache_dir: Path, fields: dict, build: Callable[[], tuple[dict[str, np.ndarray], dict]]
) -> CacheEntry:
    """Return the cached entry for ``fields``, building and storing it first when absent or damaged.

    Args:
        cache_dir: Root folder of the cache.
        fields: Everything that changes the features; must include ``files`` (relative paths in row order).
        build: Callable that extracts and returns ``(arrays, extra_manifest)``.
    """
    key = cache_key(fields)
    path = Path(cache_dir) / key
    ensure_writable(path.parent, "cache_dir")

    with FileLock(str(path) + ".lock"):
        loaded = _load(path)
        if loaded is not None:
            arrays, manifest = loaded
            log.info("Feature cache hit: %s (backbone not run).", path)
            return CacheEntry(key, path, arrays, manifest, hit=True)

        log.info("Feature cache miss: building %s.", path)
        arrays, extra = build()
        manifest = {"key": key, "fields": {k: v for k, v in fields.items() if k != "files"}, "files": fields["files"], **extra}
        _write(path, arrays, manifest)
        loaded = _load(path)
        if loaded is None:
            raise OSError(f"Feature cache entry {path} could not be read back after writing; check the disk.")
        return CacheEntry(key, path, loaded[0], loaded[1], hit=False)
