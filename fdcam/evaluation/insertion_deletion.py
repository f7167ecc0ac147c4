"""RISE insertion and deletion of every method over a folder of images (the paper's Table I)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import models
from ..metrics import default_batch_size, insertion_deletion_batch
from .items import Item, chunks, class_name, image_items, loaded
from .run import EvaluationRun, Run, exact_fp32, resolve_model_spec, start_run
from .specs import MethodSpec

__all__ = ["DEFAULT_STEP", "evaluate_insertion_deletion"]

DEFAULT_STEP = 224 * 8  # RISE's pixels per insertion/deletion step at 224x224 (28 steps)


@exact_fp32
def evaluate_insertion_deletion(
    model: torch.nn.Module,
    images_dir: str | os.PathLike,
    *,
    methods: Sequence[MethodSpec] | str = "all",
    layer: str | None = None,
    target: str = "predicted",
    labels_csv: str | os.PathLike | None = None,
    limit: int | None = None,
    step: int = DEFAULT_STEP,
    batch_size: int | None = None,
    images_per_call: int = 4,
    partial_path: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    keep_maps: int = 0,
    model_name: str | None = None,
    weights: str | None = "imagenet",
    scorer: str = "auto",
    model_spec: models.ModelSpec | str | None = None,
) -> EvaluationRun:
    """RISE insertion and deletion of each method on every image in `images_dir` (sorted, first `limit`).

    target 'predicted' explains and scores the model's top-1 class, 'label' the class of
    labels_csv (default images_dir/labels.csv). Each method explains `images_per_call` images per
    call, and the curves of all methods of those images go through one insertion_deletion_batch.
    Finished (image, method) pairs are appended to `partial_path` and skipped when found there.
    `scorer` runs the curves' and Score-CAM / Group-CAM's forwards: 'torch', 'onnxruntime' or 'auto'
    (ONNX Runtime on CPU after it matched torch to 1e-4 on the first images, else torch).
    `model_spec` gives the input format of a model not made by fdcam.models.load (a ModelSpec or a
    known model's name); `model_name` labels the run (default: the spec's name).
    """
    if target not in ("predicted", "label"):
        raise ValueError(f"target must be 'predicted' or 'label', not {target!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    if step < 1:
        raise ValueError(f"step must be at least 1 pixel, got {step}")
    images_dir = Path(images_dir)
    if labels_csv is not None and not Path(labels_csv).is_file():
        raise FileNotFoundError(f"labels file not found: {labels_csv}")
    labels_path = Path(labels_csv) if labels_csv is not None else images_dir / "labels.csv"
    skipped: list[dict[str, str]] = []
    spec = resolve_model_spec(model, model_spec)
    items = image_items(images_dir, labels_path, target, skipped, spec.num_classes)
    run = start_run(
        model,
        spec,
        methods,
        "insertion-deletion",
        layer=layer,
        batch_size=batch_size,
        scorer=scorer,
        model_name=model_name,
        weights=weights,
        partial_path=partial_path,
        resume=resume,
        keep_maps=keep_maps,
        skipped=skipped,
        target=target,
        labels=str(labels_path.resolve()) if target == "label" else None,
        images_dir=str(images_dir.resolve()),
        step=step,
    )
    score_batch = batch_size or default_batch_size(run.device)
    total = min(len(items), limit) if limit else len(items)
    evaluated: list[Item] = []
    computed = resumed = 0

    bar = tqdm(total=total, desc="insertion/deletion", unit="img", disable=not progress, dynamic_ncols=True)
    for chunk in chunks(loaded(items, run.spec, limit, skipped), max(1, images_per_call)):
        chunk_items = [item for item, _ in chunk]
        evaluated.extend(chunk_items)
        todo = [[s.label for s in run.specs if run.store.get(item.id, s.label) is None] for item in chunk_items]
        if any(todo):
            x = torch.cat([x for _, x in chunk]).to(run.device)
            run.store.add(_chunk_records(run, chunk_items, x, todo, target, step, score_batch))
        computed += sum(1 for labels in todo if labels)
        resumed += sum(1 for labels in todo if not labels)
        bar.update(len(chunk))
    bar.close()
    if not evaluated:
        raise ValueError(f"no readable images in {images_dir}")
    summary = _summary(run.config, run.specs, evaluated, run.store, skipped, step, run.spec.input_size)
    return run.finish(summary, evaluated, computed, resumed)


def _chunk_records(
    run: Run, chunk_items: list[Item], x: torch.Tensor, todo: list[list[str]], target: str, step: int, score_batch: int
) -> list[dict[str, Any]]:
    """Explain the chunk's images with the methods each still misses, then score all their curves."""
    if target == "label":
        classes = torch.tensor([item.label for item in chunk_items], device=run.device)
    else:
        with torch.no_grad():
            classes = run.scoring.reference(x).argmax(dim=1)
    curve_scorer = run.prepare(x)
    saliency: dict[str, dict[int, torch.Tensor]] = {}
    explain_seconds: dict[str, float] = {}
    for s in run.specs:
        indices = [i for i, labels in enumerate(todo) if s.label in labels]
        if not indices:
            continue
        tic = time.perf_counter()
        maps = run.explainers[s.label](x[indices], targets=classes[indices].tolist())[:, 0]
        explain_seconds[s.label] = (time.perf_counter() - tic) / len(indices)
        saliency[s.label] = dict(zip(indices, maps))
        for i, index in enumerate(indices):
            run.keep(chunk_items[index].id, s.label, maps[i][None])
    # One insertion_deletion_batch per set of images that miss the same methods (usually one).
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, labels in enumerate(todo):
        if labels:
            groups.setdefault(tuple(labels), []).append(i)
    records = []
    for labels, indices in groups.items():
        tic = time.perf_counter()
        stacked = torch.stack([torch.stack([saliency[label][i] for label in labels]) for i in indices])
        result = insertion_deletion_batch(
            curve_scorer, x[indices], stacked, classes[indices], step=step, batch_size=score_batch
        )
        metric_seconds = (time.perf_counter() - tic) / (len(indices) * len(labels))
        for row, i in enumerate(indices):
            for column, label in enumerate(labels):
                records.append(
                    {
                        "item": chunk_items[i].id,
                        "method": label,
                        "class": int(classes[i]),
                        "insertion": float(result["insertion"][row, column]),
                        "deletion": float(result["deletion"][row, column]),
                        "insertion_curve": [round(v, 6) for v in result["insertion_curve"][row, column].tolist()],
                        "deletion_curve": [round(v, 6) for v in result["deletion_curve"][row, column].tolist()],
                        "explain_seconds": explain_seconds[label],
                        "metric_seconds": metric_seconds,
                    }
                )
    return records


