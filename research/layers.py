"""The per-layer parameter table of a timm model: type, channels, weights, biases and output size.

The table is computed from the model itself, on PyTorch's ``meta`` device: no weights are loaded
and no arithmetic runs, so it costs milliseconds even for VGG16. For timm's ``vgg16`` the totals
are 138,344,128 weights + 13,416 biases = 138,357,544 parameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import timm
import torch
from torch import nn

# Parameter names counted as biases; every other parameter of a layer counts as a weight
# (convolution kernels, linear matrices, and the scale of normalisation layers).
BIAS_NAMES = ("bias",)


@dataclass(frozen=True)
class LayerRow:
    """One layer of the table; ``output_size`` is (channels, height, width) or (features,)."""

    name: str
    type: str
    in_channels: int | None
    out_channels: int | None
    kernel: str
    weights: int
    biases: int
    output_size: tuple[int, ...]

    @property
    def parameters(self) -> int:
        return self.weights + self.biases


def _channels(module: nn.Module) -> tuple[int | None, int | None]:
    for in_name, out_name in (("in_channels", "out_channels"), ("in_features", "out_features")):
        if hasattr(module, in_name) and hasattr(module, out_name):
            return int(getattr(module, in_name)), int(getattr(module, out_name))
    if hasattr(module, "num_features"):
        return int(module.num_features), int(module.num_features)
    return None, None


def _kernel(module: nn.Module) -> str:
    size = getattr(module, "kernel_size", None)
    if size is None:
        return ""
    if isinstance(size, int):
        size = (size, size)
    return "x".join(str(int(s)) for s in size)


def _is_pooling(module: nn.Module) -> bool:
    return "pool" in type(module).__name__.lower()


def _counts(module: nn.Module) -> tuple[int, int]:
    weights = biases = 0
    for name, parameter in module.named_parameters(recurse=False):
        if name in BIAS_NAMES:
            biases += parameter.numel()
        else:
            weights += parameter.numel()
    return weights, biases


def _output_shape(output) -> tuple[int, ...]:
    """Return an output's shape without the batch dimension; the first tensor of a tuple counts."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if isinstance(output, torch.Tensor):
        return tuple(int(s) for s in output.shape[1:])
    return ()


def layer_rows(model: nn.Module, image_size: int) -> list[LayerRow]:
    """List the layers that own parameters, and the pooling layers that change the spatial size.

    The model runs once on a ``meta`` copy of a (1, 3, ``image_size``, ``image_size``) input, so
    the model must live on the ``meta`` device (see :func:`describe_model`) or be small enough to
    run on the CPU. Layers are listed in module order. A layer that the forward pass never calls
    keeps an empty ``output_size``.
    """
    device = next(model.parameters()).device
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    hooks = []
    for name, module in model.named_modules():
        def record(module, inputs, output, name=name):
            shapes.setdefault(name, (_output_shape(inputs), _output_shape(output)))

        hooks.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()

    rows = []
    for name, module in model.named_modules():
        weights, biases = _counts(module)
        in_shape, out_shape = shapes.get(name, ((), ()))
        # NOTE: a pooling layer that keeps its input's shape (timm's global pool over a 1x1 map in
        # VGG's head) does nothing and is left out, like the activations and dropouts.
        pools = _is_pooling(module) and not list(module.children()) and in_shape != out_shape
        if weights + biases == 0 and not pools:
            continue
        in_channels, out_channels = _channels(module)
        if pools and out_shape:
            in_channels = in_channels or (in_shape[0] if in_shape else None)
            out_channels = out_channels or out_shape[0]
        rows.append(LayerRow(name or type(model).__name__, type(module).__name__, in_channels, out_channels, _kernel(module), weights, biases, out_shape))
    return rows


def describe_model(model_name: str, image_size: int = 224) -> dict:
    """Build the layer table of a timm model as a JSON-serialisable dict, without loading weights.

    Returns:
        ``model``, ``image_size``, ``num_classes``, ``rows`` (one dict per :class:`LayerRow`) and
        ``totals`` (``weights``, ``biases``, ``parameters``, and ``layers`` = number of rows).

    Raises:
        ValueError: ``model_name`` is not a timm model or ``image_size`` is below 1.
    """
    if image_size < 1:
        raise ValueError(f"image_size={image_size} is invalid; it must be at least 1 pixel.")
    if model_name not in timm.list_models():
        raise ValueError(f"Unknown timm model '{model_name}'. See timm.list_models() for the names.")
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False)
    return describe_module(model, model_name, image_size)


def describe_module(model: nn.Module, model_name: str, image_size: int) -> dict:
    """Build the layer table of an already created model (on the ``meta`` device or small)."""
    rows = layer_rows(model, image_size)
    total = sum(p.numel() for p in model.parameters())
    weights = sum(row.weights for row in rows)
    biases = sum(row.biases for row in rows)
    if weights + biases != total:
        raise RuntimeError(f"Layer table of {model_name} counts {weights + biases} parameters but the model has {total}.")
    return {
        "model": model_name,
        "image_size": image_size,
        "num_classes": int(getattr(model, "num_classes", 0) or 0),
        "rows": [asdict(row) | {"output_size": list(row.output_size)} for row in rows],
        "totals": {"weights": weights, "biases": biases, "parameters": total, "layers": len(rows)},
    }


def layers_markdown(table: dict) -> str:
    """Format a :func:`describe_model` table as markdown, for the MLflow artifact view."""
    lines = [
        f"# Layers of {table['model']} at {table['image_size']} px",
        "",
        "| layer | type | in | out | kernel | weights | biases | output size |",
        "|---|---|---:|---:|---|---:|---:|---|",
    ]
    for row in table["rows"]:
        size = "x".join(str(s) for s in row["output_size"])
        lines.append(
            f"| {row['name']} | {row['type']} | {row['in_channels'] or ''} | {row['out_channels'] or ''} | "
            f"{row['kernel']} | {row['weights']:,} | {row['biases']:,} | {size} |"
        )
    totals = table["totals"]
    lines += ["", f"Total: {totals['weights']:,} weights + {totals['biases']:,} biases = {totals['parameters']:,} parameters."]
    return "\n".join(lines) + "\n"


def log_layer_table(client, run_id: str, model_name: str, image_size: int) -> dict:
    """Log the layer table of a timm model on a run as ``model/layers.json`` and ``model/layers.md``."""
    from research import tracking

    table = describe_model(model_name, image_size)
    tracking.log_json(client, run_id, table, "model/layers.json")
    tracking.log_text(client, run_id, layers_markdown(table), "model/layers.md")
    return table
