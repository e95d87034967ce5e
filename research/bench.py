"""Measurements behind ``research bench``: extraction speed, matmul ceiling, bf16 accuracy, tracking cost.

Every measurement is repeated and summarised by its median; the 1-minute load average is read
before and after each one, because the numbers mean little on a machine that other jobs share.
Results are plain dicts so that ``research.bench_report`` can store them as JSON and render
``reports/benchmarks.md``; a later run of some items merges into the stored results.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import psutil
import torch
from torch import nn

from research.backbone import create_backbone, data_config, is_vgg, resolve_weights
from research.data import open_rgb
from research.decoding import full_transform, make_decoder
from research.features import _forward, extract_features

log = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    """Inputs of a benchmark run; the data and the weights are arguments, never fixed paths."""

    data_dir: str
    weights: str = ""  # local checkpoint of ``accuracy_backbone``; empty skips the accuracy item
    items: tuple[int, ...] = (1, 2, 3, 4, 5)
    backbone: str = "vgg16"
    image_size: int = 224
    n_images: int = 96
    repeats: int = 3
    matmul_size: int = 4096
    levers: bool = True
    try_compile: bool = False
    accuracy_backbone: str = "tf_efficientnet_lite0"
    accuracy_trials: int = 10
    limit_per_class: int = 0
    head_in_features: int = 25088
    head_width: int = 1024
    head_epochs: int = 10
    largest_head: bool = False
    study: str = "full"
    study_trials: int = 20
    study_seeds: int = 1
    workdir: str = ""


# --- measuring helpers -------------------------------------------------------------------------


def load_average() -> float:
    """Return the 1-minute load average (runnable processes, to compare with the core count)."""
    return round(os.getloadavg()[0], 2)


class PeakRss:
    """Sample this process's resident memory in a thread and keep the peak (``with`` block)."""

    def __init__(self, interval_seconds: float = 0.02) -> None:
        self.interval_seconds = interval_seconds
        self.start_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)
            self._stop.wait(self.interval_seconds)

    def __enter__(self) -> PeakRss:
        self.start_bytes = psutil.Process().memory_info().rss
        self.peak_bytes = self.start_bytes
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, psutil.Process().memory_info().rss)


def _busy_cpu_seconds() -> float:
    """Return the CPU seconds all cores have spent outside idle and I/O wait since boot."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _own_cpu_seconds() -> float:
    """Return the CPU seconds of this process and its finished children (all threads)."""
    times = psutil.Process().cpu_times()
    return times.user + times.system + times.children_user + times.children_system


class OtherCpu:
    """Measure how many cores other processes kept busy, on average, during a ``with`` block.

    Unlike the load average, this leaves out the benchmark's own threads, so a benchmark that
    fills every core does not read as a shared machine.
    """

    def __enter__(self) -> OtherCpu:
        self.cores = 0.0
        self._start = (time.perf_counter(), _busy_cpu_seconds(), _own_cpu_seconds())
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._start[0]
        other = (_busy_cpu_seconds() - self._start[1]) - (_own_cpu_seconds() - self._start[2])
        self.cores = max(other, 0.0) / wall if wall > 0 else 0.0


def summarize(seconds: list[float], load_before: float, load_after: float, other_cores: float | None = None) -> dict:
    """Return the median of timed repetitions, every value, the load averages and other processes' CPU use."""
    result = {
        "median_seconds": statistics.median(seconds),
        "seconds": seconds,
        "load_before": load_before,
        "load_after": load_after,
    }
    if other_cores is not None:
        result["other_cores"] = round(other_cores, 3)
    return result


def repeat(run: Callable[[], float], repeats: int) -> dict:
    """Call ``run`` (which returns seconds) ``repeats`` times and summarize the timings."""
    load_before = load_average()
    with OtherCpu() as other:
        seconds = [run() for _ in range(repeats)]
    return summarize(seconds, load_before, load_average(), other.cores)


def _throughput(result: dict, images: int) -> dict:
    result["images"] = images
    result["images_per_second"] = images / result["median_seconds"]
    result["best_images_per_second"] = images / min(result["seconds"])
    return result


