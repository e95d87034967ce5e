"""The timm backbone: model creation, weight resolution (hub, local file or random) and data config."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)

HUB_TIMEOUT_SECONDS = 5.0
# Name of the weights option in error messages, in the spellings of both `research` and `mlflow run`.
WEIGHTS_OPTION = "the weights option (--weights, or -P weights=... under mlflow run)"
# weights=none draws the random initialisation from this fixed seed, so two runs (and the feature
# cache shared between them) see the same random backbone whatever the sweep's seed.
RANDOM_INIT_SEED = 0


class WeightsError(RuntimeError):
    """The requested weights cannot be loaded; the message names the fix."""


@dataclass(frozen=True)
class Weights:
    """Resolved weights: what the user asked for and what identifies the loaded tensors."""

    request: str
    kind: str  # "imagenet", "file" or "random"
    label: str  # hub tag, file name with digest prefix, or "random"
    digest: str  # sha256 of the file, the hub id, or "random"

    @property
    def is_random(self) -> bool:
        return self.kind == "random"


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Return the sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_model_name(name: str) -> None:
    if name not in timm.list_models():
        close = timm.list_models(f"*{name}*")[:8]
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise WeightsError(f"Unknown timm model '{name}'.{hint} See timm.list_models() for the names.")


def _hub_reachable(pretrained_cfg: dict) -> bool:
    """Check that the weights host resolves and accepts a TCP connection within a few seconds."""
    url = pretrained_cfg.get("url") or ""
    host = urlparse(url).hostname if url else None
    host = host or os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("//")[-1].split("/")[0]
    try:
        with socket.create_connection((host, 443), timeout=HUB_TIMEOUT_SECONDS):
            return True
    except OSError:
        return False


def _hub_weights_cached(pretrained_cfg: dict) -> bool:
    hub_id = pretrained_cfg.get("hf_hub_id")
    if not hub_id:
        return False
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(hub_id, filename), str):
            return True
    return False


def resolve_weights(model_name: str, request: str) -> Weights:
    """Check that the requested weights can be loaded, before any other work.

    Args:
        model_name: timm model name, for example ``vgg16``.
        request: ``imagenet`` (timm's pretrained weights from the hub), ``none`` (random
            initialisation) or a path to a local checkpoint (``.safetensors``, ``.pth``, ``.bin``).

    Raises:
        WeightsError: Unknown model, missing file, or hub weights that cannot be downloaded.
    """
    _check_model_name(model_name)
    lowered = request.strip().lower()
    if lowered in {"none", "random"}:
        return Weights(request, "random", "random", f"random-init-seed{RANDOM_INIT_SEED}")

    if lowered == "imagenet":
        cfg = timm.models.get_pretrained_cfg(model_name)
        cfg_dict = cfg.to_dict() if cfg is not None else {}
        if not (cfg_dict.get("hf_hub_id") or cfg_dict.get("url")):
            raise WeightsError(f"timm has no pretrained weights for '{model_name}'. Set {WEIGHTS_OPTION} to a checkpoint path or to none.")
        if not _hub_weights_cached(cfg_dict) and not _hub_reachable(cfg_dict):
            raise WeightsError(
                f"weights=imagenet: the pretrained weights of '{model_name}' cannot be downloaded "
                f"({cfg_dict.get('hf_hub_id') or cfg_dict.get('url')}: no network and not in the local "
                f"hub cache). Set {WEIGHTS_OPTION} to a local checkpoint file, or to none for random "
                "initialisation."
            )
        tag = cfg_dict.get("hf_hub_id") or f"{model_name}.{cfg_dict.get('tag', '')}"
        return Weights(request, "imagenet", tag, tag)

    path = Path(request).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"Weights file {path} does not exist. Set {WEIGHTS_OPTION} to an existing checkpoint, "
            "to imagenet for the hub weights, or to none for random initialisation."
        )
    digest = file_sha256(path)
    return Weights(str(path.resolve()), "file", f"{path.name}@{digest[:12]}", digest)


def create_backbone(model_name: str, weights: Weights) -> nn.Module:
    """Create the timm model with the resolved weights, in eval mode.

    A local file goes through timm's own pretrained-config path (``pretrained_cfg_overlay``), so
    timm applies the same key filtering and classifier handling as for hub weights.

    Raises:
        WeightsError: The weights do not fit the model or cannot be read.
    """
    try:
        if weights.kind == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                model = timm.create_model(model_name, pretrained=False)
            log.warning("Backbone %s uses RANDOM weights (weights=none): accuracies are not ImageNet transfer.", model_name)
        elif weights.kind == "imagenet":
            model = timm.create_model(model_name, pretrained=True)
        else:
            model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay={"file": weights.request})
    except (RuntimeError, OSError, ValueError, KeyError) as error:
        # timm lists every missing and unexpected key; the first lines are enough to see the mismatch.
        detail = str(error).strip().splitlines()
        summary = " ".join(detail[:2])[:300] + (" ..." if len(detail) > 2 or len(" ".join(detail[:2])) > 300 else "")
        raise WeightsError(
            f"Loading weights '{weights.request}' into '{model_name}' failed: {summary} Check that the file is a "
            f"checkpoint of {model_name}. If it belongs to another model, set the backbone option to that model's timm "
            f"name (for example backbone=tf_efficientnet_lite0), or set {WEIGHTS_OPTION} to none."
        ) from error

    log.info("Backbone %s created with weights %s.", model_name, weights.label)
    return model.eval()


def data_config(model: nn.Module, image_size: int) -> dict:
    """Return timm's pre-processing config for the model, at ``image_size`` pixels."""
    cfg = timm.data.resolve_data_config({}, model=model)
    cfg["input_size"] = (3, image_size, image_size)
    return cfg


def is_vgg(model: nn.Module) -> bool:
    """Tell whether the model is a timm VGG (has ``features`` and a ConvMlp ``pre_logits``)."""
    return isinstance(model, timm.models.vgg.VGG)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def select_device(requested: str = "auto") -> torch.device:
    """Pick CUDA when available (or requested), else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)
