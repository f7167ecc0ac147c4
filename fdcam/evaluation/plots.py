"""PNG plots of a run: mean insertion/deletion curves (Fig. 5 style) and overlay grids (Fig. 4 style)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..images import overlay, preprocess
from .items import Item, class_name
from .pointing import peak
from .run import EvaluationRun, resolve_model_spec

__all__ = ["require_matplotlib", "write_plots"]


def require_matplotlib() -> None:
    """Raise a one-line ImportError now when matplotlib is missing (before a long run, not after)."""
    _figure(1, 1)


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot, so no global backend is touched)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plots need matplotlib, which is not installed: pip install matplotlib") from None
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _plot_curves(summary: Mapping[str, Any], plots_dir: Path) -> list[Path]:
    written = []
    fraction = summary["curve_fraction"]
    for kind in ("deletion", "insertion"):
        figure = _figure(6.4, 4.8)
        axes = figure.add_subplot()
        for label, curves in summary["mean_curves"].items():
            auc = summary["methods"][label][kind]
            axes.plot(fraction, curves[kind], label=f"{label} ({auc:.3f})")
        axes.set_xlabel("fraction of pixels " + ("removed" if kind == "deletion" else "inserted"))
        axes.set_ylabel("mean class probability")
        axes.set_xlim(0, 1)
        axes.set_ylim(bottom=0)
        axes.set_title(f"{kind.capitalize()} curves, mean over {summary['n_images']} images (AUC)")
        axes.legend(fontsize="small")
        axes.grid(alpha=0.3)
        path = plots_dir / f"{kind}_curves.png"
        figure.savefig(path, bbox_inches="tight")
        written.append(path)
    return written


def _plot_grid(
    rows: list[tuple[str, Image.Image, list[np.ndarray], list[list[Sequence[float]]], list[tuple[int, int] | None]]],
    labels: Sequence[str],
    path: Path,
) -> Path:
    """Overlays in a grid: one row per (title, image, maps per method, boxes, peaks per method)."""
    n_rows, n_cols = len(rows), len(labels) + 1
    figure = _figure(1.9 * n_cols, 2.0 * n_rows)
    for r, (title, image, maps, boxes, peaks) in enumerate(rows):
        for c in range(n_cols):
            axes = figure.add_subplot(n_rows, n_cols, r * n_cols + c + 1)
            axes.set_xticks([])
            axes.set_yticks([])
            if c == 0:
                axes.imshow(image)
                axes.set_ylabel(title, fontsize=7)
            else:
                axes.imshow(overlay(image, maps[c - 1]))
                if peaks[c - 1] is not None:
                    axes.plot(*peaks[c - 1], marker="x", color="white", markersize=8, mew=2)
            for x0, y0, x1, y1 in boxes:
                axes.add_patch(_rectangle(x0, y0, x1, y1))
            if r == 0:
                axes.set_title("input" if c == 0 else labels[c - 1], fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


def _rectangle(x0, y0, x1, y1):
    from matplotlib.patches import Rectangle

    return Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, edgecolor="lime", linewidth=1.2)


def _maps_for(
    run: EvaluationRun, model, layer, batch_size, items: Sequence[Item], targets: Sequence[list[int]]
) -> dict[str, dict[str, np.ndarray]]:
    """The kept maps of `items`, computing the missing ones (e.g. of resumed items)."""
    spec = resolve_model_spec(model, run.model_spec)
    device = next(model.parameters()).device
    explainers: dict[str, Any] = {}
    result: dict[str, dict[str, np.ndarray]] = {}
    for item, item_targets in zip(items, targets):
        kept = run.maps.get(item.id, {})
        missing = [s for s in run.specs if s.label not in kept]
        if missing:
            x = preprocess(item.load(), spec).to(device)
            for s in missing:
                if s.label not in explainers:
                    explainers[s.label] = s.build(model, layer if layer is not None else spec.default_layer, batch_size)
                kept = {**kept, s.label: explainers[s.label](x, targets=[item_targets])[0].cpu().numpy()}
        result[item.id] = kept
    return result


def write_plots(
    run: EvaluationRun,
    model: torch.nn.Module,
    plots_dir: str | os.PathLike,
    *,
    layer: str | None = None,
    batch_size: int | None = None,
    n_images: int = 4,
) -> list[Path]:
    """PNG plots of a run: mean insertion/deletion curves (Fig. 5 style) and an overlay grid (Fig. 4 style)."""
    require_matplotlib()
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    spec = resolve_model_spec(model, run.model_spec)
    summary = run.summary
    labels = [s.label for s in run.specs]
    written: list[Path] = []
    if summary["metric"] == "insertion-deletion":
        written += _plot_curves(summary, plots_dir)
        items = run.items[:n_images]
        classes = {entry["file"]: entry["class"] for entry in summary["per_image"]}
        maps = _maps_for(run, model, layer, batch_size, items, [[classes[item.id]] for item in items])
        rows = []
        for item in items:
            image = item.load().resize(spec.input_size[::-1])
            title = f"{item.id}\n{class_name(classes[item.id]) or classes[item.id]}"
            rows.append((title, image, [maps[item.id][label][0] for label in labels], [], [None] * len(labels)))
        written.append(_plot_grid(rows, labels, plots_dir / "overlays.png"))
        return written
    composites = [item for item in run.items if not item.id.startswith("multi:")][: max(1, n_images // 2)]
    chosen = composites + [item for item in run.items if item.id.startswith("multi:")]
    maps = _maps_for(run, model, layer, batch_size, chosen, [item.targets for item in chosen])
    rows = []
    for item in chosen:
        image = item.load().resize(spec.input_size[::-1])
        for t, cls in enumerate(item.targets):
            peaks = [peak(torch.as_tensor(maps[item.id][label][t])) for label in labels]
            title = (
                f"{item.id.split(':')[0] if item.id.startswith('pair') else item.id.split(':', 1)[1]}\n"
                f"{class_name(cls) or cls}"
            )
            rows.append((title, image, [maps[item.id][label][t] for label in labels], item.target_boxes[t], peaks))
    written.append(_plot_grid(rows, labels, plots_dir / "pointing_overlays.png"))
    return written
