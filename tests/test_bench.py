"""``research bench`` on a tiny configuration: every item runs, the record and the report agree."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import timm
import torch
from mlflow.tracking import MlflowClient

from research import bench
from research.bench import BenchConfig, forward_gflop, matmul_gflops
from research.bench_cli import _items
from research.bench_markdown import render
from research.bench_report import run_bench
from research.bench_trial import time_mlflow_calls
from research.cli import build_parser
from research.backbone import create_backbone, resolve_weights
from tests.conftest import SHARED_DATA

LITE0_WEIGHTS = SHARED_DATA / "weights" / "tf_efficientnet_lite0.in1k.safetensors"


def _vgg16_gflop_by_hand(size: int) -> float:
    """VGG16 multiply-adds from its layer table: 13 3x3 convolutions, fc6 (7x7 conv) and fc7."""
    plan = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    macs, channels, side = 0, 3, size
    for step in plan:
        if step == "M":
            side //= 2
            continue
        macs += 9 * channels * step * side * side
        channels = step
    macs += 7 * 7 * 512 * 4096 + 4096 * 4096
    return 2 * macs / 1e9


def test_vgg16_gflop_counted_from_layers() -> None:
    model = create_backbone("vgg16", resolve_weights("vgg16", "none"))

    counted = forward_gflop(model, 224)

    assert counted == pytest.approx(_vgg16_gflop_by_hand(224), rel=1e-9)
    assert 30.0 < counted < 31.5


def test_matmul_gflops_reports_median_and_best() -> None:
    result = matmul_gflops(torch.float32, n=128, repeats=3)

    assert len(result["seconds"]) == 3
    assert result["best_gflops"] >= result["gflops"] > 0


def test_mlflow_call_timer_counts_and_restores(isolated_stores: dict) -> None:
    original = MlflowClient.log_batch
    client = MlflowClient()

    with time_mlflow_calls() as timer:
        experiment_id = client.create_experiment("timed")
        run_id = client.create_run(experiment_id).info.run_id
        client.log_metric(run_id, "m", 1.0)

    assert timer.calls == 3
    assert timer.seconds > 0
    assert MlflowClient.log_batch is original
    client.log_metric(run_id, "m", 2.0)
    assert timer.calls == 3


def test_item_list_is_checked() -> None:
    assert _items("3,1,3") == (1, 3)
    with pytest.raises(Exception, match="from 1 to 6"):
        _items("7")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--data-dir", "x", "--items", "a"])


def _tiny(data_dir: Path, tmp_path: Path, items: tuple[int, ...], **overrides) -> BenchConfig:
    values = dict(
        data_dir=str(data_dir), items=items, backbone="resnet18", image_size=32, n_images=6, repeats=2,
        head_in_features=64, head_width=32, head_epochs=2, study="svm", study_trials=2, accuracy_trials=2,
        workdir=str(tmp_path), matmul_size=256,
    )
    return BenchConfig(**{**values, **overrides})


def test_bench_extraction_items(presplit_tree: Path, isolated_stores: dict, tmp_path: Path) -> None:
    output = tmp_path / "reports" / "benchmarks.md"

    record = run_bench(_tiny(presplit_tree, tmp_path, (1, 3), levers=False), output)

    item2, item3 = record["item2"], record["item3"]
    assert item2["plain"]["images"] == item2["project"]["images"] == 6
    assert item2["speedup"] == pytest.approx(item2["project"]["images_per_second"] / item2["plain"]["images_per_second"])
    assert "levers" not in item2
    assert item2["project"]["peak_rss_bytes"] > 0
    assert item3["fraction_of_bf16"] == pytest.approx(item3["achieved_gflops"] / item3["bf16"]["gflops"])
    assert item3["achieved_gflops"] == pytest.approx(item2["project"]["images_per_second"] * item3["gflop_per_image"])

    stored = json.loads(output.with_suffix(".json").read_text())
    assert stored["item2"]["speedup"] == item2["speedup"]
    text = output.read_text()
    assert "| 1 | plain loop" in text
    assert f"{item2['speedup']:.1f}x" in text
    assert "## Levers" not in text


@pytest.mark.slow
def test_bench_levers(presplit_tree: Path, isolated_stores: dict, tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"

    levers = run_bench(_tiny(presplit_tree, tmp_path, (2,)), output)["item2"]["levers"]

    assert set(levers["backbone_batch32"]) == {"fp32", "fp32_cl", "autocast", "bf16", "bf16_cl"}
    assert set(levers["batch_size"]) == {"16", "32", "64"}
    assert set(levers["num_workers"]) == {"0", "1", "2"}
    assert levers["decode_ms_per_image"]["uint8_then_batch_normalize"] > 0
    assert "bf16 weights, channels_last (the project's path)" in output.read_text()


def test_bench_merges_later_items(presplit_tree: Path, isolated_stores: dict, tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    first = run_bench(_tiny(presplit_tree, tmp_path, (3,)), output)

    record = run_bench(_tiny(presplit_tree, tmp_path, (5, 6)), output)

    assert record["item3"] == first["item3"]
    item5, item6 = record["item5"], record["item6"]
    assert len(item5["batched"]["seconds"]) == 2
    assert item5["per_value"]["median_tracking_seconds"] > item5["batched"]["median_tracking_seconds"]
    assert item5["without"]["median_tracking_seconds"] < 1e-3
    assert item6["extractions"] == 1
    assert item6["tracking_calls"] > 0
    parts = item6["extraction_seconds"] + item6["audit_seconds"] + item6["tracking_seconds"] + item6["training_seconds"]
    assert parts == pytest.approx(item6["total_seconds"])
    assert "| 6 | study `svm`" in output.read_text()


@pytest.mark.slow
def test_bench_accuracy_item(presplit_tree: Path, isolated_stores: dict, tmp_path: Path) -> None:
    if not LITE0_WEIGHTS.is_file():
        pytest.skip(f"local weights not found at {LITE0_WEIGHTS}")
    output = tmp_path / "benchmarks.md"

    record = run_bench(_tiny(presplit_tree, tmp_path, (4,), weights=str(LITE0_WEIGHTS)), output)

    item4 = record["item4"]
    assert 0 <= item4["bf16"]["test_accuracy"] <= 1
    assert item4["difference_points"] == pytest.approx(100 * (item4["bf16"]["test_accuracy"] - item4["fp32"]["test_accuracy"]))
    assert 0 < item4["agreement"]["relative_error"] < 0.5
    assert "| 4 | SVM study test accuracy" in output.read_text()


def test_frozen_forward_matches_eager() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    batch = torch.rand(2, 3, 32, 32)

    frozen = bench.frozen_forward(model, batch)
    with torch.inference_mode():
        eager = model.forward_head(model.forward_features(batch), pre_logits=True)
        (traced,) = frozen(batch)

    assert isinstance(frozen, torch.jit.ScriptModule)
    assert torch.allclose(traced, eager, atol=1e-5)
    assert bench.backbone_only_seconds(model, batch, "fp32", steps=1, frozen=True) > 0


@pytest.mark.parametrize(("other", "expected"), [(0.1, "Other processes kept at most 0.10 of the 2 cores"), (1.2, "**The machine was shared**: other processes kept up to 1.20")])
def test_header_reports_other_cpu_use(other: float, expected: str) -> None:
    # The header reads other_cores wherever a measurement stored it; no item renders this one.
    record = {"environment": {"cpu_logical_cores": 2}, "unrendered": {"timing": {"load_before": 1.9, "load_after": 2.0, "other_cores": other}}}

    text = render(record, "benchmarks-test.json")

    assert expected in text
    assert "the raw numbers are in `benchmarks-test.json`" in text


def test_other_cpu_leaves_out_own_threads() -> None:
    with bench.OtherCpu() as other:
        deadline = time.perf_counter() + 0.3
        while time.perf_counter() < deadline:
            pass

    assert other.cores >= 0.0
    assert other.cores < 1.0
