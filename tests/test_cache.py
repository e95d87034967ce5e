"""Feature cache integrity: checksums catch damaged entries, one extraction per key under concurrency."""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest

from research.cache import MANIFEST, OutputDirError, cache_key, load_or_build

FIELDS = {"model": "tiny", "weights": "random", "files": ["a.jpg", "b.jpg"]}


def _arrays() -> dict[str, np.ndarray]:
    return {"pre_logits": np.arange(8, dtype=np.float32).reshape(2, 4)}


def _build_counting(counter: list[int]):
    def build():
        counter.append(1)
        return _arrays(), {"images_per_second": 1.0}

    return build


def test_truncated_array_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    builds: list[int] = []
    first = load_or_build(tmp_path, FIELDS, _build_counting(builds))
    array_file = first.path / "pre_logits.npy"
    array_file.write_bytes(array_file.read_bytes()[:-5])

    with caplog.at_level(logging.WARNING, logger="research.cache"):
        second = load_or_build(tmp_path, FIELDS, _build_counting(builds))

    assert len(builds) == 2
    assert second.hit is False
    assert np.array_equal(second.arrays["pre_logits"], _arrays()["pre_logits"])
    assert "pre_logits.npy does not match its checksum; rebuilding" in caplog.text
    assert str(first.path) in caplog.text


def test_corrupt_manifest_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    builds: list[int] = []
    entry = load_or_build(tmp_path, FIELDS, _build_counting(builds))
    (entry.path / MANIFEST).write_text('{"arrays": ')

    with caplog.at_level(logging.WARNING, logger="research.cache"):
        load_or_build(tmp_path, FIELDS, _build_counting(builds))

    assert len(builds) == 2
    assert "is unreadable" in caplog.text


def test_intact_entry_is_hit(tmp_path: Path) -> None:
    builds: list[int] = []
    load_or_build(tmp_path, FIELDS, _build_counting(builds))
    again = load_or_build(tmp_path, FIELDS, _build_counting(builds))

    assert len(builds) == 1
    assert again.hit is True


def test_entry_has_no_pickles(tmp_path: Path) -> None:
    entry = load_or_build(tmp_path, FIELDS, _build_counting([]))
    files = sorted(p.name for p in entry.path.iterdir())

    assert files == [MANIFEST, "pre_logits.npy"]
    json.loads((entry.path / MANIFEST).read_text())
    loaded = np.load(entry.path / "pre_logits.npy", allow_pickle=False)
    assert loaded.dtype == np.float32


def _slow_build_worker(cache_dir: str, log_dir: str) -> None:
    def build():
        marker = Path(log_dir) / f"build-{multiprocessing.current_process().pid}"
        marker.write_text("built")
        time.sleep(1.0)
        return _arrays(), {"images_per_second": 1.0}

    entry = load_or_build(Path(cache_dir), FIELDS, build)
    (Path(log_dir) / f"hit-{multiprocessing.current_process().pid}").write_text(str(entry.hit))


def test_concurrent_workers_extract_once(tmp_path: Path) -> None:
    cache_dir, log_dir = tmp_path / "cache", tmp_path / "log"
    log_dir.mkdir()
    # fork: the children need no re-import of torch, so the test takes seconds.
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_slow_build_worker, args=(str(cache_dir), str(log_dir))) for _ in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)

    assert [p.exitcode for p in processes] == [0, 0, 0]
    assert len(list(log_dir.glob("build-*"))) == 1
    hits = sorted(p.read_text() for p in log_dir.glob("hit-*"))
    assert hits == ["False", "True", "True"]
    assert [p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock")] == [cache_key(FIELDS)]


def test_unwritable_cache_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")

    with pytest.raises(OutputDirError) as error:
        load_or_build(blocker / "cache", FIELDS, _build_counting([]))

    assert f"cache_dir={blocker / 'cache'}" in str(error.value)
    assert "Pass cache_dir with a folder you can write to" in str(error.value)
