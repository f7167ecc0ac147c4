"""The pointing game on two-class composites and on a multi-object folder (the paper's Table II)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import models
from ..composites import composite_set, make_pairs
from ..images import ImageError, load_image
from ..metrics import pointing_game
from .items import Item, chunks, class_name, labels_by_file, loaded
from .run import EvaluationRun, Run, exact_fp32, resolve_model_spec, start_run
from .specs import MethodSpec
from .store import ResultStore

__all__ = ["evaluate_pointing_game", "peak", "read_boxes", "scale_box"]


def read_boxes(directory: str | os.PathLike) -> list[Item]:
    """Images and boxes of a multi-object folder: DIR/boxes.json maps file -> [{object, box, classes}]."""
    directory = Path(directory)
    boxes_json = directory / "boxes.json"
    if not boxes_json.is_file():
        raise FileNotFoundError(f"no boxes.json in {directory}")
    try:
        with open(boxes_json) as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{boxes_json} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{boxes_json} must map image files to lists of objects")
    items = []
    for file, objects in data.items():
        if file.startswith("_"):
            continue
        try:
            parsed = [
                (str(o.get("object", f"object{i}")), tuple(int(v) for v in o["box"]), [int(c) for c in o["classes"]])
                for i, o in enumerate(objects)
            ]
        except (TypeError, KeyError, ValueError, AttributeError):
            raise ValueError(
                f"{boxes_json}: {file!r} must list objects as {{object, box: [x0,y0,x1,y1], classes: [...]}}"
            ) from None
        if not parsed or any(len(box) != 4 or not classes for _, box, classes in parsed):
            raise ValueError(
                f"{boxes_json}: every object of {file!r} needs a box [x0, y0, x1, y1] and at least one class"
            )
        items.append(Item(f"multi:{file}", directory / file, objects=parsed))
    if not items:
        raise ValueError(f"{boxes_json} lists no images")
    return items


def scale_box(
    box: Sequence[int], from_size: tuple[int, int], to_size: tuple[int, int]
) -> tuple[float, float, float, float]:
    """Map an inclusive pixel box of an image of size (width, height) onto the model input (height, width)."""
    (width, height), (to_height, to_width) = from_size, to_size
    if (width, height) == (to_width, to_height):
        return tuple(float(v) for v in box)  # type: ignore[return-value]
    sx, sy = to_width / width, to_height / height
    x0, y0, x1, y1 = box
    return (x0 * sx, y0 * sy, (x1 + 1) * sx - 1, (y1 + 1) * sy - 1)


def peak(saliency: torch.Tensor) -> tuple[int, int]:
    """(x, y) of the map's maximum, first in row-major order, as pointing_game takes it."""
    y, x = divmod(int(torch.argmax(torch.as_tensor(saliency).flatten())), saliency.shape[-1])
    return x, y


def _point(
    run: Run, store: ResultStore, chunk: list[tuple[Item, torch.Tensor]], tolerance: float
) -> list[dict[str, Any]]:
    """Explain each item's targets with every method not yet in `store`; records with hits and peaks."""
    chunk_items = [item for item, _ in chunk]
    x = torch.cat([x for _, x in chunk]).to(run.device)
    if any(store.get(item.id, s.label) is None for s in run.specs for item in chunk_items):
        run.prepare(x)
    records = []
    for s in run.specs:
        indices = [i for i, item in enumerate(chunk_items) if store.get(item.id, s.label) is None]
        if not indices:
            continue
        tic = time.perf_counter()
        maps = run.explainers[s.label](x[indices], targets=[chunk_items[i].targets for i in indices])
        seconds = (time.perf_counter() - tic) / len(indices)
        for row, i in enumerate(indices):
            item = chunk_items[i]
            run.keep(item.id, s.label, maps[row])
            hits = [bool(pointing_game(maps[row, t], boxes, tolerance)) for t, boxes in enumerate(item.target_boxes)]
            peaks = [list(peak(maps[row, t])) for t in range(len(item.targets))]
            records.append(
                {
                    "item": item.id,
                    "method": s.label,
                    "classes": item.targets,
                    "hits": hits,
                    "peaks": peaks,
                    "explain_seconds": seconds,
                }
            )
    return records


