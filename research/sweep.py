"""One sweep: data, backbone, cached features, the Optuna study with one MLflow child run per trial, the test pass.

Started by ``mlflow run . -e sweep --env-manager local -P data_dir=...`` or ``research sweep``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient
from rich.progress import Progress

from research import tracking
from research.audit import Audit, audit_dataset, audit_markdown
from research.backbone import Weights, create_backbone, data_config, resolve_weights, select_device
from research.cache import CacheEntry, ensure_writable, load_or_build
from research.data import Dataset, load_dataset
from research.fc_width import POOL5_BATCH, relu7_from_pool5, set_fc_width
from research.layers import log_layer_table
from research.features import FeatureError, extract_features, feature_layers, resolve_layer, resolve_precision, split_arrays
from research.objectives import TrainSettings, classifier_params, make_objective
from research.optimize import enqueue_cover, prepare_study, run_study
from research.resume import sweep_parent_run
from research.pooling import ActivationStats, swap_pooling
from research.seeds import run_seed_repeats
from research.studies import StudyConfig, load_study
from research.variants import FeatureProvider, Features, Variant, check_backbone_variants
from research.workers import initialise_stores, run_worker_processes

log = logging.getLogger(__name__)


@dataclass
class SweepConfig:
    """Every input of a sweep, as given on the command line or by MLproject."""

    data_dir: str
    study: str = "full"
    n_trials: int = 20
    backbone: str = "vgg16"
    weights: str = "imagenet"
    image_size: int = 224
    limit_per_class: int = 0
    storage: str = "sqlite:///optuna.db"
    seed: int = 0
    seeds: int = 3
    # Overrides the study file's fixed ``max_epochs`` of the head when positive; 0 keeps the file's.
    max_epochs: int = 0
    experiment: str = "15-scene"
    study_name: str = ""
    cache_dir: str = "feature-cache"
    precision: str = "auto"
    batch_size: int = 32
    num_workers: int = 1
    val_fraction: float = 0.2
    device: str = "auto"
    workers: int = 1
    heartbeat_seconds: int = 60
    # Set only in the worker processes of `--workers N`: the parent run they log into.
    parent_run_id: str = ""

    def validate(self) -> None:
        """Reject out-of-range numbers before any work."""
        checks = {
            "n_trials": self.n_trials >= 1,
            "seeds": self.seeds >= 1,
            "image_size": self.image_size >= 32,
            "limit_per_class": self.limit_per_class >= 0,
            "batch_size": self.batch_size >= 1,
            "num_workers": self.num_workers >= 0,
            "workers": self.workers >= 1,
            "heartbeat_seconds": self.heartbeat_seconds >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                minimum = {"n_trials": 1, "seeds": 1, "image_size": 32, "batch_size": 1, "workers": 1, "heartbeat_seconds": 1}.get(name, 0)
                raise ValueError(f"{name}={getattr(self, name)} is invalid; it must be at least {minimum}.")


def default_study_name(config: SweepConfig, weights: Weights, audit: Audit) -> str:
    """Name the Optuna study after what makes its trials comparable, so a re-run resumes it."""
    from research.cache import cache_key

    data = cache_key({"files": sorted(audit.file_digests.items())})[:8]
    limit = f"-limit{config.limit_per_class}" if config.limit_per_class else ""
    # Two checkpoint files give different trials, so a file's digest is part of the name.
    source = f"file{weights.digest[:8]}" if weights.kind == "file" else weights.kind
    return f"{config.study}-{config.backbone}-{source}-{config.image_size}px{limit}-seed{config.seed}-data{data}"


def _extract_cached(
    config: SweepConfig, dataset: Dataset, audit: Audit, weights: Weights, variant: Variant = Variant()
) -> tuple[CacheEntry, str]:
    """Return the cache entry of every image of the dataset for one backbone variant, running the backbone only on a miss."""
    device = select_device(config.device)
    precision = resolve_precision(config.precision, device)
    files = sorted(audit.file_digests)
    fields = {
        "model": config.backbone,
        "weights": weights.digest,
        "pooling": variant.pooling,
        "image_size": config.image_size,
        "precision": precision,
        "files": files,
        "file_digests": [audit.file_digests[f] for f in files],
    }
    if variant.fc_width is not None:
        # Added only for this variant, so the keys of entries made before it existed stay valid.
        fields["fc_width"] = variant.fc_width
        # relu7 of these entries comes from cached pool5 through matrix products (see relu7_from_pool5).
        fields["relu7_from"] = "pool5-matmul"

    def build():
        model = create_backbone(config.backbone, weights)
        swap_pooling(model, variant.pooling)
        if variant.fc_width is not None:
            set_fc_width(model, variant.fc_width, keep_pretrained=False)
            base = _extract_cached(config, dataset, audit, weights, Variant(variant.pooling))[0]
            return _derive_fc_width(model, base, device, precision)
        with ActivationStats().attach(model) as stats:
            try:
                extraction = extract_features(
                    model,
                    [dataset.root / f for f in files],
                    data_config(model, config.image_size),
                    device=device,
                    precision=precision,
                    batch_size=config.batch_size,
                    num_workers=config.num_workers,
                )
            except FeatureError as error:
                layer = stats.first_nonfinite()
                where = f"; the first NaN or infinite value appeared after {layer}" if layer else ""
                raise FeatureError(f"pooling={variant.pooling}{where}: {error}") from error
        extra = {
            "activation_stats": stats.metrics(),
            "batch_seconds": extraction.batch_seconds,
            "batch_size": extraction.batch_size,
            "images_per_second": extraction.images_per_second,
            "layers": list(feature_layers(model)),
        }
        return extraction.arrays, extra

    return load_or_build(Path(config.cache_dir), fields, build), precision


def _derive_fc_width(model, base: CacheEntry, device, precision: str) -> tuple[dict, dict]:
    """Compute an FC-width variant's relu7 from the pool5 features of its pooling (see ``relu7_from_pool5``)."""
    start = time.perf_counter()
    relu7, batch_seconds = relu7_from_pool5(model, base.arrays["pool5"], device=device, precision=precision)
    seconds = time.perf_counter() - start
    if not np.isfinite(relu7).all():
        raise FeatureError(f"relu7 features computed from cache entry {base.key} contain NaN or infinite values. Re-run with precision=fp32.")
    log.info("relu7 of fc width %d computed from the cached pool5 features in %.1f s.", model.pre_logits.fc2.out_channels, seconds)
    extra = {
        "activation_stats": base.manifest.get("activation_stats", {}),
        "batch_seconds": batch_seconds,
        "batch_size": POOL5_BATCH,
        "images_per_second": len(relu7) / seconds,
        "layers": ["relu7"],
        "derived_from": base.key,
    }
    return {"relu7": relu7}, extra


