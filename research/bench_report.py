"""``research bench``: run the benchmark items, merge them into ``benchmarks.json``, render ``benchmarks.md``.

Items: (1) the plain extraction loop, (2) the project's extraction path and the levers behind it,
(3) the matmul ceiling and the backbone's share of it, (4) SVM test accuracy on bf16 and fp32
features, (5) MLflow tracking overhead of a head trial, (6) a study's wall time on the full data.
"""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path

import torch

from research import tracking
from research.backbone import create_backbone, data_config, resolve_weights
from research.bench import (
    BenchConfig,
    OtherCpu,
    PeakRss,
    _throughput,
    backbone_only_seconds,
    batch_for_mode,
    decode_ms_per_image,
    feature_agreement,
    forward_gflop,
    load_average,
    matmul_gflops,
    model_for_mode,
    plain_loop_seconds,
    precision_accuracy,
    project_path_seconds,
    repeat,
    summarize,
    sweep_config,
)
from research.bench_trial import largest_head_memory, scratch_dir, study_wall_time, tracking_overhead
from research.data import load_dataset
from research.decoding import iter_uint8_batches, make_decoder, normalize_batch
from research.features import resolve_precision

log = logging.getLogger(__name__)

BACKBONE_MODES = ("fp32", "fp32_cl", "autocast", "bf16", "bf16_cl")


def bench_images(data_dir: str, n_images: int) -> list[Path]:
    """Pick ``n_images`` files spread evenly over every split and class of the dataset."""
    dataset = load_dataset(data_dir, seed=0)
    samples = sorted(dataset.train + dataset.val + dataset.test, key=lambda s: str(s.path))
    if not samples:
        raise ValueError(f"data_dir={data_dir} has no images; pass a 15 Scene folder.")
    step = max(len(samples) / n_images, 1.0)
    return [samples[int(i * step)].path for i in range(min(n_images, len(samples)))]


def _vgg(config: BenchConfig) -> torch.nn.Module:
    return create_backbone(config.backbone, resolve_weights(config.backbone, "none"))


def run_extraction_items(config: BenchConfig, paths: list[Path]) -> dict:
    """Items 1 and 2: the plain loop against the project's defaults, on the same images."""
    defaults = sweep_config(data_dir=config.data_dir)
    warm = paths[:16]

    options = {"precision": defaults.precision, "batch_size": defaults.batch_size, "num_workers": defaults.num_workers}
    # The peak covers model creation, the bf16 cast and one untimed pass with full batches.
    with PeakRss() as memory:
        model = _vgg(config)
        cfg = data_config(model, config.image_size)
        project_path_seconds(model, paths, cfg, **options)
    plain_model = _vgg(config)
    plain_loop_seconds(plain_model, warm, cfg)

    # The two loops alternate, so that both see the same load on a shared machine.
    timings: dict[str, list[float]] = {"plain": [], "project": []}
    load_before = load_average()
    with OtherCpu() as other:
        for _ in range(config.repeats):
            timings["plain"].append(plain_loop_seconds(plain_model, paths, cfg))
            timings["project"].append(project_path_seconds(model, paths, cfg, **options))
    load_after = load_average()
    plain = _throughput(summarize(timings["plain"], load_before, load_after, other.cores), len(paths))
    project = _throughput(summarize(timings["project"], load_before, load_after, other.cores), len(paths))
    project["options"] = {**options, "precision": resolve_precision(options["precision"], torch.device("cpu"))}
    project["peak_rss_bytes"] = memory.peak_bytes
    project["rss_increase_bytes"] = memory.peak_bytes - memory.start_bytes
    return {
        "plain": plain,
        "project": project,
        "speedup": project["images_per_second"] / plain["images_per_second"],
        "alternating": True,
        "backbone": config.backbone,
        "image_size": config.image_size,
    }