@exact_fp32
def evaluate_pointing_game(
    model: torch.nn.Module,
    images_dir: str | os.PathLike,
    labels_csv: str | os.PathLike | None = None,
    *,
    methods: Sequence[MethodSpec] | str = "all",
    layer: str | None = None,
    pairs: int = 250,
    seed: int = 0,
    limit: int | None = None,
    tolerance: float = 15,
    multi_object: str | os.PathLike | None = None,
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
    """Pointing-game accuracy of each method on `pairs` two-class composites (and a multi-object folder).

    Composites come from fdcam.composites.composite_set(images_dir, labels_csv, pairs, seed),
    first `limit` of them; both classes of each are explained, and a hit is a map maximum within
    `tolerance` px of that class's box. With `multi_object` (a folder with boxes.json), each
    object's top-scoring class among its listed classes is explained, and a hit is a maximum near
    any box that lists that class. Composite results are stored in `partial_path` and resumed.
    `scorer` runs Score-CAM / Group-CAM's forwards and `model_spec` gives the input format, as in
    evaluate_insertion_deletion.
    """
    if pairs < 1:
        raise ValueError(f"--pairs must be at least 1, got {pairs}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    spec = resolve_model_spec(model, model_spec)
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise ImageError(f"not a directory: {images_dir}")
    labels_path = Path(labels_csv) if labels_csv is not None else images_dir / "labels.csv"
    labels = labels_by_file(labels_path)
    n_pairs = min(pairs, limit) if limit else pairs
    pair_files = make_pairs(list(labels.items()), n_pairs, seed)
    missing = sorted({file for pair in pair_files for file, _ in pair if not (images_dir / file).is_file()})
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed in {labels_path.name} are not in {images_dir}, e.g. {missing[0]}"
        )
    multi_items = read_boxes(multi_object) if multi_object is not None else []
    run = start_run(
        model,
        spec,
        methods,
        "pointing-game",
        layer=layer,
        batch_size=batch_size,
        scorer=scorer,
        model_name=model_name,
        weights=weights,
        partial_path=partial_path,
        resume=resume,
        keep_maps=keep_maps,
        labels=str(labels_path.resolve()),
        images_dir=str(images_dir.resolve()),
        seed=seed,
        tolerance=tolerance,
    )
    input_size = run.spec.input_size

    def composites() -> Iterator[Item]:
        for index, (canvas, boxes) in enumerate(composite_set(images_dir, labels_path, n_pairs, seed)):
            (file_a, _), (file_b, _) = pair_files[index]
            scaled = [[scale_box(box, canvas.size, input_size)] for _, box in boxes]
            yield Item(
                f"pair{index:04d}:{file_a}+{file_b}", image=canvas, targets=[c for c, _ in boxes], target_boxes=scaled
            )

    items: list[Item] = []
    computed = 0
    bar = tqdm(total=n_pairs, desc="pointing game", unit="pair", disable=not progress, dynamic_ncols=True)
    for chunk in chunks(loaded(composites(), run.spec, None, run.skipped), max(1, images_per_call)):
        items.extend(item for item, _ in chunk)
        records = _point(run, run.store, chunk, tolerance)
        run.store.add(records)
        computed += len({record["item"] for record in records})
        bar.update(len(chunk))
    bar.close()

    # Multi-object images are few, so they are computed every run rather than stored.
    multi_store = ResultStore(None, run.config)
    multi_loaded = []
    for item, x in loaded(multi_items, run.spec, None, run.skipped):
        with torch.no_grad():
            logits = model(x.to(run.device))[0]
        image_size = load_image(item.path).size
        for _, _, classes in item.objects:
            cls = max(classes, key=lambda c: float(logits[c]))
            item.targets.append(cls)
            item.target_boxes.append(
                [scale_box(box, image_size, input_size) for _, box, listed in item.objects if cls in listed]
            )
        multi_loaded.append((item, x))
    for item, x in multi_loaded:
        run.keep_maps = len(run.maps_kept) + 1  # every multi-object image's maps are kept for the plots
        multi_store.add(_point(run, multi_store, [(item, x)], tolerance))

    multi = [item for item, _ in multi_loaded]
    summary = _summary(run.config, run.specs, items, run.store, multi, multi_store, run.skipped, n_pairs)
    return run.finish(summary, items + multi, computed, len(items) - computed)


def _accuracy(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    hits = sum(sum(record["hits"]) for record in records)
    total = sum(len(record["hits"]) for record in records)
    return {"hits": hits, "misses": total - hits, "accuracy": hits / total if total else None}


def _summary(config, specs, items, store, multi_items, multi_store, skipped, n_pairs) -> dict[str, Any]:
    methods: dict[str, Any] = {}
    for s in specs:
        records = [store.get(item.id, s.label) for item in items]
        methods[s.label] = {
            **s.describe(),
            **_accuracy(records),
            "explain_seconds_per_image": float(np.mean([r["explain_seconds"] for r in records])) if records else None,
        }
    per_image = [
        {
            "item": item.id,
            "classes": item.targets,
            "class_names": [class_name(c) for c in item.targets],
            "boxes": [list(boxes[0]) for boxes in item.target_boxes],
            "methods": {s.label: {key: store.get(item.id, s.label)[key] for key in ("hits", "peaks")} for s in specs},
        }
        for item in items
    ]
    summary = {
        **{key: config[key] for key in ("metric", "model", "weights", "layer", "seed", "tolerance")},
        "images_dir": config["images_dir"],
        "labels": config["labels"],
        "n_pairs": n_pairs,
        "n_images": len(items),
        "methods": methods,
        "per_image": per_image,
        "skipped": skipped,
    }
    if multi_items:
        summary["multi_object"] = {
            "methods": {s.label: _accuracy([multi_store.get(item.id, s.label) for item in multi_items]) for s in specs},
            "images": [
                {
                    "file": item.id.removeprefix("multi:"),
                    "objects": [
                        {"object": name, "box": list(box), "class": cls, "class_name": class_name(cls)}
                        for (name, box, _), cls in zip(item.objects, item.targets)
                    ],
                    "methods": {
                        s.label: {key: multi_store.get(item.id, s.label)[key] for key in ("hits", "peaks")}
                        for s in specs
                    },
                }
                for item in multi_items
            ],
        }
    return summary
