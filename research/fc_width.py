"""VGG's fc6 and fc7 replaced by fresh layers of another width (the FC-width variant of the study).

timm's VGG computes fc6 and fc7 as convolutions in ``pre_logits`` (``fc1``: 512 -> 4096 with a
7x7 kernel, ``fc2``: 4096 -> 4096 with a 1x1 kernel), so relu7 features have the width of ``fc2``.
"""

from __future__ import annotations

import torch
from torch import nn

from research.backbone import is_vgg

VGG_FC_WIDTH = 4096
# Fresh fc layers are initialised from this fixed seed, so that the feature cache entry of a width
# is the same whatever the sweep's seed.
FRESH_FC_SEED = 0


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
