"""Weight resolution and feature extraction with real timm models (random or local weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from research import backbone
from research.backbone import WeightsError, create_backbone, data_config, resolve_weights
from research.features import extract_features, feature_layers, resolve_layer
from tests.conftest import SHARED_DATA, make_tree


def test_weights_none_is_random() -> None:
    weights = resolve_weights("vgg16", "none")

    assert weights.is_random
    assert weights.label == "random"


def test_unknown_model_error() -> None:
    with pytest.raises(WeightsError, match="Unknown timm model 'vgg17'"):
        resolve_weights("vgg17", "none")


def test_missing_weights_file_error(tmp_path: Path) -> None:
    missing = tmp_path / "vgg16.safetensors"
    with pytest.raises(WeightsError, match="does not exist") as error:
        resolve_weights("vgg16", str(missing))
    assert str(missing) in str(error.value)
    assert "--weights, or -P weights=" in str(error.value)
    assert "to none for random initialisation" in str(error.value)


def test_imagenet_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbone, "_hub_reachable", lambda cfg: False)
    monkeypatch.setattr(backbone, "_hub_weights_cached", lambda cfg: False)

    with pytest.raises(WeightsError) as error:
        resolve_weights("vgg16", "imagenet")

    message = str(error.value)
    assert "cannot be downloaded" in message
    assert "Set the weights option (--weights, or -P weights=... under mlflow run)" in message
    assert "to a local checkpoint file, or to none" in message


def test_random_init_is_repeatable() -> None:
    weights = resolve_weights("resnet18", "none")

    first = create_backbone("resnet18", weights)
    second = create_backbone("resnet18", weights)

    assert torch.equal(first.conv1.weight, second.conv1.weight)


def test_local_weights_file_loads() -> None:
    path = SHARED_DATA / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    if not path.is_file():
        pytest.skip(f"local weights not found at {path}")

    weights = resolve_weights("tf_efficientnet_lite0", str(path))
    model = create_backbone("tf_efficientnet_lite0", weights)

    assert weights.kind == "file"
    assert weights.digest == "bed9035dfb60f4b1a9ca39935ae00b77060640e3b2250a80265d3ed894e36188"
    random_model = create_backbone("tf_efficientnet_lite0", resolve_weights("tf_efficientnet_lite0", "none"))
    assert not torch.equal(model.conv_stem.weight, random_model.conv_stem.weight)


def test_weights_of_wrong_model_error() -> None:
    path = SHARED_DATA / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    if not path.is_file():
        pytest.skip(f"local weights not found at {path}")

    with pytest.raises(WeightsError, match="Loading weights") as error:
        create_backbone("resnet18", resolve_weights("resnet18", str(path)))

    message = str(error.value)
    assert "set the backbone option to that model's timm name" in message
    assert len(message) < 1000


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_vgg16_relu7_and_pool5_in_one_pass(tmp_path: Path, precision: str) -> None:
    root = make_tree(tmp_path / "imgs", ["a"], 3)
    paths = sorted(root.glob("a/*.jpg"))
    model = create_backbone("vgg16", resolve_weights("vgg16", "none"))

    extraction = extract_features(
        model, paths, data_config(model, 224), device=torch.device("cpu"), precision=precision, batch_size=2, num_workers=0
    )

    assert feature_layers(model) == ("relu7", "pool5")
    assert extraction.arrays["relu7"].shape == (3, 4096)
    assert extraction.arrays["pool5"].shape == (3, 512 * 7 * 7)
    assert extraction.arrays["relu7"].dtype == np.float32
    assert (extraction.arrays["relu7"] >= 0).all()
    assert len(extraction.batch_seconds) == 2


def test_other_models_use_pre_logits() -> None:
    model = create_backbone("resnet18", resolve_weights("resnet18", "none"))

    assert feature_layers(model) == ("pre_logits",)
    assert resolve_layer(feature_layers(model), "relu7") == "pre_logits"
