"""Pooling variants of a backbone and activation statistics measured after each pooling layer.

``swap_pooling`` replaces every ``nn.MaxPool2d`` of a model by max, average or LP pooling with the
same kernel, stride, padding and ceil mode. LP pooling always runs in fp32, with autocast disabled
inside the layer: with p = 2 it squares its input, which overflows fp16 and loses most bits in
bf16, and a NaN or infinite value would otherwise reach the classifier.

``ActivationStats`` registers forward hooks on the pooling layers (named ``pool1`` .. ``poolN`` in
model order, so ``pool5`` is VGG16's last one) and accumulates, over every image of an extraction,
the mean and maximum absolute activation and the count of NaN or infinite values.

Tracked names (see ``research.sweep``): the run that extracted a pooling's features logs
``act_mean_pool1`` .. ``act_mean_pool5``, ``act_max_pool1`` .. ``act_max_pool5`` and
``act_nonfinite_pool1`` ..; the parent run of a sweep logs the same values prefixed with the
pooling, for example ``lp2_act_max_pool5``, plus ``<pooling>_images_per_second``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

POOLINGS = ("max", "avg", "lp1", "lp2")


class PoolingError(ValueError):
    """A pooling variant that does not exist or does not apply to the backbone."""


class Fp32LPPool2d(nn.LPPool2d):
    """``nn.LPPool2d`` computed in fp32 whatever the input dtype or autocast state, cast back after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float()).to(x.dtype)


def make_pooling(pooling: str, template: nn.MaxPool2d) -> nn.Module:
    """Build the ``pooling`` layer with the kernel, stride, padding and ceil mode of ``template``.

    Raises:
        PoolingError: Unknown pooling, or padding that LP pooling does not support.
    """
    if pooling not in POOLINGS:
        raise PoolingError(f"pooling={pooling!r} is invalid; use one of {', '.join(POOLINGS)}.")
    kernel, stride = template.kernel_size, template.stride
    if pooling == "max":
        return nn.MaxPool2d(kernel, stride, template.padding, template.dilation, ceil_mode=template.ceil_mode)
    if pooling == "avg":
        return nn.AvgPool2d(kernel, stride, template.padding, ceil_mode=template.ceil_mode)
    if template.padding not in (0, (0, 0)):
        raise PoolingError(f"pooling={pooling!r} cannot replace a MaxPool2d with padding={template.padding}: LPPool2d has no padding.")
    return Fp32LPPool2d(1.0 if pooling == "lp1" else 2.0, kernel, stride, ceil_mode=template.ceil_mode)


def max_pool_names(model: nn.Module) -> list[str]:
    """Return the qualified names of the model's ``nn.MaxPool2d`` layers, in model order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.MaxPool2d)]


def swap_pooling(model: nn.Module, pooling: str) -> list[str]:
    """Replace every ``nn.MaxPool2d`` of ``model`` in place and return the replaced layer names.

    ``max`` is accepted on any model and leaves it unchanged.

    Raises:
        PoolingError: Unknown pooling, or a pooling other than max on a model without MaxPool2d.
    """
    if pooling not in POOLINGS:
        raise PoolingError(f"pooling={pooling!r} is invalid; use one of {', '.join(POOLINGS)}.")
    names = max_pool_names(model)
    if pooling == "max":
        return names
    if not names:
        raise PoolingError(
            f"pooling={pooling!r} is invalid for {type(model).__name__}: the model has no MaxPool2d layer to replace. "
            "Use pooling=max, or a backbone with max-pooling layers such as vgg16."
        )
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make_pooling(pooling, getattr(parent, child)))
    return names


def pooling_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return ``(qualified name, module)`` of every pooling layer that ``swap_pooling`` may produce."""
    kinds = (nn.MaxPool2d, nn.AvgPool2d, nn.LPPool2d)
    return [(name, module) for name, module in model.named_modules() if isinstance(module, kinds)]


@dataclass
class _Accumulator:
    abs_sum: float = 0.0
    count: int = 0
    abs_max: float = 0.0
    nonfinite: int = 0


@dataclass
class ActivationStats:
    """Mean and maximum absolute activation after each pooling layer, over every image seen."""

    layers: list[str] = field(default_factory=list)
    _values: dict[str, _Accumulator] = field(default_factory=dict)
    _handles: list = field(default_factory=list)

    def attach(self, model: nn.Module) -> ActivationStats:
        """Register a forward hook on each pooling layer; ``detach`` or ``with`` removes them."""
        for index, (qualified, module) in enumerate(pooling_layers(model), start=1):
            short = f"pool{index}"
            self.layers.append(short)
            self._values[short] = _Accumulator()
            self._handles.append(module.register_forward_hook(self._hook(short, qualified)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> ActivationStats:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def _hook(self, short: str, qualified: str):
        def record(_module: nn.Module, _inputs, output: torch.Tensor) -> None:
            values = output.detach().float()
            finite = torch.isfinite(values)
            accumulator = self._values[short]
            accumulator.nonfinite += int((~finite).sum())
            magnitudes = values.abs().masked_fill(~finite, 0.0)
            accumulator.abs_sum += float(magnitudes.sum(dtype=torch.float64))
            accumulator.count += values.numel()
            accumulator.abs_max = max(accumulator.abs_max, float(magnitudes.max()) if values.numel() else 0.0)

        return record

    def metrics(self) -> dict[str, float]:
        """Return ``act_mean_poolK``, ``act_max_poolK`` and ``act_nonfinite_poolK`` for every layer."""
        result = {}
        for short in self.layers:
            accumulator = self._values[short]
            result[f"act_mean_{short}"] = accumulator.abs_sum / accumulator.count if accumulator.count else math.nan
            result[f"act_max_{short}"] = accumulator.abs_max
            result[f"act_nonfinite_{short}"] = float(accumulator.nonfinite)
        return result

    def first_nonfinite(self) -> str | None:
        """Return the first layer (in model order) whose output had a NaN or infinite value, else None."""
        return next((short for short in self.layers if self._values[short].nonfinite), None)