def _summary(config, specs, items, store, skipped, step, input_size) -> dict[str, Any]:
    height, width = input_size
    pixels = height * width
    n_steps = math.ceil(pixels / step)
    per_image = []
    for item in items:
        records = {s.label: store.get(item.id, s.label) for s in specs}
        first = next(iter(records.values()))
        entry: dict[str, Any] = {"file": item.id, "class": first["class"], "class_name": class_name(first["class"])}
        if item.label is not None:
            entry["label"] = item.label
        entry["methods"] = {
            label: {
                "insertion": record["insertion"],
                "deletion": record["deletion"],
                "overall": record["insertion"] - record["deletion"],
            }
            for label, record in records.items()
        }
        per_image.append(entry)
    methods: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    for s in specs:
        records = [store.get(item.id, s.label) for item in items]
        insertion = float(np.mean([r["insertion"] for r in records]))
        deletion = float(np.mean([r["deletion"] for r in records]))
        methods[s.label] = {
            **s.describe(),
            "insertion": insertion,
            "deletion": deletion,
            "overall": insertion - deletion,
            "explain_seconds_per_image": float(np.mean([r["explain_seconds"] for r in records])),
            "metric_seconds_per_image": float(np.mean([r["metric_seconds"] for r in records])),
        }
        curves[s.label] = {
            "insertion": np.mean([r["insertion_curve"] for r in records], axis=0).round(6).tolist(),
            "deletion": np.mean([r["deletion_curve"] for r in records], axis=0).round(6).tolist(),
        }
    return {
        **{key: config[key] for key in ("metric", "model", "weights", "layer", "target", "step")},
        "images_dir": config["images_dir"],
        "n_images": len(items),
        "methods": methods,
        "curve_fraction": [min(k * step, pixels) / pixels for k in range(n_steps + 1)],
        "mean_curves": curves,
        "per_image": per_image,
        "skipped": skipped,
    }
