"""Backbone variants (pooling, FC width) and their features, extracted at most once per sweep.

A trial names its variant through its params (``pooling``, ``fc_width``, ``fc_pretrained``).
``FeatureProvider`` keeps the features of every variant in memory after the first request; the
on-disk cache keeps them across sweeps. The first request of a variant logs its extraction record
(``images_per_second``, ``extract_batch_seconds`` and the activation statistics of
``research.pooling``) on the run that asked for it and, with the variant's prefix, on the parent run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import timm
import torch
from mlflow.tracking import MlflowClient

from research import tracking
from research.backbone import is_vgg
from research.cache import CacheEntry
from research.fc_width import VGG_FC_WIDTH
from research.pooling import PoolingError, make_pooling, max_pool_names
from research.studies import StudyConfig, StudyConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """Backbone change of a trial: its pooling layers and, for VGG, fresh fc6 and fc7 of another width.

    ``fc_width`` is None for the model's own fc layers (for VGG, the pre-trained 4096 wide ones).
    """

    pooling: str = "max"
    fc_width: int | None = None

    @classmethod
    def from_params(cls, params: dict) -> Variant:
        pooling = str(params.get("pooling", "max"))
        width = params.get("fc_width") if params.get("classifier") == "fc_width_svm" else None
        keep = bool(params.get("fc_pretrained", True))
        if width is None or (int(width) == VGG_FC_WIDTH and keep):
            # VGG's own fc6 and fc7: the same backbone, and cache entry, as the plain model.
            return cls(pooling)
        return cls(pooling, int(width))

    @property
    def prefix(self) -> str:
        """Metric prefix on the parent run, for example ``lp2`` or ``max_fc8196_fresh``."""
        if self.fc_width is None:
            return self.pooling
        return f"{self.pooling}_fc{self.fc_width}"


@dataclass
class Features:
    """Cached features of the three splits for one layer of one variant."""

    layer: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    cache_key: str = ""
    variant: Variant = Variant()


def check_backbone_variants(study: StudyConfig, backbone: str) -> None:
    """Reject a study whose poolings or FC widths ``backbone`` cannot build, before any trial runs.

    The model is built on PyTorch's ``meta`` device, so no weights are allocated or loaded.

    Raises:
        StudyConfigError: The study replaces max pooling in a backbone without MaxPool2d layers (or
            with padded ones, which LPPool2d cannot replace), or changes the FC width of a backbone
            that is not a timm VGG.
    """
    poolings = {choice for spec in study.params if spec.name == "pooling" for choice in spec.choices}
    poolings.add(study.fixed.get("pooling", "max"))
    other_poolings = sorted(poolings - {"max"})
    fc_width = "fc_width_svm" in study.classifiers()
    if not other_poolings and not fc_width:
        return

    with torch.device("meta"):
        model = timm.create_model(backbone, pretrained=False)
    if other_poolings and not max_pool_names(model):
        raise StudyConfigError(
            f"Study '{study.name}' replaces max pooling with {', '.join(other_poolings)}, but backbone {backbone} has no "
            "MaxPool2d layer to replace. Use backbone=vgg16 (with weights=none when no VGG16 checkpoint is at hand), "
            "or a study without a pooling search such as svm or head."
        )
    for pooling in other_poolings:
        for name in max_pool_names(model):
            try:
                make_pooling(pooling, model.get_submodule(name))
            except PoolingError as error:
                raise StudyConfigError(f"Study '{study.name}' cannot use pooling {pooling} on backbone {backbone} ({name}): {error}") from error
    if fc_width and not is_vgg(model):
        raise StudyConfigError(
            f"Study '{study.name}' changes the width of fc6 and fc7, which only a timm VGG has; backbone {backbone} is not one. "
            "Use backbone=vgg16 (with weights=none when no VGG16 checkpoint is at hand), or the svm study."
        )


def extraction_metrics(manifest: dict) -> dict[str, float]:
    """Return the scalar extraction metrics of a cache manifest (speed and activation statistics)."""
    return {"images_per_second": manifest["images_per_second"], **manifest.get("activation_stats", {})}


class FeatureProvider:
    """Features per (variant, layer), loading each variant's cache entry once.

    Args:
        load: Returns the cache entry of a variant, extracting on a cache miss.
        split: Turns a cache entry and a layer name into ``Features``.
        client: MLflow client for the extraction records.
        parent_id: Parent run that gets every variant's record with the variant's prefix.
    """

    def __init__(
        self,
        load: Callable[[Variant], CacheEntry],
        split: Callable[[CacheEntry, str, Variant], Features],
        client: MlflowClient,
        parent_id: str,
    ) -> None:
        self._load = load
        self._split = split
        self._client = client
        self._parent_id = parent_id
        self._entries: dict[Variant, CacheEntry] = {}
        self._features: dict[tuple[Variant, str], Features] = {}

    @property
    def entries(self) -> dict[Variant, CacheEntry]:
        return dict(self._entries)

    def add(self, variant: Variant, entry: CacheEntry) -> None:
        """Register an entry loaded by the caller and log its record on the parent run."""
        self._entries[variant] = entry
        self._log_extraction(variant, entry, None)

    def get(self, variant: Variant, layer: str, run_id: str | None = None) -> Features:
        """Return the features of ``variant`` at ``layer``; the first request logs the extraction on ``run_id``."""
        if variant not in self._entries:
            entry = self._load(variant)
            self._entries[variant] = entry
            self._log_extraction(variant, entry, run_id)
        key = (variant, layer)
        if key not in self._features:
            self._features[key] = self._split(self._entries[variant], layer, variant)
        return self._features[key]

    def _log_extraction(self, variant: Variant, entry: CacheEntry, run_id: str | None) -> None:
        metrics = extraction_metrics(entry.manifest)
        batch_seconds = entry.manifest["batch_seconds"]
        prefixed = {f"{variant.prefix}_{name}": value for name, value in metrics.items()}
        tracking.log_metrics(self._client, self._parent_id, prefixed)
        tracking.log_series(self._client, self._parent_id, f"{variant.prefix}_extract_batch_seconds", batch_seconds)
        if run_id is not None:
            tracking.log_metrics(self._client, run_id, metrics)
            tracking.log_series(self._client, run_id, "extract_batch_seconds", batch_seconds)
            tracking.set_tags(self._client, run_id, {"feature_extracted_here": True, "feature_cache_hit": entry.hit})
        stats = entry.manifest.get("activation_stats", {})
        # An empty dict is normal for backbones without pooling layers; a missing key marks an old entry.
        if "activation_stats" not in entry.manifest:
            log.warning(
                "Feature cache entry %s has no activation statistics because it was written before they were recorded. "
                "Delete that folder to re-extract it with them.", entry.path,
            )
        scales = ", ".join(f"{k[8:]}={v:.3g}" for k, v in stats.items() if k.startswith("act_max_"))
        log.info("Variant %s: %.1f images/s; max |activation| %s.", variant.prefix, metrics["images_per_second"], scales or "not recorded")
