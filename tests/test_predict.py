"""ImageNet top classes of pictures, first-convolution feature maps, and the MLflow runs that log them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from research.backbone import Weights, create_backbone
from research.featuremaps import compute_feature_maps, first_convolution, map_statistics, run_featuremaps
from research.plots import threshold_masks
from research.predict import class_names, run_predict, top_classes
from tests.conftest import SHARED_DATA, make_image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RANDOM = Weights("none", "random", "random", "random")


def _artifact_bytes(client: MlflowClient, run_id: str, path: str, tmp_path: Path) -> bytes:
    return Path(client.download_artifacts(run_id, path, str(tmp_path))).read_bytes()


def test_top_classes_names_and_order() -> None:
    model = timm.create_model("resnet18", pretrained=False)
    logits = torch.zeros(1000)
    logits[352] = 5.0
    logits[353] = 4.0
    top = top_classes(logits, class_names(model), 5)

    assert [entry["index"] for entry in top[:2]] == [352, 353]
    assert top[0]["label"] == "impala"
    assert top[1]["label"] == "gazelle"
    assert top[0]["probability"] == pytest.approx(float(torch.softmax(logits, 0)[352]))
    assert all(a["probability"] >= b["probability"] for a, b in zip(top, top[1:]))
    assert len(top) == 5


def test_predict_logs_run(tmp_path: Path, isolated_stores: dict) -> None:
    picture = make_image(tmp_path / "pics" / "noise.png", 3000, size=64, mode="RGB")
    result = run_predict([str(picture)], backbone="resnet18", weights="none", experiment="test-predict", top_k=5)
    client = MlflowClient()
    run = client.get_run(result["run_id"])

    assert run.data.tags["research.command"] == "predict"
    assert run.data.tags["weights_random"] == "True"
    assert run.data.params["top_k"] == "5"
    data = json.loads(_artifact_bytes(client, result["run_id"], "predict/predictions.json", tmp_path))
    assert [record["image"] for record in data["images"]] == ["noise.png"]
    top = data["images"][0]["top"]
    assert len(top) == 5
    assert top[0]["label"] == result["predictions"][0]["top1"]
    assert sum(entry["probability"] for entry in top) <= 1.0 + 1e-6
    for lang in ("en", "fr"):
        figure = _artifact_bytes(client, result["run_id"], f"predict/{lang}/00-noise.png", tmp_path / lang)
        assert figure.startswith(PNG_SIGNATURE)


def test_predict_missing_image(isolated_stores: dict) -> None:
    with pytest.raises(FileNotFoundError, match="missing-picture.jpg"):
        run_predict(["missing-picture.jpg"], backbone="resnet18", weights="none")


def test_predict_real_photo_impala(isolated_stores: dict) -> None:
    weights = SHARED_DATA / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    photo = SHARED_DATA / "photos" / "impala-pixabay-1029784.jpg"
    if not (weights.is_file() and photo.is_file()):
        pytest.skip(f"real weights or photo not found under {SHARED_DATA}")
    result = run_predict([str(photo)], backbone="tf_efficientnet_lite0", weights=str(weights), experiment="test-predict")

    assert result["predictions"][0]["top1"] == "impala"
    assert result["predictions"][0]["probability"] > 0.5


def test_featuremaps_vgg16_has_64_maps(tmp_path: Path) -> None:
    picture = make_image(tmp_path / "picture.png", 2000, size=64, mode="RGB")
    model = create_backbone("vgg16", RANDOM)
    result = compute_feature_maps(model, picture, device=torch.device("cpu"))

    assert result.layer == "features.0"
    assert result.maps.shape == (64, 224, 224)
    assert result.picture.shape == (224, 224)
    assert result.picture.min() >= 0.0
    assert result.picture.max() <= 1.0


def test_first_convolution_missing() -> None:
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        first_convolution(torch.nn.Sequential(torch.nn.Linear(3, 3)))


def test_threshold_masks_mark_top_values() -> None:
    maps = np.zeros((2, 10, 10), dtype=np.float32)
    maps[0, 0, :5] = 1.0
    maps[1] = -1.0  # a map with no positive value marks nothing
    masks = threshold_masks(maps, 0.95)

    assert masks[0].sum() == 5
    assert masks[0, 0, :5].all()
    assert not masks[1].any()


def test_map_statistics_order() -> None:
    maps = np.stack([np.full((4, 4), value, dtype=np.float32) for value in (0.5, 2.0, 1.0)])
    stats = map_statistics(maps)

    assert stats["most_active"] == [1, 2, 0]
    assert stats["mean"] == [0.5, 2.0, 1.0]


def test_featuremaps_logs_run(tmp_path: Path, isolated_stores: dict) -> None:
    picture = make_image(tmp_path / "pics" / "gray.jpg", 1000, size=48)
    result = run_featuremaps([str(picture)], backbone="resnet18", weights="none", experiment="test-maps", quantile=0.9)
    client = MlflowClient()

    assert result["n_maps"] == [64]
    data = json.loads(_artifact_bytes(client, result["run_id"], "featuremaps/featuremaps.json", tmp_path))
    record = data["images"][0]
    assert record["layer"] == "conv1"
    assert record["n_maps"] == 64
    assert len(record["mean"]) == 64
    for lang in ("en", "fr"):
        for kind in ("maps", "threshold"):
            figure = _artifact_bytes(client, result["run_id"], f"featuremaps/{lang}/00-gray-{kind}.png", tmp_path / lang)
            assert Image.open(Path(tmp_path / lang / f"00-gray-{kind}.png")).format == "PNG"
            assert figure.startswith(PNG_SIGNATURE)


def test_featuremaps_rejects_quantile(isolated_stores: dict) -> None:
    with pytest.raises(ValueError, match="quantile=1.5"):
        run_featuremaps(["any.jpg"], backbone="resnet18", weights="none", quantile=1.5)


def test_mosaic_gaps_are_fill() -> None:
    from research.plots import _mosaic

    tiles = np.zeros((3, 4, 4), dtype=np.float32)
    mosaic = _mosaic(tiles, gap=2, fill=np.nan)

    assert mosaic.shape == (10, 10)  # 3 tiles in a 2 x 2 grid
    assert np.isnan(mosaic[4:6, :]).all()
    assert np.isnan(mosaic[:, 4:6]).all()
    assert (mosaic[:4, :4] == 0).all()
    assert np.isnan(mosaic[6:, 6:]).all()  # the fourth cell has no tile
