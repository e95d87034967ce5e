"""The MLP head: size, training curves, early stopping, stability measure and input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from research.head import (
    STABILITY_THRESHOLD,
    STABILITY_WINDOW,
    HeadConfig,
    HeadHistory,
    build_head,
    head_parameter_count,
    train_head,
)


def _blobs(n_per_class: int, n_classes: int = 3, dim: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters, one per class, far enough apart to be separable."""
    centres = np.random.default_rng(1234).normal(0, 4, size=(n_classes, dim))
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    features = centres[labels] + rng.normal(0, 1, size=(labels.size, dim))
    return features.astype(np.float32), labels


def test_width_16384_parameter_count() -> None:
    # Built on the meta device: shapes only, no 2.7 GB allocation.
    with torch.device("meta"):
        head = build_head(25088, 16384, 15, 0.5)
    built = sum(p.numel() for p in head.parameters())

    assert built == head_parameter_count(25088, 16384, 15)
    assert 679_000_000 < built < 680_000_000
    assert head[0].in_features == 25088
    assert head[3].out_features == 16384
    assert head[6].out_features == 15


def test_head_layer_order() -> None:
    head = build_head(12, 8, 3, 0.25)
    kinds = [type(layer).__name__ for layer in head]

    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert head[2].p == 0.25
    assert head[5].p == 0.25


@pytest.mark.parametrize("dropout", [-0.1, 1.0])
def test_invalid_dropout_rejected(dropout: float) -> None:
    with pytest.raises(ValueError, match="dropout"):
        build_head(4, 4, 2, dropout)


def test_curves_one_point_per_epoch() -> None:
    x, y = _blobs(20)
    xv, yv = _blobs(6, seed=1)
    history = HeadHistory()
    config = HeadConfig(fc_width=16, dropout=0.0, learning_rate=0.05, max_epochs=4, patience=10, batch_size=16)
    train_head(x, y, xv, yv, config, n_classes=3, history=history)

    assert history.epochs == 4
    for curve in (history.train_loss, history.val_loss, history.train_accuracy, history.val_accuracy, history.epoch_seconds):
        assert len(curve) == 4
    # 60 training rows in batches of 16: 4 batches per epoch.
    assert len(history.batch_seconds) == 16
    assert all(seconds > 0 for seconds in history.batch_seconds)
    assert history.rss_bytes > 0


def test_head_learns_separable_data() -> None:
    x, y = _blobs(30)
    xv, yv = _blobs(10, seed=1)
    config = HeadConfig(fc_width=32, dropout=0.1, learning_rate=0.05, max_epochs=15, patience=15, batch_size=16)
    model = train_head(x, y, xv, yv, config, n_classes=3)

    assert model.accuracy(xv, yv) > 0.9


def test_best_epoch_weights_restored() -> None:
    x, y = _blobs(20)
    xv, yv = _blobs(6, seed=1)
    history = HeadHistory()
    config = HeadConfig(fc_width=16, dropout=0.0, learning_rate=0.5, max_epochs=12, patience=3, batch_size=8)
    model = train_head(x, y, xv, yv, config, n_classes=3, history=history)

    assert history.best_epoch == int(np.argmin(history.val_loss))
    assert model.accuracy(xv, yv) == pytest.approx(history.val_accuracy[history.best_epoch])
    # Early stopping: training stops ``patience`` epochs after the best one, or at max_epochs.
    assert history.epochs == min(history.best_epoch + 1 + config.patience, config.max_epochs)


def test_on_epoch_exception_keeps_curves() -> None:
    x, y = _blobs(10)
    history = HeadHistory()

    def stop(epoch: int, _history: HeadHistory) -> None:
        if epoch == 1:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        train_head(x, y, x, y, HeadConfig(fc_width=8, max_epochs=5), n_classes=3, history=history, on_epoch=stop)
    assert history.epochs == 2
    assert len(history.val_accuracy) == 2


def test_refit_without_validation_runs_all_epochs() -> None:
    x, y = _blobs(10)
    history = HeadHistory()
    train_head(x, y, None, None, HeadConfig(fc_width=8, max_epochs=3, patience=1), n_classes=3, history=history)

    assert history.epochs == 3
    assert history.val_loss == []
    assert history.best_epoch == 2


def test_nan_features_rejected() -> None:
    x, y = _blobs(5)
    x[3, 2] = np.nan
    with pytest.raises(ValueError, match="x_train contains NaN"):
        train_head(x, y, None, None, HeadConfig(fc_width=8, max_epochs=1), n_classes=3)


def test_huge_learning_rate_marks_divergence() -> None:
    x, y = _blobs(10)
    x = x * 1e30
    history = HeadHistory()
    config = HeadConfig(fc_width=8, learning_rate=1e10, max_epochs=5, normalize="none", batch_size=10)
    train_head(x, y, x, y, config, n_classes=3, history=history)

    assert history.diverged
    assert not history.is_stable()


def test_stability_of_flat_and_noisy_losses() -> None:
    flat = HeadHistory(val_loss=[2.0, 1.0] + [0.5] * STABILITY_WINDOW)
    noisy = HeadHistory(val_loss=[0.5, 1.5] * STABILITY_WINDOW)
    short = HeadHistory(val_loss=[0.5])

    assert flat.val_loss_stability() == 0.0
    assert flat.is_stable()
    assert noisy.val_loss_stability() > STABILITY_THRESHOLD
    assert not noisy.is_stable()
    assert not short.is_stable()
    assert math.isnan(HeadHistory().val_loss_stability())


def test_bf16_autocast_trains() -> None:
    x, y = _blobs(20)
    history = HeadHistory()
    config = HeadConfig(fc_width=16, learning_rate=0.05, max_epochs=3, batch_size=16)
    train_head(x, y, x, y, config, n_classes=3, bf16=True, history=history)

    assert history.epochs == 3
    assert all(math.isfinite(v) for v in history.train_loss)
