"""Shared fixtures: synthetic 15 Scene-like trees made in tmp dirs, the shared real data, isolated stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SCENE_DIR = SHARED_DATA / "15-scene"


def make_image(path: Path, seed: int, size: int = 40, mode: str = "L") -> Path:
    """Write a small random image whose mean brightness depends on the seed's class part."""
    rng = np.random.default_rng(seed)
    base = (seed // 1000) * 40 % 256
    pixels = np.clip(rng.normal(base, 30, size=(size, size)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, mode="L")
    if mode == "RGB":
        image = image.convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def make_tree(root: Path, classes: list[str], per_class: dict[str, int] | int, *, mode: str = "L", offset: int = 0) -> Path:
    """Write ``root/CLASS/image_NNNN.jpg`` files; class i gets seeds i*1000 + n."""
    for i, name in enumerate(classes):
        count = per_class[name] if isinstance(per_class, dict) else per_class
        for n in range(count):
            make_image(root / name / f"image_{n:04d}.jpg", (i + 1) * 1000 + n + offset, mode=mode)
    return root


@pytest.fixture
def presplit_tree(tmp_path: Path) -> Path:
    """A pre-split tree with 3 classes, train/Coast vs test/coast style folder names."""
    root = tmp_path / "scene"
    make_tree(root / "train", ["Coast", "MITforest", "livingroom"], 6)
    make_tree(root / "test", ["coast", "Forest", "livingRoom"], 4, offset=500)
    return root


@pytest.fixture
def isolated_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point MLflow and Optuna at stores inside the test's tmp dir and run from there."""
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    return {
        "tracking_uri": tracking_uri,
        "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
        "cache_dir": str(tmp_path / "cache"),
    }


def require_scene_data() -> Path:
    if not SCENE_DIR.is_dir():
        pytest.skip(f"real 15 Scene data not found at {SCENE_DIR}")
    return SCENE_DIR