def _features(entry: CacheEntry, dataset: Dataset, layer: str, variant: Variant = Variant()) -> Features:
    layer = resolve_layer(entry.manifest["layers"], layer)
    parts = {}
    for split in ("train", "val", "test"):
        parts[split] = split_arrays(entry.arrays, entry.rows, dataset.split(split), dataset.root, layer)
    return Features(layer, *parts["train"], *parts["val"], *parts["test"], cache_key=entry.key, variant=variant)


def _log_extraction(client: MlflowClient, run_id: str, entry: CacheEntry, precision: str) -> None:
    manifest = entry.manifest
    tracking.log_metrics(client, run_id, {"images_per_second": manifest["images_per_second"]})
    tracking.log_series(client, run_id, "extract_batch_seconds", manifest["batch_seconds"])
    tracking.log_new_params(client, run_id, {"precision": precision, "feature_cache_key": entry.key, "extract_batch_size": manifest["batch_size"]})
    tracking.set_tags(client, run_id, {"feature_cache_hit": entry.hit})


def run_sweep(config: SweepConfig) -> dict:
    """Run the whole sweep and return the parent run's id and its test metrics."""
    start = time.perf_counter()
    config.validate()
    study_config = load_study(config.study)
    if config.max_epochs > 0:
        study_config = dataclasses.replace(study_config, fixed={**study_config.fixed, "max_epochs": config.max_epochs})
    weights = resolve_weights(config.backbone, config.weights)
    check_backbone_variants(study_config, config.backbone)
    ensure_writable(Path(config.cache_dir), "cache_dir")
    initialise_stores(config)
    dataset = load_dataset(config.data_dir, seed=config.seed, val_fraction=config.val_fraction, limit_per_class=config.limit_per_class)
    client = MlflowClient()

    with Progress() as progress:
        task = progress.add_task("audit", total=len(dataset.train) + len(dataset.val) + len(dataset.test))
        audit = audit_dataset(dataset, progress=lambda n: progress.advance(task, n))
    study_name = config.study_name or default_study_name(config, weights, audit)
    study = prepare_study(config, study_config, study_name)
    if not config.parent_run_id:
        enqueue_cover(study, study_config)

    parent_name = f"sweep {config.study} {config.backbone}"
    with sweep_parent_run(client, config.experiment, parent_name, study_name, worker_of=config.parent_run_id) as parent_id:
        experiment_id = client.get_run(parent_id).info.experiment_id
        shared = {"backbone": config.backbone, "weights": weights.label, "image_size": config.image_size, "seed": config.seed}
        tracking.log_new_params(client, parent_id, {
            **shared, "study": config.study, "study_name": study_name, "data_dir": str(dataset.root),
            "n_trials": config.n_trials, "seeds": config.seeds, "max_epochs": config.max_epochs, "limit_per_class": config.limit_per_class, "val_fraction": config.val_fraction,
            "storage": tracking.redact_url(config.storage), "classifier": study_config.classifier,
            "weights_request": config.weights,
        })
        tracking.set_tags(client, parent_id, {
            "optuna.study_name": study_name,
            "weights_kind": weights.kind,
            "weights_random": weights.is_random,
            "mlflow.note.content": _description(config, study_config, dataset, weights, study_name),
        })
        tracking.log_json(client, parent_id, audit.to_json(), "audit/audit.json")
        tracking.log_text(client, parent_id, audit_markdown(audit), "audit/audit.md")
        tracking.log_metrics(client, parent_id, {
            "n_train": len(dataset.train), "n_val": len(dataset.val), "n_test": len(dataset.test),
            "duplicate_groups_within": len(audit.duplicates_within), "duplicate_groups_across": len(audit.duplicates_across),
            "skipped_files": len(audit.skipped_files),
        })
        environment = tracking.environment_info()
        tracking.log_json(client, parent_id, environment, "environment.json")
        log_layer_table(client, parent_id, config.backbone, config.image_size)
        tracking.set_tags(client, parent_id, {"git_commit": environment["git_commit"], "cpu_model": environment["cpu_model"]})

        entry, precision = _extract_cached(config, dataset, audit, weights)
        _log_extraction(client, parent_id, entry, precision)
        provider = FeatureProvider(
            lambda variant: _extract_cached(config, dataset, audit, weights, variant)[0],
            lambda cached, layer, variant: _features(cached, dataset, layer, variant),
            client,
            parent_id,
        )
        provider.add(Variant(), entry)
        device = select_device(config.device)
        settings = TrainSettings(device, precision == "bf16", config.seed)
        objective = make_objective(client, parent_id, experiment_id, study_config, provider, {**shared, "precision": precision}, settings)
        if config.workers > 1:
            run_worker_processes(config, study_name, parent_id)
        study = run_study(config, study_config, study_name, objective, show_progress=not config.parent_run_id)
        if config.parent_run_id:
            # A worker of `--workers N`: the process that started it runs the test pass.
            return {"parent_run_id": parent_id, "study_name": study_name, "cache_hit": entry.hit}
        best_params = classifier_params({"classifier": study_config.classifier, **study_config.fixed, **study.best_trial.params})
        metrics = run_seed_repeats(
            client, parent_id, study, best_params, provider,
            study_config.layer_for(best_params["classifier"]), settings, config.seeds,
        )
        tracking.log_metrics(client, parent_id, {"sweep_seconds": time.perf_counter() - start})

    # cache_hit is the plain model's entry; variant_cache_hits covers every variant the trials used.
    hits = {variant.prefix: cached.hit for variant, cached in provider.entries.items()}
    return {"parent_run_id": parent_id, "study_name": study_name, "cache_hit": entry.hit, "variant_cache_hits": hits, **metrics}


