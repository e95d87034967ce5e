"""Feature maps of a backbone's first convolution for a picture, tracked as one MLflow run.

The run (tag ``research.command=featuremaps``) logs, per picture ``NN-<stem>`` and report language,
``featuremaps/<lang>/NN-<stem>-maps.png`` (every map of the first convolution, each scaled to its
own range) and ``featuremaps/<lang>/NN-<stem>-threshold.png`` (per map, the pixels at or above the
map's quantile drawn in red over the picture), and ``featuremaps/featuremaps.json`` with the layer,
the map count and size, and each map's mean and maximum.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from research import tracking
from research.backbone import create_backbone, resolve_weights, select_device
from research.data import open_rgb
from research.plots import maps_figure, save_png, threshold_figure
from research.predict import COMMAND_TAG, check_image_files
from research.report_text import LANGS, Text

log = logging.getLogger(__name__)

DEFAULT_QUANTILE = 0.95
MOST_ACTIVE = 8


@dataclass
class FeatureMaps:
    """The first convolution's output for one picture, and the picture as the model saw it."""

    layer: str
    maps: np.ndarray  # (channels, height, width), float32, before any activation
    picture: np.ndarray  # grayscale in [0, 1], resized to the maps' height and width


def first_convolution(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """Return the name and module of the model's first ``nn.Conv2d`` in module order.

    Raises:
        ValueError: The model has no 2-D convolution.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise ValueError(f"Model {type(model).__name__} has no nn.Conv2d layer; feature maps need a convolutional backbone.")


def _model_view(tensor: torch.Tensor, data_cfg: dict, size: tuple[int, int]) -> np.ndarray:
    """Undo the normalisation of an input tensor and return it as grayscale of the maps' size."""
    mean = torch.tensor(data_cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(data_cfg["std"]).view(3, 1, 1)
    rgb = (tensor * std + mean).clamp(0, 1)
    gray = rgb.mean(dim=0, keepdim=True)[None]
    return torch.nn.functional.interpolate(gray, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def compute_feature_maps(model: nn.Module, path: Path, device: torch.device | None = None) -> FeatureMaps:
    """Run the model on one picture and capture the output of its first convolution."""
    device = device or select_device("auto")
    data_cfg = timm.data.resolve_data_config({}, model=model)
    tensor = timm.data.create_transform(**data_cfg)(open_rgb(path))
    layer, conv = first_convolution(model)
    captured: list[torch.Tensor] = []
    hook = conv.register_forward_hook(lambda _module, _inputs, output: captured.append(output.detach()))
    model = model.to(device).eval()
    try:
        with torch.inference_mode():
            # Only the first convolution's output is needed, but timm models have no generic way to
            # stop early, so the whole forward pass runs once.
            model(tensor.unsqueeze(0).to(device))
    finally:
        hook.remove()
    maps = captured[0][0].float().cpu().numpy()
    return FeatureMaps(layer, maps, _model_view(tensor, data_cfg, maps.shape[1:]))


def map_statistics(maps: np.ndarray) -> dict:
    """Return each map's mean and maximum, and the maps with the largest mean first."""
    means = maps.reshape(maps.shape[0], -1).mean(axis=1)
    maxima = maps.reshape(maps.shape[0], -1).max(axis=1)
    order = np.argsort(-means, kind="stable")
    return {
        "mean": [float(v) for v in means],
        "max": [float(v) for v in maxima],
        "most_active": [int(i) for i in order[:MOST_ACTIVE]],
    }


def run_featuremaps(
    images: list[str], backbone: str = "vgg16", weights: str = "imagenet", experiment: str = "15-scene", quantile: float = DEFAULT_QUANTILE
) -> dict:
    """Compute and log the first convolution's maps of each picture as one MLflow run.

    Raises:
        FileNotFoundError: A picture does not exist.
        WeightsError: The weights cannot be loaded.
        ValueError: ``quantile`` is outside (0, 1), or the model has no convolution.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile={quantile} is invalid; it must be strictly between 0 and 1, for example 0.95.")
    paths = check_image_files(images)
    resolved = resolve_weights(backbone, weights)
    model = create_backbone(backbone, resolved)
    results = [compute_feature_maps(model, path) for path in paths]
    client = MlflowClient()

    with tracking.parent_run(client, experiment, f"featuremaps {backbone}") as run_id:
        tracking.log_new_params(client, run_id, {"backbone": backbone, "weights": resolved.label, "quantile": quantile})
        tracking.set_tags(client, run_id, {COMMAND_TAG: "featuremaps", "weights_kind": resolved.kind, "weights_random": resolved.is_random})
        records = []
        with tempfile.TemporaryDirectory() as folder:
            for index, (path, result) in enumerate(zip(paths, results)):
                stem = f"{index:02d}-{path.stem}"
                records.append({
                    "image": path.name, "stem": stem, "layer": result.layer,
                    "n_maps": int(result.maps.shape[0]), "map_size": [int(s) for s in result.maps.shape[1:]],
                    **map_statistics(result.maps),
                })
                for lang in LANGS:
                    _log_figures(client, run_id, Path(folder), lang, stem, path.name, result, quantile)
        tracking.log_json(client, run_id, {"backbone": backbone, "weights": resolved.label, "quantile": quantile, "images": records}, "featuremaps/featuremaps.json")
        log.info("Logged the feature maps of %d pictures (%s, %d maps each) to run %s.", len(paths), results[0].layer, results[0].maps.shape[0], run_id)

    return {"run_id": run_id, "layer": results[0].layer, "n_maps": [int(r.maps.shape[0]) for r in results]}


def _log_figures(client: MlflowClient, run_id: str, folder: Path, lang: str, stem: str, picture: str, result: FeatureMaps, quantile: float) -> None:
    text = Text(lang)
    n = result.maps.shape[0]
    shown_quantile = text.number(quantile, 2)
    figures = {
        "maps": maps_figure(result.maps, text("fig_maps_title", picture=picture, n=n, layer=result.layer)),
        "threshold": threshold_figure(result.picture, result.maps, quantile, text("fig_threshold_title", picture=picture, quantile=shown_quantile)),
    }
    for kind, figure in figures.items():
        path = save_png(figure, folder / lang / f"{stem}-{kind}.png")
        client.log_artifact(run_id, str(path), f"featuremaps/{lang}")
