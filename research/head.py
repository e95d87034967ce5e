"""The MLP classification head trained on cached features, with per-epoch curves and early stopping.

The head is ``Linear(in, W) -> ReLU -> Dropout(p) -> Linear(W, W) -> ReLU -> Dropout(p) ->
Linear(W, n_classes)``. Training runs mini-batch SGD with momentum (or AdamW) under bf16
autocast where the device computes bf16 natively; weights, gradients and optimizer state stay in
fp32.

Curve stability is logged by the objective as ``val_loss_stability`` and ``stable``. It is the
standard deviation of the validation loss over the last ``STABILITY_WINDOW`` epochs divided by its
mean over the same epochs, a coefficient of variation that does not depend on the loss scale. A trial is
``stable`` when that ratio is at most ``STABILITY_THRESHOLD`` and no loss was NaN or infinite.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import psutil
import torch
from torch import nn

log = logging.getLogger(__name__)

WIDTHS = (1024, 4096, 8196, 16384)
OPTIMIZERS = ("sgd", "adamw")
NORMALIZATIONS = ("none", "standard")
STABILITY_WINDOW = 5
STABILITY_THRESHOLD = 0.1


def build_head(in_features: int, width: int, n_classes: int, dropout: float) -> nn.Sequential:
    """Build the two-hidden-layer MLP head.

    Raises:
        ValueError: A size is not positive or ``dropout`` is outside [0, 1).
    """
    for name, value in {"in_features": in_features, "fc_width": width, "n_classes": n_classes}.items():
        if value < 1:
            raise ValueError(f"{name}={value} is invalid; it must be at least 1.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout} is invalid; it must be in [0, 1).")
    return nn.Sequential(
        nn.Linear(in_features, width),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(width, width),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(width, n_classes),
    )


def head_parameter_count(in_features: int, width: int, n_classes: int) -> int:
    """Count the head's weights and biases without allocating it."""
    return (in_features + 1) * width + (width + 1) * width + (width + 1) * n_classes


def peak_rss_bytes() -> int:
    """Return this process's peak resident memory so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """Return this process's resident memory now."""
    return psutil.Process().memory_info().rss


@dataclass
class HeadHistory:
    """Curves of one training run, filled epoch by epoch so that a pruned run keeps what it reached."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    batch_seconds: list[float] = field(default_factory=list)
    diverged: bool = False
    best_epoch: int = -1
    parameter_count: int = 0
    # Largest resident memory sampled after an epoch, when weights, gradients and optimizer state
    # are all allocated. Unlike ru_maxrss it is not inflated by earlier work in the same process.
    rss_bytes: int = 0

    @property
    def epochs(self) -> int:
        return len(self.train_loss)

    def val_loss_stability(self, window: int = STABILITY_WINDOW) -> float:
        """Return std / mean of the validation loss over the last ``window`` epochs (NaN without validation)."""
        tail = np.asarray(self.val_loss[-window:], dtype=np.float64)
        if tail.size == 0 or not np.all(np.isfinite(tail)) or tail.mean() <= 0:
            return float("nan")
        return float(tail.std() / tail.mean())

    def is_stable(self, threshold: float = STABILITY_THRESHOLD, window: int = STABILITY_WINDOW) -> bool:
        """Tell whether the validation loss settled: see the module docstring."""
        ratio = self.val_loss_stability(window)
        return not self.diverged and len(self.val_loss) >= window and math.isfinite(ratio) and ratio <= threshold


@dataclass(frozen=True)
class HeadConfig:
    """Hyper-parameters of one head training run."""

    fc_width: int = 1024
    dropout: float = 0.5
    learning_rate: float = 1e-3
    max_epochs: int = 30
    patience: int = 5
    batch_size: int = 64
    optimizer: str = "sgd"
    normalize: str = "standard"
    weight_decay: float = 0.0

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} is invalid; use one of {', '.join(OPTIMIZERS)}.")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize={self.normalize!r} is invalid for the head; use one of {', '.join(NORMALIZATIONS)}.")
        for name in ("max_epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid; it must be at least 1.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate} is invalid; it must be positive.")


@dataclass
class TrainedHead:
    """A trained head with the input scaling it expects."""

    model: nn.Module
    mean: torch.Tensor
    scale: torch.Tensor
    device: torch.device
    autocast: bool

    @torch.inference_mode()
    def predict(self, features: np.ndarray, batch_size: int = 256) -> np.ndarray:
        self.model.eval()
        predictions = []
        for start in range(0, len(features), batch_size):
            x = _prepare(features[start : start + batch_size], self.mean, self.scale, self.device)
            with _autocast(self.device, self.autocast):
                predictions.append(self.model(x).argmax(1).cpu().numpy())
        return np.concatenate(predictions) if predictions else np.zeros(0, dtype=np.int64)

    def accuracy(self, features: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(self.predict(features) == labels))


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def _prepare(features: np.ndarray, mean: torch.Tensor, scale: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(device)
    return (x - mean) / scale


def _scaling(features: np.ndarray, normalize: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (mean, scale) per feature: the training statistics for ``standard``, identity for ``none``."""
    if normalize == "none":
        return torch.zeros(1, device=device), torch.ones(1, device=device)
    mean = features.mean(axis=0, dtype=np.float64).astype(np.float32)
    std = features.std(axis=0, dtype=np.float64).astype(np.float32)
    std[std < 1e-6] = 1.0
    return torch.from_numpy(mean).to(device), torch.from_numpy(std).to(device)