def run_levers(config: BenchConfig, paths: list[Path]) -> dict:
    """Measure each lever on its own: dtype and layout, batch size, decoding threads, decoding path."""
    cfg = data_config(_vgg(config), config.image_size)
    decode = make_decoder(cfg)
    batch32 = normalize_batch(next(iter_uint8_batches(paths[:32], decode, 32, 0)), cfg)
    steps = max(1, len(paths) // 32)
    levers: dict[str, dict] = {"backbone_batch32": {}, "batch_size": {}, "num_workers": {}}

    for mode in BACKBONE_MODES:
        model, batch = model_for_mode(config.backbone, mode), batch_for_mode(batch32, mode)
        seconds = repeat(lambda: backbone_only_seconds(model, batch, mode, steps), config.repeats)
        levers["backbone_batch32"][mode] = _throughput(seconds, steps * 32)
    model, batch = model_for_mode(config.backbone, "bf16_cl"), batch_for_mode(batch32, "bf16_cl")
    seconds = repeat(lambda: backbone_only_seconds(model, batch, "bf16_cl", steps, frozen=True), config.repeats)
    levers["backbone_batch32"]["bf16_cl_frozen"] = _throughput(seconds, steps * 32)
    if config.try_compile:
        model, batch = model_for_mode(config.backbone, "bf16_cl"), batch_for_mode(batch32, "bf16_cl")
        seconds = repeat(lambda: backbone_only_seconds(model, batch, "bf16_cl", steps, compiled=True), config.repeats)
        levers["backbone_batch32"]["bf16_cl_compiled"] = _throughput(seconds, steps * 32)
    del model

    model = _vgg(config)
    project_path_seconds(model, paths[:16], cfg, precision="bf16", batch_size=16, num_workers=1)
    for batch_size in (16, 32, 64):
        seconds = repeat(lambda: project_path_seconds(model, paths, cfg, precision="bf16", batch_size=batch_size, num_workers=1), config.repeats)
        levers["batch_size"][str(batch_size)] = _throughput(seconds, len(paths))
    for workers in (0, 1, 2):
        seconds = repeat(lambda: project_path_seconds(model, paths, cfg, precision="bf16", batch_size=32, num_workers=workers), config.repeats)
        levers["num_workers"][str(workers)] = _throughput(seconds, len(paths))

    sample = paths[:48]
    levers["decode_ms_per_image"] = {
        "timm_full_transform": decode_ms_per_image(sample, cfg, uint8=False),
        "uint8_then_batch_normalize": decode_ms_per_image(sample, cfg, uint8=True),
        "torch_threads": torch.get_num_threads(),
        "load": load_average(),
    }
    return levers


def run_ceiling(config: BenchConfig, images_per_second: float | None) -> dict:
    """Item 3: matmul throughput in bf16 and fp32, the backbone's GFLOP per image and its share."""
    ceiling = {
        "bf16": matmul_gflops(torch.bfloat16, n=config.matmul_size, repeats=max(config.repeats, 5)),
        "fp32": matmul_gflops(torch.float32, n=config.matmul_size, repeats=max(config.repeats, 5)),
        "gflop_per_image": forward_gflop(_vgg(config), config.image_size),
    }
    if images_per_second:
        achieved = images_per_second * ceiling["gflop_per_image"]
        ceiling["achieved_gflops"] = achieved
        ceiling["fraction_of_bf16"] = achieved / ceiling["bf16"]["gflops"]
        ceiling["fraction_of_best_bf16"] = achieved / ceiling["bf16"]["best_gflops"]
    return ceiling


def run_bench(config: BenchConfig, output: Path) -> dict:
    """Run the requested items, merge them into ``output``'s JSON record and write the markdown report."""
    record_path = output.with_suffix(".json")
    record = _read_record(record_path)
    environment = {**tracking.environment_info(), "torch_interop_threads": torch.get_num_interop_threads()}
    measured: dict[str, dict] = {}
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    paths = bench_images(config.data_dir, config.n_images)

    with scratch_dir(config) as scratch:
        root = Path(scratch)
        # Items 1 and 2 are measured together, on the same images.
        for item in sorted({2 if i == 1 else i for i in config.items}):
            log.info("Benchmark item %d.", item)
            result = _run_item(item, config, paths, root, {**record, **measured})
            if result is not None:
                measured[f"item{item}"] = {**result, "measured_at": stamp, "repeats": config.repeats}

    from research.bench_markdown import render

    # Read the record again: another benchmark run may have stored other items in the meantime.
    record = {**_read_record(record_path), **measured, "environment": environment}
    output.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1, sort_keys=True, default=str))
    output.write_text(render(record, record_path.name))
    log.info("Wrote %s and %s.", output, record_path)
    return record


def _read_record(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _run_item(item: int, config: BenchConfig, paths: list[Path], root: Path, record: dict) -> dict | None:
    if item == 2:
        result = run_extraction_items(config, paths)
        stored = record.get("item2", {})
        if config.levers:
            result["levers"] = run_levers(config, paths)
        elif "levers" in stored:
            # A run without levers keeps the stored lever table and states when it was measured.
            result["levers"] = stored["levers"]
            result["levers_measured_at"] = stored.get("levers_measured_at", stored.get("measured_at"))
        return result
    if item == 3:
        images_per_second = record.get("item2", {}).get("project", {}).get("images_per_second")
        return run_ceiling(config, images_per_second)
    if item == 4:
        if not config.weights:
            log.warning("Item 4 skipped: pass --weights with a checkpoint of %s.", config.accuracy_backbone)
            return None
        result = precision_accuracy(config, root / "accuracy")
        result["agreement"] = feature_agreement(config, paths[:64])
        return result
    if item == 5:
        result = tracking_overhead(config, root / "tracking")
        if config.largest_head:
            result["largest_head"] = largest_head_memory(config)
        return result
    if item == 6:
        return study_wall_time(config, root / "study")
    raise ValueError(f"Benchmark item {item} does not exist; use 1 to 6.")