# --- item 1: the plain loop ---------------------------------------------------------------------


def plain_loop_seconds(model: nn.Module, paths: list[Path], data_cfg: dict, batch_size: int = 16) -> float:
    """Time the loop a user would write: fp32, NCHW, timm's transform per image, decoded per batch."""
    transform = full_transform(data_cfg)
    start = time.perf_counter()
    with torch.inference_mode():
        for begin in range(0, len(paths), batch_size):
            batch = torch.stack([transform(open_rgb(p)) for p in paths[begin : begin + batch_size]])
            features = model.forward_features(batch)
            model.forward_head(features, pre_logits=True)
    return time.perf_counter() - start


# --- item 2 and the levers: the project's path and its parts --------------------------------


def project_path_seconds(model: nn.Module, paths: list[Path], data_cfg: dict, **options) -> float:
    """Time ``extract_features`` over ``paths``; model preparation (the bf16 cast) is left out."""
    return extract_features(model, paths, data_cfg, device=torch.device("cpu"), **options).wall_seconds


class _FeaturePass(nn.Module):
    """The extraction's forward pass as a module returning a tuple, so that torch.jit can trace it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.vgg = is_vgg(model)

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_forward(self.model, batch, self.vgg).values())


def frozen_forward(model: nn.Module, batch: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace the extraction pass on ``batch`` and freeze it, so oneDNN reorders the weights once, not per call."""
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        # timm's ConvMlp compares the input size in Python; the trace fixes it for this image size.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(_FeaturePass(model).eval(), batch, check_trace=False)
        return torch.jit.freeze(traced)


def backbone_only_seconds(
    model: nn.Module, batch: torch.Tensor, mode: str, steps: int, compiled: bool = False, frozen: bool = False
) -> float:
    """Time ``steps`` forward passes on one decoded batch, the backbone alone, in ``mode``.

    Modes: ``fp32`` (NCHW), ``fp32_cl`` (channels_last), ``autocast`` (fp32 weights under bf16
    autocast, channels_last), ``bf16`` (bf16 weights, NCHW), ``bf16_cl`` (bf16 weights,
    channels_last). ``compiled`` runs the pass through torch.compile, ``frozen`` through
    ``frozen_forward``; neither one's preparation is timed.
    """
    from contextlib import nullcontext

    vgg = is_vgg(model)
    if frozen:
        forward = frozen_forward(model, batch)
    elif compiled:
        forward = torch.compile(lambda x: _forward(model, x, vgg))
    else:
        forward = lambda x: _forward(model, x, vgg)  # noqa: E731
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else nullcontext()
    with torch.inference_mode(), autocast:
        forward(batch)  # oneDNN builds its kernels on the first call; not timed.
        start = time.perf_counter()
        for _ in range(steps):
            forward(batch)
    return time.perf_counter() - start


def model_for_mode(backbone: str, mode: str) -> nn.Module:
    """Create the backbone (random weights) in the dtype and memory format of a ``backbone_only_seconds`` mode."""
    model = create_backbone(backbone, resolve_weights(backbone, "none")).eval()
    if mode in ("bf16", "bf16_cl"):
        model = model.to(torch.bfloat16)
    if mode in ("fp32_cl", "autocast", "bf16_cl"):
        model = model.to(memory_format=torch.channels_last)
    return model


def batch_for_mode(batch: torch.Tensor, mode: str) -> torch.Tensor:
    if mode in ("bf16", "bf16_cl"):
        batch = batch.to(torch.bfloat16)
    if mode in ("fp32_cl", "autocast", "bf16_cl"):
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


def decode_ms_per_image(paths: list[Path], data_cfg: dict, uint8: bool) -> float:
    """Milliseconds per image to decode and pre-process one image at a time in this thread.

    ``uint8=True`` is the project's decoder (normalisation left to the batch); ``False`` is timm's
    full transform with its per-image float normalisation.
    """
    if uint8:
        decode = make_decoder(data_cfg)
    else:
        transform = full_transform(data_cfg)

        def decode(path: Path) -> torch.Tensor:
            return transform(open_rgb(path))

    start = time.perf_counter()
    for path in paths:
        decode(path)
    return (time.perf_counter() - start) * 1000 / len(paths)