def _make_optimizer(model: nn.Module, config: HeadConfig) -> torch.optim.Optimizer:
    # NOTE: SGD keeps one fp32 state per weight and AdamW two; at W = 16384 on 25,088 inputs
    # (680 M parameters) that is 2.7 GB against 5.4 GB, which is why SGD is the default.
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=0.9, weight_decay=config.weight_decay)


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, use_autocast: bool) -> tuple[float, float]:
    """Return (mean cross-entropy, accuracy) of ``model`` on already scaled features."""
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.inference_mode(), _autocast(x.device, use_autocast):
        for start in range(0, len(x), batch_size):
            logits = model(x[start : start + batch_size]).float()
            target = y[start : start + batch_size]
            loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
            correct += int((logits.argmax(1) == target).sum())
    return loss_sum / len(x), correct / len(x)


def train_head(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    config: HeadConfig,
    *,
    n_classes: int,
    seed: int = 0,
    device: torch.device | None = None,
    bf16: bool = False,
    history: HeadHistory | None = None,
    on_epoch: Callable[[int, HeadHistory], None] | None = None,
) -> TrainedHead:
    """Train the head, evaluating on validation after each epoch and stopping early on validation loss.

    Without validation data the head trains for exactly ``config.max_epochs`` epochs (the refit on
    train + validation). With it, training stops after ``config.patience`` epochs without a lower
    validation loss and the weights of the best epoch are restored. Training also stops when the
    training loss becomes NaN or infinite (``history.diverged``).

    Args:
        history: Filled in place; pass one to keep the curves when ``on_epoch`` raises.
        on_epoch: Called after each epoch with the epoch index (from 0) and the history, for
            example to report to Optuna and raise ``optuna.TrialPruned``.

    Raises:
        ValueError: Invalid configuration, or NaN or infinite input features.
    """
    config.validate()
    device = device or torch.device("cpu")
    history = history if history is not None else HeadHistory()
    for name, array in {"x_train": x_train, "x_val": x_val}.items():
        if array is not None and not np.all(np.isfinite(array)):
            raise ValueError(f"{name} contains NaN or infinite features; re-extract them with precision=fp32.")

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    mean, scale = _scaling(x_train, config.normalize, device)
    x = _prepare(x_train, mean, scale, device)
    y = torch.from_numpy(np.asarray(y_train, dtype=np.int64)).to(device)
    xv = _prepare(x_val, mean, scale, device) if x_val is not None else None
    yv = torch.from_numpy(np.asarray(y_val, dtype=np.int64)).to(device) if y_val is not None else None

    model = build_head(x.shape[1], config.fc_width, n_classes, config.dropout).to(device)
    history.parameter_count = sum(p.numel() for p in model.parameters())
    optimizer = _make_optimizer(model, config)
    best_loss, best_state, waited = math.inf, None, 0

    for epoch in range(config.max_epochs):
        epoch_start = time.perf_counter()
        train_loss = _train_epoch(model, optimizer, x, y, config.batch_size, generator, bf16, history)
        history.epoch_seconds.append(time.perf_counter() - epoch_start)
        if not math.isfinite(train_loss):
            history.diverged = True
            log.warning("Head training diverged at epoch %d (training loss %s); stopping.", epoch, train_loss)
            break

        # Training metrics are measured in eval mode after the epoch, so they compare with validation.
        loss, accuracy = _evaluate(model, x, y, 512, bf16)
        history.train_loss.append(loss)
        history.train_accuracy.append(accuracy)
        if xv is not None:
            val_loss, val_accuracy = _evaluate(model, xv, yv, 512, bf16)
            history.val_loss.append(val_loss)
            history.val_accuracy.append(val_accuracy)
            if val_loss < best_loss:
                best_loss, waited, history.best_epoch = val_loss, 0, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                waited += 1
        else:
            history.best_epoch = epoch
        history.rss_bytes = max(history.rss_bytes, current_rss_bytes())

        if on_epoch is not None:
            on_epoch(epoch, history)
        if xv is not None and waited >= config.patience:
            log.debug("Early stop at epoch %d: no lower validation loss for %d epochs.", epoch, waited)
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    return TrainedHead(model.eval(), mean, scale, device, bf16)


def _train_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
    batch_size: int, generator: torch.Generator, bf16: bool, history: HeadHistory,
) -> float:
    """Run one epoch over shuffled mini-batches and return the mean training loss seen during it."""
    model.train()
    order = torch.randperm(len(x), generator=generator).to(x.device)
    loss_sum = 0.0
    for start in range(0, len(x), batch_size):
        batch_start = time.perf_counter()
        index = order[start : start + batch_size]
        with _autocast(x.device, bf16):
            logits = model(x[index])
        loss = nn.functional.cross_entropy(logits.float(), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        history.batch_seconds.append(time.perf_counter() - batch_start)
        loss_sum += value * len(index)
        if not math.isfinite(value):
            return value
    return loss_sum / len(x)