def _description(config: SweepConfig, study: StudyConfig, dataset: Dataset, weights: Weights, study_name: str) -> str:
    lines = [
        f"Study `{config.study}` ({study.description.strip()}) on {dataset.root} ({dataset.layout}, {len(dataset.classes)} classes).",
        f"Backbone `{config.backbone}` with weights `{weights.label}`, {config.image_size} px. Optuna study `{study_name}`.",
    ]
    if weights.is_random:
        lines.insert(0, "**RANDOM WEIGHTS**: the backbone is randomly initialised (weights=none); accuracies do not measure ImageNet transfer.")
    return "\n\n".join(lines)


def run_extract(config: SweepConfig) -> dict:
    """Audit the dataset and fill the feature cache, tracked as one MLflow run; no study is run."""
    config.validate()
    weights = resolve_weights(config.backbone, config.weights)
    dataset = load_dataset(config.data_dir, seed=config.seed, val_fraction=config.val_fraction, limit_per_class=config.limit_per_class)
    audit = audit_dataset(dataset)
    client = MlflowClient()

    with tracking.parent_run(client, config.experiment, f"extract {config.backbone}") as run_id:
        tracking.log_new_params(client, run_id, {
            "backbone": config.backbone, "weights": weights.label, "image_size": config.image_size,
            "data_dir": str(dataset.root), "limit_per_class": config.limit_per_class,
        })
        tracking.set_tags(client, run_id, {"weights_kind": weights.kind, "weights_random": weights.is_random})
        tracking.log_text(client, run_id, audit_markdown(audit), "audit/audit.md")
        entry, precision = _extract_cached(config, dataset, audit, weights)
        _log_extraction(client, run_id, entry, precision)

    return {"run_id": run_id, "cache_dir": str(entry.path), "cache_hit": entry.hit, "images_per_second": entry.manifest["images_per_second"]}
