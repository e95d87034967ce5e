"""The fast extraction path: uint8 decoding in threads, batch normalisation, bf16 weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import make_image, make_tree, require_scene_data
from torch import nn

from research.backbone import create_backbone, data_config, resolve_weights
from research.data import DatasetError, open_rgb
from research.decoding import full_transform, iter_uint8_batches, make_decoder, normalize_batch
from research.features import extract_features, prepare_model

CPU = torch.device("cpu")


def _cfg(size: int = 64) -> dict:
    model = create_backbone("resnet18", resolve_weights("resnet18", "none"))
    return data_config(model, size)


def _images(tmp_path: Path) -> list[Path]:
    root = make_tree(tmp_path / "imgs", ["a", "b"], 3, mode="RGB")
    # A grayscale file of another size, so the resize and the channel conversion are exercised too.
    gray = make_image(tmp_path / "imgs" / "c" / "gray.png", 77, size=90, mode="L")
    return sorted(root.glob("*/*.jpg")) + [gray]


def test_batch_normalisation_matches_timm_transform(tmp_path: Path) -> None:
    paths = _images(tmp_path)
    cfg = _cfg()
    plain = torch.stack([full_transform(cfg)(open_rgb(p)) for p in paths])

    batch = normalize_batch(next(iter_uint8_batches(paths, make_decoder(cfg), len(paths), 0)), cfg)

    assert batch.dtype == torch.float32
    assert batch.shape == plain.shape
    assert torch.equal(batch, plain)


def test_batch_normalisation_matches_on_real_images() -> None:
    root = require_scene_data()
    paths = sorted((root / "train").glob("*/*"))[:: 300]
    cfg = _cfg(224)
    plain = torch.stack([full_transform(cfg)(open_rgb(p)) for p in paths])

    batch = normalize_batch(next(iter_uint8_batches(paths, make_decoder(cfg), len(paths), 2)), cfg)

    assert torch.equal(batch, plain)


def test_normalize_batch_rejects_float_input() -> None:
    with pytest.raises(TypeError, match="uint8"):
        normalize_batch(torch.zeros(1, 3, 8, 8), _cfg())


@pytest.mark.parametrize("workers", [1, 3])
def test_threaded_batches_keep_order(tmp_path: Path, workers: int) -> None:
    paths = _images(tmp_path)
    decode = make_decoder(_cfg())

    inline = list(iter_uint8_batches(paths, decode, 2, 0))
    threaded = list(iter_uint8_batches(paths, decode, 2, workers, prefetch_batches=2))

    assert [b.shape[0] for b in threaded] == [2, 2, 2, 1]
    assert len(threaded) == len(inline)
    for a, b in zip(inline, threaded):
        assert a.dtype == torch.uint8
        assert torch.equal(a, b)


def test_threaded_decoding_reports_bad_image(tmp_path: Path) -> None:
    paths = _images(tmp_path)
    broken = tmp_path / "imgs" / "a" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")

    with pytest.raises(DatasetError, match="broken.jpg"):
        list(iter_uint8_batches(paths + [broken], make_decoder(_cfg()), 2, 2))


def test_batch_options_are_checked(tmp_path: Path) -> None:
    decode = make_decoder(_cfg())
    with pytest.raises(ValueError, match="batch_size=0"):
        list(iter_uint8_batches([], decode, 0, 1))
    with pytest.raises(ValueError, match="num_workers=-1"):
        list(iter_uint8_batches([], decode, 1, -1))


def test_bf16_features_close_to_fp32(tmp_path: Path) -> None:
    paths = _images(tmp_path)
    features = {}
    for precision in ("bf16", "fp32"):
        model = create_backbone("resnet18", resolve_weights("resnet18", "none"))
        extraction = extract_features(model, paths, data_config(model, 64), device=CPU, precision=precision, batch_size=3, num_workers=1)
        features[precision] = extraction.arrays["pre_logits"].astype(np.float64)

    a, b = features["bf16"], features["fp32"]
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert a.dtype == b.dtype
    assert not np.array_equal(a, b), "bf16 features equal fp32 ones bit for bit: bf16 did not run"
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.05
    assert cosine.min() > 0.99


def test_bf16_casts_model_in_place_and_keeps_hooks(tmp_path: Path) -> None:
    paths = _images(tmp_path)
    model = create_backbone("resnet18", resolve_weights("resnet18", "none"))
    seen: list[torch.dtype] = []
    model.layer1.register_forward_hook(lambda _m, _i, output: seen.append(output.dtype))

    extraction = extract_features(model, paths, data_config(model, 64), device=CPU, precision="bf16", batch_size=4, num_workers=1)

    assert next(model.parameters()).dtype == torch.bfloat16
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert extraction.arrays["pre_logits"].dtype == np.float32


def test_fp32_leaves_weights_unchanged() -> None:
    model = create_backbone("resnet18", resolve_weights("resnet18", "none"))
    before = model.fc.weight.detach().clone()

    prepared = prepare_model(model, CPU, "fp32")

    assert prepared.fc.weight.dtype == torch.float32
    assert torch.equal(prepared.fc.weight, before)


def test_extraction_records_wall_and_wait_time(tmp_path: Path) -> None:
    paths = _images(tmp_path)
    model = create_backbone("resnet18", resolve_weights("resnet18", "none"))

    extraction = extract_features(model, paths, data_config(model, 64), device=CPU, precision="fp32", batch_size=4, num_workers=0)

    assert len(extraction.batch_seconds) == 2
    assert extraction.wall_seconds >= sum(extraction.batch_seconds)
    assert 0 <= extraction.wait_seconds <= extraction.wall_seconds
    assert extraction.images_per_second == pytest.approx(len(paths) / extraction.wall_seconds)


def test_lp_pooling_layer_runs_in_bf16_model(tmp_path: Path) -> None:
    from research.pooling import swap_pooling

    paths = _images(tmp_path)[:2]
    model = create_backbone("vgg16", resolve_weights("vgg16", "none"))
    swap_pooling(model, "lp2")

    extraction = extract_features(model, paths, data_config(model, 64), device=CPU, precision="bf16", batch_size=2, num_workers=1)

    assert np.isfinite(extraction.arrays["pool5"]).all()
    assert isinstance(model.features[4], nn.LPPool2d)