# --- item 3: matmul ceiling and the backbone's FLOPs ------------------------------------------


def matmul_gflops(dtype: torch.dtype, n: int = 4096, repeats: int = 5) -> dict:
    """Measure square matmul throughput (GFLOP/s, 2 n^3 per product) in ``dtype``; median and best."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    flop = 2 * n**3

    def run() -> float:
        start = time.perf_counter()
        torch.mm(a, b)
        return time.perf_counter() - start

    result = repeat(run, repeats)
    result["n"] = n
    result["gflops"] = flop / result["median_seconds"] / 1e9
    result["best_gflops"] = flop / min(result["seconds"]) / 1e9
    return result


def forward_gflop(model: nn.Module, image_size: int) -> float:
    """Count the multiply-adds of the model's convolutions and linear layers on one image (GFLOP = 2 x GMAC).

    Pooling, activations and normalisation are left out; for VGG16 they add well under 1 %.
    """
    macs = 0

    def count(module: nn.Module, inputs, output) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            macs += kernel * output.numel()
        elif isinstance(module, nn.Linear):
            macs += module.in_features * output.numel()

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.inference_mode():
            x = torch.zeros(1, 3, image_size, image_size, dtype=next(model.parameters()).dtype)
            _forward(model, x, is_vgg(model))
    finally:
        for handle in handles:
            handle.remove()
    return 2 * macs / 1e9


# --- item 4: bf16 against fp32 features, through the SVM study --------------------------------


@contextmanager
def isolated_tracking(root: Path) -> Iterator[dict]:
    """Point MLflow and Optuna at stores under ``root`` for the duration of the block."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ.pop("MLFLOW_RUN_ID", None)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    try:
        yield {"storage": f"sqlite:///{root / 'optuna.db'}", "cache_dir": str(root / "cache")}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def sweep_config(**values):
    """Build a ``SweepConfig`` from the fields it has (its set of fields grows as studies are added)."""
    from research.sweep import SweepConfig

    known = {f.name for f in fields(SweepConfig)}
    return SweepConfig(**{k: v for k, v in values.items() if k in known})


def precision_accuracy(config: BenchConfig, root: Path) -> dict:
    """Run the SVM study on features extracted in bf16 and in fp32; return both test accuracies."""
    from research.sweep import run_sweep

    results = {}
    for precision in ("bf16", "fp32"):
        with isolated_tracking(root / precision) as stores:
            start = time.perf_counter()
            load_before = load_average()
            result = run_sweep(sweep_config(
                data_dir=config.data_dir, study="svm", n_trials=config.accuracy_trials, seeds=1,
                backbone=config.accuracy_backbone, weights=config.weights, precision=precision, image_size=config.image_size,
                limit_per_class=config.limit_per_class, study_name=f"bench-{precision}", **stores,
            ))
            results[precision] = {
                "test_accuracy": result["test_accuracy"],
                "best_val_accuracy": result.get("best_val_accuracy"),
                "seconds": time.perf_counter() - start,
                "load_before": load_before,
                "load_after": load_average(),
            }
    results["difference_points"] = 100 * (results["bf16"]["test_accuracy"] - results["fp32"]["test_accuracy"])
    results["backbone"] = config.accuracy_backbone
    results["trials"] = config.accuracy_trials
    return results


def feature_agreement(config: BenchConfig, paths: list[Path]) -> dict:
    """Compare bf16 and fp32 features of the accuracy backbone on ``paths`` (relative error, cosine)."""
    weights = resolve_weights(config.accuracy_backbone, config.weights)
    arrays = {}
    for precision in ("bf16", "fp32"):
        model = create_backbone(config.accuracy_backbone, weights)
        cfg = data_config(model, config.image_size)
        arrays[precision] = next(iter(extract_features(
            model, paths, cfg, device=torch.device("cpu"), precision=precision, batch_size=32, num_workers=1
        ).arrays.values()))
    a, b = arrays["bf16"].astype(np.float64), arrays["fp32"].astype(np.float64)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return {
        "relative_error": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
        "min_cosine": float(cosine.min()),
        "images": len(paths),
    }
