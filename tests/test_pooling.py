"""Pooling swaps on VGG16, LP pooling in fp32, activation statistics and the FC-width variant."""

from __future__ import annotations

import math

import numpy as np

import pytest
import timm
import torch
from torch import nn

from research.fc_width import relu7_from_pool5, set_fc_width
from research.pooling import (
    ActivationStats,
    Fp32LPPool2d,
    PoolingError,
    make_pooling,
    max_pool_names,
    pooling_layers,
    swap_pooling,
)

VGG_POOLS = ["features.4", "features.9", "features.16", "features.23", "features.30"]


@pytest.fixture(scope="module")
def vgg_state() -> dict:
    """One random VGG16's weights, so each test can build a fresh model without a new initialisation."""
    torch.manual_seed(0)
    return timm.create_model("vgg16", pretrained=False).state_dict()


def _vgg(state: dict) -> nn.Module:
    model = timm.create_model("vgg16", pretrained=False, pretrained_cfg_overlay={})
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize(
    ("pooling", "kind"),
    [("max", nn.MaxPool2d), ("avg", nn.AvgPool2d), ("lp1", Fp32LPPool2d), ("lp2", Fp32LPPool2d)],
)
def test_swap_replaces_all_five(vgg_state: dict, pooling: str, kind: type) -> None:
    model = _vgg(vgg_state)
    replaced = swap_pooling(model, pooling)

    assert replaced == VGG_POOLS
    layers = pooling_layers(model)
    assert [name for name, _ in layers] == VGG_POOLS
    for _, layer in layers:
        assert type(layer) is kind
        assert layer.kernel_size in (2, (2, 2))
        assert layer.stride in (2, (2, 2))
    if pooling != "max":
        assert max_pool_names(model) == []


def test_lp_norm_types(vgg_state: dict) -> None:
    for pooling, norm in (("lp1", 1.0), ("lp2", 2.0)):
        model = _vgg(vgg_state)
        swap_pooling(model, pooling)
        assert {layer.norm_type for _, layer in pooling_layers(model)} == {norm}


def test_lp1_equals_four_times_avg() -> None:
    x = torch.rand(2, 3, 8, 8)
    template = nn.MaxPool2d(2, 2)
    lp1 = make_pooling("lp1", template)(x)
    avg = make_pooling("avg", template)(x)

    assert torch.allclose(lp1, 4 * avg, rtol=1e-5, atol=1e-6)


def test_lp2_computes_in_fp32() -> None:
    # 300 squared is 90,000, above the fp16 maximum of 65,504: an fp16 LPPool2d returns inf.
    x = torch.full((1, 1, 2, 2), 300.0, dtype=torch.float16)
    plain = nn.LPPool2d(2.0, 2, 2)(x)
    ours = make_pooling("lp2", nn.MaxPool2d(2, 2))(x)

    assert torch.isinf(plain).all()
    assert ours.dtype == torch.float16
    assert ours.item() == pytest.approx(600.0)


def test_lp2_under_bf16_autocast_matches_fp32() -> None:
    x = torch.rand(1, 4, 8, 8) * 10
    layer = make_pooling("lp2", nn.MaxPool2d(2, 2))
    reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = layer(x)

    assert result.dtype == torch.float32
    assert torch.allclose(result, reference)


def test_model_without_maxpool_rejects_avg() -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)

    assert swap_pooling(model, "max") == []
    with pytest.raises(PoolingError, match="has no MaxPool2d"):
        swap_pooling(model, "avg")


def test_unknown_pooling_rejected() -> None:
    with pytest.raises(PoolingError, match="pooling='median' is invalid"):
        swap_pooling(nn.Sequential(nn.MaxPool2d(2)), "median")


def test_activation_stats_values() -> None:
    model = nn.Sequential(nn.MaxPool2d(2, 2), nn.AvgPool2d(2, 2))
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4) - 8  # values -8 .. 7
    with ActivationStats().attach(model) as stats:
        model(x)
        model(x)
    metrics = stats.metrics()

    # Max pool of 2x2 blocks: -3, -1, 5, 7; then the average of those four is 2.
    assert stats.layers == ["pool1", "pool2"]
    assert metrics["act_mean_pool1"] == pytest.approx((3 + 1 + 5 + 7) / 4)
    assert metrics["act_max_pool1"] == 7.0
    assert metrics["act_mean_pool2"] == pytest.approx(2.0)
    assert metrics["act_max_pool2"] == pytest.approx(2.0)
    assert metrics["act_nonfinite_pool1"] == 0.0
    assert stats.first_nonfinite() is None
    # Hooks are removed on exit: a further pass changes nothing.
    model(x * 100)
    assert stats.metrics() == metrics


