"""Backbone features in one pass (relu7 and pool5 for VGG, pre-logits for other models)."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from research.backbone import is_vgg
from research.data import Sample, open_rgb

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32")


class FeatureError(RuntimeError):
    """Features that cannot be used, such as NaN or infinite values."""


@dataclass
class Extraction:
    """Features of a list of images, in the order of that list, and the timing of each batch."""

    arrays: dict[str, np.ndarray]
    batch_seconds: list[float]
    batch_size: int
    precision: str

    @property
    def images_per_second(self) -> float:
        total = sum(self.batch_seconds)
        n = next(iter(self.arrays.values())).shape[0]
        return n / total if total > 0 else float("nan")


class _ImageFiles(TorchDataset):
    def __init__(self, paths: list[Path], transform) -> None:
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(open_rgb(self.paths[index]))


def cpu_supports_bf16() -> bool:
    """Tell whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn ``auto`` into ``bf16`` where the device computes bf16 natively, else ``fp32``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is invalid; use one of {', '.join(PRECISIONS)}.")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def feature_layers(model: nn.Module) -> tuple[str, ...]:
    """Names of the arrays one backbone pass produces."""
    return ("relu7", "pool5") if is_vgg(model) else ("pre_logits",)


def resolve_layer(available: tuple[str, ...] | list[str], requested: str) -> str:
    """Map a requested layer to an extracted one; models without relu7/pool5 fall back to pre_logits."""
    if requested in available:
        return requested
    if "pre_logits" in available and requested in {"relu7", "pool5", "pre_logits"}:
        log.info("Layer %s does not exist in this backbone; using its pre_logits features instead.", requested)
        return "pre_logits"
    raise FeatureError(f"Layer '{requested}' is not among the extracted layers {list(available)}.")


def _forward(model: nn.Module, batch: torch.Tensor, vgg: bool) -> dict[str, torch.Tensor]:
    conv = model.forward_features(batch)
    pre_logits = model.forward_head(conv, pre_logits=True)
    if vgg:
        return {"relu7": pre_logits, "pool5": conv.flatten(1)}
    return {"pre_logits": pre_logits}


def _check_finite(name: str, array: np.ndarray) -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise FeatureError(
            f"Features '{name}' contain {int(bad.sum())} NaN or infinite values in {rows.size} images. "
            "Re-run with precision=fp32, or check the backbone and its pooling layers."
        )


def extract_features(
    model: nn.Module,
    paths: list[Path],
    data_cfg: dict,
    *,
    device: torch.device,
    precision: str = "auto",
    batch_size: int = 32,
    num_workers: int = 1,
) -> Extraction:
    """Run the backbone once over ``paths`` and return every feature layer.

    Decoding and resizing run in ``num_workers`` DataLoader processes, in parallel with the
    backbone. bf16 runs under autocast with channels_last memory layout; features are stored as
    float32.

    Raises:
        FeatureError: A feature contains NaN or infinite values.
    """
    precision = resolve_precision(precision, device)
    vgg = is_vgg(model)
    model = model.to(device).eval()
    if precision == "bf16":
        model = model.to(memory_format=torch.channels_last)

    loader = DataLoader(
        _ImageFiles(paths, timm.data.create_transform(**data_cfg)),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    chunks: dict[str, list[np.ndarray]] = {}
    batch_seconds: list[float] = []

    progress = Progress(
        TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(), TextColumn("images"), TimeRemainingColumn()
    )
    with progress, torch.inference_mode(), autocast:
        task = progress.add_task("extract", total=len(paths))
        for batch in loader:
            start = time.perf_counter()
            batch = batch.to(device, non_blocking=True)
            if precision == "bf16":
                batch = batch.contiguous(memory_format=torch.channels_last)
            outputs = _forward(model, batch, vgg)
            for name, value in outputs.items():
                chunks.setdefault(name, []).append(value.float().cpu().numpy())
            batch_seconds.append(time.perf_counter() - start)
            progress.advance(task, batch.shape[0])

    arrays = {name: np.concatenate(parts) for name, parts in chunks.items()}
    for name, array in arrays.items():
        _check_finite(name, array)
    extraction = Extraction(arrays, batch_seconds, batch_size, precision)
    log.info("Extracted %d images in %.1f s (%.1f images/s, %s).", len(paths), sum(batch_seconds), extraction.images_per_second, precision)
    return extraction


def split_arrays(arrays: dict[str, np.ndarray], rows: dict[str, int], samples: list[Sample], root: Path, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """Select the rows of ``samples`` from cached arrays and return (features, labels)."""
    index = np.array([rows[str(s.path.relative_to(root))] for s in samples], dtype=np.int64)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    return arrays[layer][index], labels
