"""VGG's fc6 and fc7 replaced by fresh layers of another width (the FC-width variant of the study).

timm's VGG computes fc6 and fc7 as convolutions in ``pre_logits`` (``fc1``: 512 -> 4096 with a
7x7 kernel, ``fc2``: 4096 -> 4096 with a 1x1 kernel), so relu7 features have the width of ``fc2``.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from research.backbone import is_vgg

VGG_FC_WIDTH = 4096
# Fresh fc layers are initialised from this fixed seed, so that the feature cache entry of a width
# is the same whatever the sweep's seed.
FRESH_FC_SEED = 0
# Rows of pool5 features per fc6/fc7 pass when relu7 is computed from cached pool5 features.
POOL5_BATCH = 256


def set_fc_width(model: nn.Module, width: int, keep_pretrained: bool = True) -> bool:
    """Give fc6 and fc7 of a timm VGG ``width`` outputs, in place; return whether the loaded ones were kept.

    The pre-trained layers are kept only when ``width`` is VGG's own 4096 and ``keep_pretrained``
    is set. Otherwise both layers are replaced by freshly initialised ones (PyTorch's default
    initialisation, seeded). The classifier after fc7 is not used by feature extraction and stays
    as it is.

    Raises:
        ValueError: The model is not a timm VGG, or ``width`` is not positive.
    """
    if not is_vgg(model):
        raise ValueError(
            f"fc_width={width} applies only to VGG backbones, not to {type(model).__name__}. Use backbone=vgg16 for this study."
        )
    if width < 1:
        raise ValueError(f"fc_width={width} is invalid; it must be at least 1.")
    if width == VGG_FC_WIDTH and keep_pretrained:
        return True

    mlp = model.pre_logits
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FRESH_FC_SEED)
        mlp.fc1 = nn.Conv2d(mlp.fc1.in_channels, width, kernel_size=mlp.fc1.kernel_size, bias=True)
        mlp.fc2 = nn.Conv2d(width, width, kernel_size=1, bias=True)
    mlp.out_features = width
    return False


def relu7_from_pool5(
    model: nn.Module, pool5: np.ndarray, *, device: torch.device, precision: str, batch_size: int = POOL5_BATCH
) -> tuple[np.ndarray, list[float]]:
    """Run a timm VGG's fc6 and fc7 on cached pool5 features; return relu7 and the seconds of each batch.

    Only fc6 and fc7 differ between FC-width variants, so their relu7 features follow from the
    pool5 features of the same pooling without running the convolutions again. The layers run in
    the precision of the extraction (bf16 values stored as float32 convert back exactly). When the
    map has fc6's kernel size (7x7 at 224 px), fc6 and fc7 run as matrix products. That is the
    same arithmetic as the convolutions, and it ran about 5 times faster in bf16 on a 2-core
    AVX512-BF16 CPU. The result then matches a full pass up to bf16 rounding. Other sizes go
    through the model's own ``forward_head``.

    Raises:
        ValueError: The model is not a timm VGG, or ``pool5`` does not match its channel count.
    """
    if not is_vgg(model):
        raise ValueError(f"relu7 from pool5 needs a timm VGG, not {type(model).__name__}.")
    channels = model.pre_logits.fc1.in_channels
    side = int(round((pool5.shape[1] / channels) ** 0.5))
    if channels * side * side != pool5.shape[1]:
        raise ValueError(f"pool5 features of width {pool5.shape[1]} are not {channels} square feature maps.")

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = model.to(device=device, dtype=dtype).eval()
    forward = _fc_as_matmul(model.pre_logits) if (side, side) == tuple(model.pre_logits.fc1.kernel_size) else None
    parts, seconds = [], []
    with torch.inference_mode():
        for start in range(0, pool5.shape[0], batch_size):
            began = time.perf_counter()
            rows = torch.from_numpy(pool5[start : start + batch_size]).to(device=device, dtype=dtype)
            if forward is not None:
                relu7 = forward(rows)
            else:
                relu7 = model.forward_head(rows.view(-1, channels, side, side), pre_logits=True)
            parts.append(relu7.float().cpu().numpy())
            seconds.append(time.perf_counter() - began)
    return np.concatenate(parts), seconds


def _fc_as_matmul(mlp: nn.Module):
    """Return fc6 -> ReLU -> fc7 -> ReLU of timm's ConvMlp as matrix products on flattened pool5 rows.

    fc6 is a convolution whose kernel covers the whole 7x7 map, so its weight flattened in (C, H, W)
    order is a matrix over pool5 flattened in the same order. fc7 is a 1x1 convolution. Dropout is
    left out, as in eval mode.
    """
    fc6 = mlp.fc1.weight.reshape(mlp.fc1.out_channels, -1)
    fc7 = mlp.fc2.weight.reshape(mlp.fc2.out_channels, -1)

    def forward(rows: torch.Tensor) -> torch.Tensor:
        hidden = mlp.act1(nn.functional.linear(rows, fc6, mlp.fc1.bias))
        return mlp.act2(nn.functional.linear(hidden, fc7, mlp.fc2.bias))

    return forward
