"""Classify pictures with the backbone's own ImageNet head, tracked as one MLflow run.

The run (tag ``research.command=predict``) logs ``predict/predictions.json`` (the top classes of
every picture) and one figure per picture and report language, ``predict/<lang>/<NN>-<stem>.png``:
the picture titled with its top class, beside the table of its top classes.
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
from research.plots import predict_figure, save_png
from research.report_text import LANGS, Text

log = logging.getLogger(__name__)

COMMAND_TAG = "research.command"
# Pictures are shown at most this many pixels on their longer side in the logged figures.
FIGURE_MAX_SIDE = 512


@dataclass(frozen=True)
class Prediction:
    """The top classes of one picture, in decreasing probability."""

    image: str
    top: list[dict]


def class_names(model: nn.Module) -> list[str]:
    """Return the name of each output of the model's head (``class N`` when timm has no names)."""
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    subset = timm.data.infer_imagenet_subset(model)
    if subset is None:
        return [f"class {i}" for i in range(num_classes)]
    info = timm.data.ImageNetInfo(subset)
    return [info.index_to_description(i) for i in range(info.num_classes())]


def top_classes(logits: torch.Tensor, names: list[str], k: int) -> list[dict]:
    """Turn one picture's logits into its ``k`` most probable classes.

    Each entry contains ``index``, ``label`` (the first name of the class), ``description`` (every
    name timm gives the class) and ``probability`` (softmax).
    """
    probabilities = logits.float().softmax(dim=-1)
    values, indices = probabilities.topk(min(k, probabilities.numel()))
    top = []
    for value, index in zip(values.tolist(), indices.tolist()):
        description = names[index] if index < len(names) else f"class {index}"
        top.append({"index": index, "label": description.split(",")[0], "description": description, "probability": value})
    return top


def predict_images(model: nn.Module, paths: list[Path], k: int = 5, device: torch.device | None = None) -> list[Prediction]:
    """Classify each picture with the model's head, using timm's pre-processing for the model."""
    device = device or select_device("auto")
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    names = class_names(model)
    model = model.to(device).eval()
    predictions = []
    with torch.inference_mode():
        for path in paths:
            logits = model(transform(open_rgb(path)).unsqueeze(0).to(device))[0]
            predictions.append(Prediction(path.name, top_classes(logits.cpu(), names, k)))
            log.info("%s: %s (%.3f).", path.name, predictions[-1].top[0]["label"], predictions[-1].top[0]["probability"])
    return predictions


def _thumbnail(path: Path) -> np.ndarray:
    picture = open_rgb(path)
    picture.thumbnail((FIGURE_MAX_SIDE, FIGURE_MAX_SIDE))
    return np.asarray(picture)


def check_image_files(images: list[str]) -> list[Path]:
    """Turn picture paths into Paths, raising FileNotFoundError that lists every missing one."""
    paths = [Path(image).expanduser() for image in images]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"Image files not found: {', '.join(missing)}. Pass paths to existing picture files.")
    return paths


def run_predict(images: list[str], backbone: str = "vgg16", weights: str = "imagenet", experiment: str = "15-scene", top_k: int = 5) -> dict:
    """Classify pictures and log their top classes and figures as one MLflow run.

    Raises:
        FileNotFoundError: A picture does not exist.
        WeightsError: The weights cannot be loaded.
        ValueError: ``top_k`` is below 1.
    """
    if top_k < 1:
        raise ValueError(f"top_k={top_k} is invalid; it must be at least 1.")
    paths = check_image_files(images)
    resolved = resolve_weights(backbone, weights)
    model = create_backbone(backbone, resolved)
    predictions = predict_images(model, paths, top_k)
    client = MlflowClient()

    with tracking.parent_run(client, experiment, f"predict {backbone}") as run_id:
        tracking.log_new_params(client, run_id, {
            "backbone": backbone, "weights": resolved.label, "top_k": top_k,
            "image_size": timm.data.resolve_data_config({}, model=model)["input_size"][-1],
        })
        tracking.set_tags(client, run_id, {COMMAND_TAG: "predict", "weights_kind": resolved.kind, "weights_random": resolved.is_random})
        records = []
        with tempfile.TemporaryDirectory() as folder:
            for index, (path, prediction) in enumerate(zip(paths, predictions)):
                stem = f"{index:02d}-{path.stem}"
                records.append({"image": prediction.image, "figure": f"{stem}.png", "top": prediction.top})
                picture = _thumbnail(path)
                for lang in LANGS:
                    figure_path = save_png(predict_figure(picture, prediction.top, Text(lang)), Path(folder) / lang / f"{stem}.png")
                    client.log_artifact(run_id, str(figure_path), f"predict/{lang}")
        tracking.log_json(client, run_id, {"backbone": backbone, "weights": resolved.label, "images": records}, "predict/predictions.json")

    return {"run_id": run_id, "predictions": [{"image": p.image, "top1": p.top[0]["label"], "probability": p.top[0]["probability"]} for p in predictions]}