def test_activation_stats_catch_overflow() -> None:
    # 1e20 squared overflows even fp32: the hook must count the inf after the LP pool.
    model = nn.Sequential(nn.MaxPool2d(2, 2), make_pooling("lp2", nn.MaxPool2d(2, 2)))
    with ActivationStats().attach(model) as stats:
        model(torch.full((1, 1, 8, 8), 1e20))
    metrics = stats.metrics()

    assert stats.first_nonfinite() == "pool2"
    assert metrics["act_nonfinite_pool1"] == 0.0
    assert metrics["act_nonfinite_pool2"] == 4.0
    assert math.isfinite(metrics["act_max_pool2"])


def test_activation_scale_grows_with_lp1(vgg_state: dict) -> None:
    x = torch.rand(1, 3, 64, 64)
    maxima = {}
    for pooling in ("avg", "lp1"):
        model = _vgg(vgg_state)
        swap_pooling(model, pooling)
        with torch.inference_mode(), ActivationStats().attach(model) as stats:
            model.forward_features(x)
        maxima[pooling] = stats.metrics()

    assert set(maxima["lp1"]) >= {f"act_max_pool{i}" for i in range(1, 6)}
    # Each LP1 layer sums where avg averages (x4 per layer), compounding through the convolutions.
    assert maxima["lp1"]["act_mean_pool1"] == pytest.approx(4 * maxima["avg"]["act_mean_pool1"], rel=1e-4)
    assert maxima["lp1"]["act_mean_pool5"] > 50 * maxima["avg"]["act_mean_pool5"]


def test_fc_width_fresh_layers(vgg_state: dict) -> None:
    model = _vgg(vgg_state)
    kept = set_fc_width(model, 64)
    with torch.inference_mode():
        relu7 = model.forward_head(model.forward_features(torch.rand(1, 3, 32, 32)), pre_logits=True)

    assert kept is False
    assert model.pre_logits.fc1.out_channels == 64
    assert model.pre_logits.fc2.in_channels == 64
    assert relu7.shape == (1, 64)


def test_fc_width_4096_keeps_weights(vgg_state: dict) -> None:
    model = _vgg(vgg_state)
    before = model.pre_logits.fc1.weight.clone()

    assert set_fc_width(model, 4096) is True
    assert torch.equal(model.pre_logits.fc1.weight, before)
    assert set_fc_width(model, 4096, keep_pretrained=False) is False
    assert not torch.equal(model.pre_logits.fc1.weight, before)


def test_fc_width_rejects_non_vgg() -> None:
    with pytest.raises(ValueError, match="applies only to VGG"):
        set_fc_width(timm.create_model("tf_efficientnet_lite0", pretrained=False), 1024)


@pytest.mark.parametrize(("size", "precision"), [(64, "fp32"), (224, "fp32"), (224, "bf16")])
def test_relu7_from_pool5_equals_a_full_pass(vgg_state: dict, size: int, precision: str) -> None:
    model = _vgg(vgg_state)
    set_fc_width(model, 48, keep_pretrained=False)
    images = torch.rand(3, 3, size, size)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = model.to(dtype)
    with torch.inference_mode():
        conv = model.forward_features(images.to(dtype))
        full = model.forward_head(conv, pre_logits=True).float().numpy()
    pool5 = conv.flatten(1).float().numpy()

    derived, seconds = relu7_from_pool5(model, pool5, device=torch.device("cpu"), precision=precision, batch_size=2)

    assert derived.shape == (3, 48)
    assert len(seconds) == 2
    # At 224 px fc6 runs as a matrix product: the same sums in another order, so bf16 rounding differs.
    tolerances = {(64, "fp32"): (1e-5, 1e-6), (224, "fp32"): (1e-4, 1e-5), (224, "bf16"): (2e-2, 2e-2)}
    rel, abs_ = tolerances[(size, precision)]
    assert derived == pytest.approx(full, rel=rel, abs=abs_)


def test_relu7_from_pool5_rejects_other_widths(vgg_state: dict) -> None:
    with pytest.raises(ValueError, match="not 512 square feature maps"):
        relu7_from_pool5(_vgg(vgg_state), np.zeros((2, 1000), np.float32), device=torch.device("cpu"), precision="fp32")
