"""Matplotlib figures of the report and of the predict and feature-map commands, saved reproducibly.

Figures are built on ``matplotlib.figure.Figure`` (no pyplot, so no global state and no GUI
backend) and saved as 256-colour PNG without metadata. The same data gives the same bytes on the
same matplotlib and Pillow versions, and a committed figure stays under about 700 kB.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from research.report_text import Text

DPI = 100


def save_png(figure: Figure, path: Path) -> Path:
    """Write ``figure`` to ``path`` as a 256-colour PNG without run-dependent metadata.

    The palette (median cut, Floyd-Steinberg dithering) makes feature-map grids about 2.5 times
    smaller than 24-bit PNG with no visible loss at this resolution.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    buffer.seek(0)
    with Image.open(buffer) as rendered:
        palette = rendered.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    palette.save(path, format="PNG", optimize=True)
    return path


def predict_figure(picture: np.ndarray, top: list[dict], text: Text) -> Figure:
    """Draw a picture titled with its top class, beside the table of its top classes.

    Args:
        picture: RGB or grayscale pixels of the user's file.
        top: Classes in decreasing probability, dicts with ``label`` and ``probability``.
        text: Strings of the figure's language.
    """
    figure = Figure(figsize=(10, 4), layout="constrained")
    image_axes, table_axes = figure.subplots(1, 2, width_ratios=(1, 1.3))
    image_axes.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
    image_axes.set_axis_off()
    image_axes.set_title(f"{top[0]['label']} ({text.percent(top[0]['probability'], 1)})", fontsize=13)

    table_axes.set_axis_off()
    table_axes.set_title(text("fig_top5", k=len(top)))
    cells = [[str(i + 1), entry["label"], text.percent(entry["probability"], 1)] for i, entry in enumerate(top)]
    table = table_axes.table(
        cellText=cells,
        colLabels=[text("col_rank"), text("col_class"), text("col_probability")],
        colWidths=(0.12, 0.63, 0.25),
        loc="center",
        cellLoc="left",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(10)
    table.scale(1.0, 1.6)
    return figure


def _grid_shape(count: int) -> tuple[int, int]:
    columns = math.ceil(math.sqrt(count))
    return math.ceil(count / columns), columns


def _mosaic(tiles: np.ndarray, gap: int, fill: float) -> np.ndarray:
    """Lay out (count, height, width[, 3]) tiles in a near-square grid, ``gap`` pixels of ``fill`` between."""
    count, height, width = tiles.shape[:3]
    rows, columns = _grid_shape(count)
    shape = (rows * (height + gap) - gap, columns * (width + gap) - gap, *tiles.shape[3:])
    mosaic = np.full(shape, fill, dtype=np.float32)
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = row * (height + gap), column * (width + gap)
        mosaic[top : top + height, left : left + width] = tiles[index]
    return mosaic


def _grid_figure(tiles: np.ndarray, title: str, cmap: str | None) -> Figure:
    """Draw tiles as one mosaic image, each numbered at its top-left corner.

    One image with text labels renders much faster than one axes per map (64 for VGG16).
    """
    count, height, width = tiles.shape[:3]
    rows, columns = _grid_shape(count)
    gap = max(1, height // 16)
    # At least 8 inches wide, so that the title fits over a grid of few columns (32 maps: 6).
    figure = Figure(figsize=(max(columns * 1.0, 8.0), rows * 1.0 + 0.5), layout="constrained")
    figure.suptitle(title, fontsize=11)
    ax = figure.subplots()
    if cmap is None:
        ax.imshow(_mosaic(tiles, gap, 1.0), interpolation="antialiased")
    else:
        # Gaps are NaN, drawn white by the colour map's "bad" colour, so no map value can look like a gap.
        colours = matplotlib.colormaps[cmap].with_extremes(bad="white")
        ax.imshow(_mosaic(tiles, gap, np.nan), cmap=colours, vmin=0.0, vmax=1.0, interpolation="antialiased")
    ax.set_axis_off()
    for index in range(count):
        row, column = divmod(index, columns)
        ax.text(column * (width + gap) + 2, row * (height + gap) + 2, str(index), color="white", fontsize=6, va="top",
                bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "linewidth": 0})
    return figure


def maps_figure(maps: np.ndarray, title: str) -> Figure:
    """Draw every feature map in a grid, each scaled to its own minimum and maximum.

    Args:
        maps: Array of shape (channels, height, width).
        title: Figure title.
    """
    flat = maps.reshape(maps.shape[0], -1)
    low = flat.min(axis=1)[:, None, None]
    span = np.maximum(flat.max(axis=1) - flat.min(axis=1), 1e-12)[:, None, None]
    return _grid_figure((maps - low) / span, title, "viridis")


def threshold_masks(maps: np.ndarray, quantile: float) -> np.ndarray:
    """Mark, in each map, the positive values at or above the map's ``quantile``."""
    levels = np.quantile(maps.reshape(maps.shape[0], -1), quantile, axis=1)[:, None, None]
    return (maps >= levels) & (maps > 0)


def threshold_figure(picture: np.ndarray, maps: np.ndarray, quantile: float, title: str) -> Figure:
    """Draw, for each map, its most active region in red over the grayscale picture.

    Args:
        picture: Grayscale pixels in [0, 1], with the maps' height and width.
        maps: Array of shape (channels, height, width).
        quantile: A pixel is marked when its value is at or above this quantile of its map.
        title: Figure title.
    """
    masks = threshold_masks(maps, quantile)
    tiles = np.repeat(np.repeat(picture[None, :, :, None] * 0.6, 3, axis=3), maps.shape[0], axis=0)
    tiles[masks] = (1.0, 0.1, 0.1)
    return _grid_figure(tiles, title, None)


def svm_figure(c_values: list[float], accuracies: list[float], best: tuple[float, float], text: Text) -> Figure:
    """Plot validation accuracy against C on a log axis, the best trial highlighted."""
    figure = Figure(figsize=(7, 4), layout="constrained")
    ax = figure.subplots()
    order = np.argsort(c_values)
    ax.plot(np.asarray(c_values)[order], 100 * np.asarray(accuracies)[order], "o-", color="tab:blue", label=text("fig_trials"))
    ax.plot([best[0]], [100 * best[1]], "*", color="tab:red", markersize=14, label=text("fig_best"))
    ax.set_xscale("log")
    ax.set_xlabel("svm_C")
    ax.set_ylabel(text("fig_val_accuracy") + " (%)")
    ax.set_title(text("fig_svm_title"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return figure


def curves_figure(curves: dict[str, dict[str, list[tuple[int, float]]]], text: Text) -> Figure:
    """Plot training and validation loss and accuracy per epoch, one colour per labelled trial.

    Args:
        curves: Label (such as ``fc_width=4096``) to metric name (``train_loss``, ``val_loss``,
            ``train_accuracy``, ``val_accuracy``) to (epoch, value) pairs.
        text: Strings of the figure's language.
    """
    figure = Figure(figsize=(11, 4), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    colours = [f"C{i}" for i in range(10)]
    for index, (label, metrics) in enumerate(curves.items()):
        colour = colours[index % len(colours)]
        for split, style in (("train", "-"), ("val", "--")):
            for ax, kind, scale in ((loss_axes, "loss", 1.0), (accuracy_axes, "accuracy", 100.0)):
                points = metrics.get(f"{split}_{kind}", [])
                if points:
                    steps, values = zip(*points)
                    name = f"{label}, {text('fig_' + split)}"
                    ax.plot(steps, np.asarray(values) * scale, style, color=colour, label=name)
    loss_axes.set_ylabel(text("fig_loss"))
    accuracy_axes.set_ylabel(text("fig_accuracy") + " (%)")
    for ax, metric in ((loss_axes, text("fig_loss")), (accuracy_axes, text("fig_accuracy"))):
        ax.set_xlabel(text("fig_epoch"))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(text("fig_curves_title", metric=metric))
        ax.grid(True, alpha=0.3)
    accuracy_axes.legend(fontsize=7, loc="lower right")
    return figure


def activation_figure(scales: dict[str, list[float]], layers: list[str], text: Text) -> Figure:
    """Plot the mean absolute activation after each pooling layer, one line per pooling variant."""
    figure = Figure(figsize=(7, 4), layout="constrained")
    ax = figure.subplots()
    for pooling, values in scales.items():
        ax.plot(layers, values, "o-", label=pooling)
    ax.set_yscale("log")
    ax.set_xlabel(text("fig_pool_layer"))
    ax.set_ylabel(text("fig_activation_y"))
    ax.set_title(text("fig_activation_title"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return figure


def history_figure(numbers: list[int], values: list[float], maximize: bool, study: str, objective: str, text: Text) -> Figure:
    """Plot each trial's objective value and the best value so far."""
    figure = Figure(figsize=(7, 4), layout="constrained")
    ax = figure.subplots()
    best = np.maximum.accumulate(values) if maximize else np.minimum.accumulate(values)
    ax.plot(numbers, values, "o", color="tab:blue", label=objective)
    ax.step(numbers, best, where="post", color="tab:red", label=text("fig_best_so_far"))
    ax.set_xlabel(text("fig_trial"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(objective)
    ax.set_title(text("fig_history_title", study=study), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return figure


def importance_figure(importances: dict[str, float], study: str, text: Text) -> Figure:
    """Draw parameter importances as horizontal bars, the largest at the top."""
    names = list(importances)[::-1]
    figure = Figure(figsize=(7, 0.5 * len(names) + 1.5), layout="constrained")
    ax = figure.subplots()
    ax.barh(names, [importances[name] for name in names], color="tab:blue")
    ax.set_xlabel(text("fig_importance"))
    ax.set_xlim(0, 1)
    ax.set_title(text("fig_importance_title", study=study), fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    return figure
