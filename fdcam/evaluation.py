"""Evaluation runs: RISE insertion/deletion over a folder of images and the pointing game on composites.

The library side of `fdcam evaluate` and of benchmarks/reproduce_tables.py. Runs are resumable:
every finished (image, method) pair is appended as one JSON line to a partial file, tagged with a
hash of the run's configuration; a later run with the same configuration skips the pairs it finds
there. Results are plain JSON-able dicts; `format_table` / `markdown_table` print them.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import models
from .composites import LabelsError, composite_set, make_pairs, read_labels
from .images import ImageError, list_images, load_image, overlay, preprocess
from .methods import FDCAM, METHODS
from .metrics import default_batch_size, insertion_deletion_batch, pointing_game
from .scoring import SCORERS, make_scorer, torch_scorer
from .tail import tail_precision

__all__ = [
    "DEFAULT_STEP",
    "FDCAM_OPTIONS",
    "FDCAM_VARIANTS",
    "EvaluationRun",
    "MethodSpec",
    "ResultStore",
    "evaluate_insertion_deletion",
    "evaluate_pointing_game",
    "fdcam_defaults",
    "format_table",
    "markdown_table",
    "method_specs",
    "read_boxes",
    "require_matplotlib",
    "write_json_atomic",
    "write_plots",
]

DEFAULT_STEP = 224 * 8  # RISE's pixels per insertion/deletion step at 224x224 (28 steps)
FDCAM_OPTIONS = ("theta", "bias", "combine", "switch", "grouping")

# The FD-CAM ablations of the paper's Table III (grouping / switch) and Table IV (combination).
# Each is a set of overrides on the FD-CAM options (the defaults, or the ones given by the user).
FDCAM_VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "group-off": {"switch": "off"},  # grouping, switch-off scores only
    "no-group-off": {"switch": "off", "grouping": False},  # single channels, switch-off only
    "no-group": {"grouping": False},  # single channels, switch on and off
    "linear": {"combine": "linear"},  # w = a*s - b
    "linear-nobias": {"combine": "linear", "bias": 0.0},
    "exp-nobias": {"bias": 0.0},  # w = a*exp(s)
}


def _log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def _exact_fp32(function):
    """Run an evaluation with TF32 off: torch's cuDNN default would compute maps and curves in TF32 on a GPU,
    and rank-based metrics move with the map's last bits. torch's flags are restored afterwards."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with tail_precision("fp32", torch.device("cpu")):
            return function(*args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------------------------
# Methods


def fdcam_defaults() -> dict[str, Any]:
    """FDCAM's default options (theta, bias, combine, switch, grouping), read from its signature."""
    parameters = inspect.signature(FDCAM.__init__).parameters
    return {name: parameters[name].default for name in FDCAM_OPTIONS}


@dataclass(frozen=True)
class MethodSpec:
    """One row of a results table: a method of METHODS with options, under a unique label."""

    label: str
    name: str
    options: tuple[tuple[str, Any], ...] = ()
    variant: str | None = None

    def build(self, model: torch.nn.Module, layer: str | None = None, batch_size: int | None = None):
        return METHODS[self.name](model, target_layer=layer, batch_size=batch_size, **dict(self.options))

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"method": self.name, "options": dict(self.options)}
        if self.variant:
            described["variant"] = self.variant
        return described


def _fdcam_spec(options: Mapping[str, Any], variant: str | None = None) -> MethodSpec:
    defaults = fdcam_defaults()
    full = {**defaults, **{key: value for key, value in options.items() if value is not None}}
    unknown = set(full) - set(FDCAM_OPTIONS)
    if unknown:
        raise ValueError(f"unknown FD-CAM option(s): {', '.join(sorted(unknown))}")
    if full["combine"] not in ("exp", "linear"):
        raise ValueError(f"FD-CAM combine must be 'exp' or 'linear', not {full['combine']!r}")
    if full["switch"] not in ("on_off", "off"):
        raise ValueError(f"FD-CAM switch must be 'on_off' or 'off', not {full['switch']!r}")
    if not 0.0 <= float(full["theta"]) <= 1.0:
        raise ValueError(f"FD-CAM theta must lie in [0, 1], not {full['theta']}")
    full["theta"], full["bias"], full["grouping"] = float(full["theta"]), float(full["bias"]), bool(full["grouping"])
    changed = [f"{key}={full[key]}" for key in FDCAM_OPTIONS if full[key] != defaults[key]]
    label = f"fdcam[{','.join(changed)}]" if changed else "fdcam"
    return MethodSpec(label, "fdcam", tuple((key, full[key]) for key in FDCAM_OPTIONS), variant)


def method_specs(
    methods: str | Sequence[str] = "all",
    fdcam_options: Mapping[str, Any] | None = None,
    variants: Sequence[str] = (),
) -> list[MethodSpec]:
    """Table rows for method names (a list or a comma-separated string, 'all' = every method).

    `fdcam_options` (theta, bias, combine, switch, grouping; None = default) configure 'fdcam';
    each FD-CAM variant (names of FDCAM_VARIANTS) adds a row with its overrides on top of them,
    labelled by the options that differ from the defaults, e.g. 'fdcam[switch=off,grouping=False]'.
    Duplicate rows are dropped.
    """
    if isinstance(methods, str):
        methods = [part for part in methods.split(",")]
    names: list[str] = []
    for name in (str(part).strip().lower() for part in methods):
        if not name:
            continue
        if name == "all":
            names.extend(METHODS)
        elif name in METHODS:
            names.append(name)
        else:
            raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    fdcam_options = dict(fdcam_options or {})
    specs = [_fdcam_spec(fdcam_options) if name == "fdcam" else MethodSpec(name, name) for name in names]
    for variant in variants:
        variant = variant.strip().lower()
        if not variant:
            continue
        if variant not in FDCAM_VARIANTS:
            raise ValueError(f"unknown FD-CAM variant {variant!r}; known variants: {', '.join(FDCAM_VARIANTS)}")
        specs.append(_fdcam_spec({**fdcam_options, **FDCAM_VARIANTS[variant]}, variant))
    unique: dict[str, MethodSpec] = {}
    for spec in specs:
        unique.setdefault(spec.label, spec)
    if not unique:
        raise ValueError("no methods to evaluate")
    return list(unique.values())


# --------------------------------------------------------------------------------------------
# Results on disk


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write `data` as JSON to a temporary file next to `path`, then os.replace it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def config_key(config: Mapping[str, Any]) -> str:
    """A short stable hash of a run configuration."""
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ResultStore:
    """Append-only JSON-lines store of finished (item, method) records for one configuration.

    Lines of other configurations are kept but ignored; a torn last line (an interrupted write)
    is skipped. With path None nothing is stored.
    """

    def __init__(self, path: str | os.PathLike | None, config: Mapping[str, Any], resume: bool = True):
        self.path = Path(path) if path is not None else None
        self.key = config_key(config)
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        if self.path is not None and resume and self.path.is_file():
            with open(self.path) as handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(record, dict) and record.get("config") == self.key:
                        self.records[(record["item"], record["method"])] = record

    def get(self, item: str, method: str) -> dict[str, Any] | None:
        return self.records.get((item, method))

    def add(self, records: Iterable[dict[str, Any]]) -> None:
        records = [{"config": self.key, **record} for record in records]
        for record in records:
            self.records[(record["item"], record["method"])] = record
        if self.path is None or not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(handle.tell() - 1)
                if handle.read(1) != "\n":
                    handle.write("\n")  # finish a torn line so the new records parse
            for record in records:
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass
class _Item:
    id: str
    path: Path | None = None
    label: int | None = None
    image: Image.Image | None = None
    targets: list[int] = field(default_factory=list)  # pointing game: classes to explain
    target_boxes: list[list[Sequence[float]]] = field(default_factory=list)  # boxes (input pixels) per target
    objects: list[tuple[str, tuple[int, ...], list[int]]] = field(default_factory=list)  # multi-object: name, box, classes


@dataclass
class EvaluationRun:
    """The JSON-able `summary` of a run and, for plots, the in-memory maps of the first few items."""

    summary: dict[str, Any]
    specs: list[MethodSpec]
    items: list[_Item]
    maps: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # item id -> label -> [T,H,W]


def _labels_by_file(labels_csv: Path) -> dict[str, int]:
    if not labels_csv.is_file():
        raise FileNotFoundError(f"labels file not found: {labels_csv}")
    try:
        return dict(read_labels(labels_csv))
    except LabelsError:
        raise
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"{labels_csv} is not a labels CSV with columns file,class_index,wnid,name") from None


def _image_items(
    images_dir: Path, labels_csv: Path | None, target: str, skipped: list[dict[str, str]], num_classes: int | None = None
) -> list[_Item]:
    files = list_images(images_dir)
    if not files:
        raise ValueError(f"no images in {images_dir}")
    labels: dict[str, int] = {}
    if target == "label":
        labels = _labels_by_file(labels_csv)
    elif labels_csv is not None and labels_csv.is_file():
        try:
            labels = dict(read_labels(labels_csv))
        except LabelsError:
            raise
        except (KeyError, ValueError, TypeError):
            labels = {}
    items = []
    for path in files:
        label = labels.get(path.name)
        if target == "label" and label is None:
            skipped.append({"item": path.name, "reason": f"not in {labels_csv.name}"})
            continue
        if target == "label" and num_classes is not None and not 0 <= label < num_classes:
            reason = f"label {label} of {path.name} in {labels_csv.name} is out of range for a model with {num_classes} classes"
            _log(f"fdcam: warning: skipping {path.name}: {reason}")
            skipped.append({"item": path.name, "reason": reason})
            continue
        items.append(_Item(path.name, path, label))
    if not items:
        raise ValueError(f"none of the images in {images_dir} is listed in {labels_csv}")
    return items


def _loaded(items: Iterable[_Item], spec: models.ModelSpec, limit: int | None, skipped: list[dict[str, str]]) -> Iterator[tuple[_Item, torch.Tensor]]:
    """(item, input [1,3,H,W]) for the first `limit` items that load; others are logged and skipped."""
    count = 0
    for item in items:
        if limit is not None and count >= limit:
            return
        try:
            image = item.image if item.image is not None else load_image(item.path)
            x = preprocess(image, spec)
        except ImageError as error:
            _log(f"fdcam: warning: skipping {item.id}: {error}")
            skipped.append({"item": item.id, "reason": str(error)})
            continue
        count += 1
        yield item, x


def _chunks(iterator: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk = []
    for element in iterator:
        chunk.append(element)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _model_spec(model: torch.nn.Module) -> models.ModelSpec:
    spec = models.spec_of(model)
    if spec is None:
        raise ValueError("evaluation needs a model made by fdcam.models.load (for its input format)")
    return spec


def _class_name(index: int | None) -> str | None:
    if index is None:
        return None
    names = models.class_names()
    return names[index] if 0 <= index < len(names) else None


# Methods whose cost is full-model forwards of masked inputs: they run on the channels-last copy.
_FORWARD_BOUND = frozenset({"scorecam", "groupcam"})


def _explainers(specs: Sequence[MethodSpec], model, layer, batch_size, scorer=None) -> dict[str, Any]:
    """One explainer per row; Score-CAM and Group-CAM on `scorer` (the channels-last copy) when given."""
    return {
        spec.label: spec.build(scorer if scorer is not None and spec.name in _FORWARD_BOUND else model, layer, batch_size)
        for spec in specs
    }


class _Scoring:
    """The forward-bound work's scorer, chosen on the first images that need it (see fdcam.scoring.make_scorer).

    `reference` (the channels-last torch copy) picks the predicted classes and is the scorer until
    then; Score-CAM and Group-CAM explainers get the chosen scorer for their masked forwards.
    """

    def __init__(self, model: torch.nn.Module, kind: str):
        if kind not in SCORERS:
            raise ValueError(f"scorer must be one of {', '.join(SCORERS)}, not {kind!r}")
        self.kind = kind
        self.reference = torch_scorer(model)
        self.scorer: Any = None
        self.resolved: str | None = None

    def ready(self, explainers: Mapping[str, Any], specs: Sequence[MethodSpec], x: torch.Tensor) -> Any:
        """The scorer, made and checked against torch on x the first time, and handed to forward-bound explainers."""
        if self.scorer is None:
            self.scorer, self.resolved, note = make_scorer(self.reference, self.kind, x, reference=self.reference)
            if note:
                _log(f"fdcam: note: scoring with torch: {note}")
            for s in specs:
                if s.name in _FORWARD_BOUND:
                    explainers[s.label].scorer = self.scorer
        return self.scorer


def _warm_up(explainers: Mapping[str, Any], x: torch.Tensor) -> None:
    """Build each explainer's model split (traced once per input shape) so it is not timed as explaining."""
    for explainer in explainers.values():
        explainer.split_for(x[:1])


# --------------------------------------------------------------------------------------------
# Insertion / deletion


@_exact_fp32
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
) -> EvaluationRun:
    """RISE insertion and deletion of each method on every image in `images_dir` (sorted, first `limit`).

    target 'predicted' explains and scores the model's top-1 class, 'label' the class of
    labels_csv (default images_dir/labels.csv). Each method explains `images_per_call` images per
    call, and the curves of all methods of those images go through one insertion_deletion_batch.
    Finished (image, method) pairs are appended to `partial_path` and skipped when found there.
    `scorer` runs the curves' and Score-CAM / Group-CAM's forwards: 'torch', 'onnxruntime' or 'auto'
    (ONNX Runtime on CPU after it matched torch to 1e-4 on the first images, else torch).
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
    specs = method_specs(methods) if isinstance(methods, str) else list(methods)
    spec = _model_spec(model)
    device = next(model.parameters()).device
    skipped: list[dict[str, str]] = []
    items = _image_items(images_dir, labels_path, target, skipped, spec.num_classes)
    scoring = _Scoring(model, scorer)
    explainers = _explainers(specs, model, layer, batch_size, scoring.reference)
    resolved_layer = next(iter(explainers.values())).target_layer
    config = {
        "metric": "insertion-deletion",
        "model": model_name or spec.name,
        "weights": weights,
        "layer": resolved_layer,
        "target": target,
        "labels": str(labels_path.resolve()) if target == "label" else None,
        "images_dir": str(images_dir.resolve()),
        "step": step,
    }
    store = ResultStore(partial_path, config, resume)
    score_batch = batch_size or default_batch_size(device)
    total = min(len(items), limit) if limit else len(items)
    evaluated: list[_Item] = []
    maps_kept: dict[str, dict[str, np.ndarray]] = {}
    computed = resumed = 0
    started = time.perf_counter()

    bar = tqdm(total=total, desc="insertion/deletion", unit="img", disable=not progress, dynamic_ncols=True)
    for chunk in _chunks(_loaded(items, spec, limit, skipped), max(1, images_per_call)):
        chunk_items = [item for item, _ in chunk]
        evaluated.extend(chunk_items)
        todo = [[s.label for s in specs if store.get(item.id, s.label) is None] for item in chunk_items]
        if not any(todo):
            resumed += len(chunk)
            bar.update(len(chunk))
            continue
        x = torch.cat([x for _, x in chunk]).to(device)
        if target == "label":
            classes = torch.tensor([item.label for item in chunk_items], device=device)
        else:
            with torch.no_grad():
                classes = scoring.reference(x).argmax(dim=1)
        curve_scorer = scoring.ready(explainers, specs, x)
        _warm_up(explainers, x)
        saliency: dict[str, dict[int, torch.Tensor]] = {}
        explain_seconds: dict[str, float] = {}
        for s in specs:
            indices = [i for i, labels in enumerate(todo) if s.label in labels]
            if not indices:
                continue
            tic = time.perf_counter()
            maps = explainers[s.label](x[indices], targets=classes[indices].tolist())[:, 0]
            explain_seconds[s.label] = (time.perf_counter() - tic) / len(indices)
            saliency[s.label] = dict(zip(indices, maps))
            for i, index in enumerate(indices):
                if len(maps_kept) < keep_maps or chunk_items[index].id in maps_kept:
                    maps_kept.setdefault(chunk_items[index].id, {})[s.label] = maps[i][None].cpu().numpy()
        # One insertion_deletion_batch per set of images that miss the same methods (usually one).
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, labels in enumerate(todo):
            if labels:
                groups.setdefault(tuple(labels), []).append(i)
        records = []
        for labels, indices in groups.items():
            tic = time.perf_counter()
            stacked = torch.stack([torch.stack([saliency[label][i] for label in labels]) for i in indices])
            result = insertion_deletion_batch(curve_scorer, x[indices], stacked, classes[indices], step=step, batch_size=score_batch)
            metric_seconds = (time.perf_counter() - tic) / (len(indices) * len(labels))
            for row, i in enumerate(indices):
                for column, label in enumerate(labels):
                    insertion = float(result["insertion"][row, column])
                    deletion = float(result["deletion"][row, column])
                    records.append(
                        {
                            "item": chunk_items[i].id,
                            "method": label,
                            "class": int(classes[i]),
                            "insertion": insertion,
                            "deletion": deletion,
                            "insertion_curve": [round(v, 6) for v in result["insertion_curve"][row, column].tolist()],
                            "deletion_curve": [round(v, 6) for v in result["deletion_curve"][row, column].tolist()],
                            "explain_seconds": explain_seconds[label],
                            "metric_seconds": metric_seconds,
                        }
                    )
        store.add(records)
        computed += sum(1 for labels in todo if labels)
        resumed += sum(1 for labels in todo if not labels)
        bar.update(len(chunk))
    bar.close()
    if not evaluated:
        raise ValueError(f"no readable images in {images_dir}")

    summary = _insertion_summary(config, specs, evaluated, store, skipped, step, spec.input_size)
    summary["computed"], summary["resumed"] = computed, resumed
    summary["scorer"] = scoring.resolved
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return EvaluationRun(summary, specs, evaluated, maps_kept)


def _insertion_summary(config, specs, items, store, skipped, step, input_size) -> dict[str, Any]:
    height, width = input_size
    pixels = height * width
    n_steps = math.ceil(pixels / step)
    per_image = []
    for item in items:
        records = {s.label: store.get(item.id, s.label) for s in specs}
        first = next(iter(records.values()))
        entry: dict[str, Any] = {"file": item.id, "class": first["class"], "class_name": _class_name(first["class"])}
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


# --------------------------------------------------------------------------------------------
# Pointing game


def read_boxes(directory: str | os.PathLike) -> list[_Item]:
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
            raise ValueError(f"{boxes_json}: {file!r} must list objects as {{object, box: [x0,y0,x1,y1], classes: [...]}}") from None
        if not parsed or any(len(box) != 4 or not classes for _, box, classes in parsed):
            raise ValueError(f"{boxes_json}: every object of {file!r} needs a box [x0, y0, x1, y1] and at least one class")
        items.append(_Item(f"multi:{file}", directory / file, objects=parsed))
    if not items:
        raise ValueError(f"{boxes_json} lists no images")
    return items


def _scale_box(box: Sequence[int], from_size: tuple[int, int], to_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Map an inclusive pixel box of an image of size (width, height) onto the model input (height, width)."""
    (width, height), (to_height, to_width) = from_size, to_size
    if (width, height) == (to_width, to_height):
        return tuple(float(v) for v in box)  # type: ignore[return-value]
    sx, sy = to_width / width, to_height / height
    x0, y0, x1, y1 = box
    return (x0 * sx, y0 * sy, (x1 + 1) * sx - 1, (y1 + 1) * sy - 1)


def _peak(saliency: torch.Tensor) -> tuple[int, int]:
    """(x, y) of the map's maximum, first in row-major order, as pointing_game takes it."""
    y, x = divmod(int(torch.argmax(torch.as_tensor(saliency).flatten())), saliency.shape[-1])
    return x, y


def _point(
    specs: Sequence[MethodSpec],
    explainers: Mapping[str, Any],
    store: ResultStore,
    chunk: list[tuple[_Item, torch.Tensor]],
    device: torch.device,
    tolerance: float,
    maps_kept: dict[str, dict[str, np.ndarray]],
    keep_maps: int,
    scoring: _Scoring,
) -> list[dict[str, Any]]:
    """Explain each item's targets with every method not yet in `store`; records with hits and peaks."""
    chunk_items = [item for item, _ in chunk]
    x = torch.cat([x for _, x in chunk]).to(device)
    if any(store.get(item.id, s.label) is None for s in specs for item in chunk_items):
        scoring.ready(explainers, specs, x)
    _warm_up(explainers, x)
    records = []
    for s in specs:
        indices = [i for i, item in enumerate(chunk_items) if store.get(item.id, s.label) is None]
        if not indices:
            continue
        tic = time.perf_counter()
        maps = explainers[s.label](x[indices], targets=[chunk_items[i].targets for i in indices])
        seconds = (time.perf_counter() - tic) / len(indices)
        for row, i in enumerate(indices):
            item = chunk_items[i]
            if len(maps_kept) < keep_maps or item.id in maps_kept:
                maps_kept.setdefault(item.id, {})[s.label] = maps[row].cpu().numpy()
            hits = [bool(pointing_game(maps[row, t], boxes, tolerance)) for t, boxes in enumerate(item.target_boxes)]
            peaks = [list(_peak(maps[row, t])) for t in range(len(item.targets))]
            records.append(
                {"item": item.id, "method": s.label, "classes": item.targets, "hits": hits, "peaks": peaks, "explain_seconds": seconds}
            )
    return records


@_exact_fp32
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
) -> EvaluationRun:
    """Pointing-game accuracy of each method on `pairs` two-class composites (and a multi-object folder).

    Composites come from fdcam.composites.composite_set(images_dir, labels_csv, pairs, seed),
    first `limit` of them; both classes of each are explained, and a hit is a map maximum within
    `tolerance` px of that class's box. With `multi_object` (a folder with boxes.json), each
    object's top-scoring class among its listed classes is explained, and a hit is a maximum near
    any box that lists that class. Composite results are stored in `partial_path` and resumed.
    `scorer` runs Score-CAM / Group-CAM's forwards, as in evaluate_insertion_deletion.
    """
    if pairs < 1:
        raise ValueError(f"--pairs must be at least 1, got {pairs}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise ImageError(f"not a directory: {images_dir}")
    labels_path = Path(labels_csv) if labels_csv is not None else images_dir / "labels.csv"
    labels = _labels_by_file(labels_path)
    n_pairs = min(pairs, limit) if limit else pairs
    pair_files = make_pairs(list(labels.items()), n_pairs, seed)
    missing = sorted({file for pair in pair_files for file, _ in pair if not (images_dir / file).is_file()})
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in {labels_path.name} are not in {images_dir}, e.g. {missing[0]}")
    multi_items = read_boxes(multi_object) if multi_object is not None else []
    specs = method_specs(methods) if isinstance(methods, str) else list(methods)
    spec = _model_spec(model)
    device = next(model.parameters()).device
    scoring = _Scoring(model, scorer)
    explainers = _explainers(specs, model, layer, batch_size, scoring.reference)
    resolved_layer = next(iter(explainers.values())).target_layer
    config = {
        "metric": "pointing-game",
        "model": model_name or spec.name,
        "weights": weights,
        "layer": resolved_layer,
        "labels": str(labels_path.resolve()),
        "images_dir": str(images_dir.resolve()),
        "seed": seed,
        "tolerance": tolerance,
    }
    store = ResultStore(partial_path, config, resume)
    maps_kept: dict[str, dict[str, np.ndarray]] = {}
    started = time.perf_counter()

    def composites() -> Iterator[_Item]:
        for index, (canvas, boxes) in enumerate(composite_set(images_dir, labels_path, n_pairs, seed)):
            (file_a, _), (file_b, _) = pair_files[index]
            scaled = [[_scale_box(box, canvas.size, spec.input_size)] for _, box in boxes]
            yield _Item(f"pair{index:04d}:{file_a}+{file_b}", image=canvas, targets=[c for c, _ in boxes], target_boxes=scaled)

    items: list[_Item] = []
    skipped: list[dict[str, str]] = []
    computed = 0
    bar = tqdm(total=n_pairs, desc="pointing game", unit="pair", disable=not progress, dynamic_ncols=True)
    for chunk in _chunks(_loaded(composites(), spec, None, skipped), max(1, images_per_call)):
        items.extend(item for item, _ in chunk)
        records = _point(specs, explainers, store, chunk, device, tolerance, maps_kept, keep_maps, scoring)
        store.add(records)
        computed += len({record["item"] for record in records})
        bar.update(len(chunk))
    bar.close()

    # Multi-object images are few, so they are computed every run rather than stored.
    multi_store = ResultStore(None, config)
    multi_loaded = []
    for item, x in _loaded(multi_items, spec, None, skipped):
        with torch.no_grad():
            logits = model(x.to(device))[0]
        image_size = load_image(item.path).size
        for _, _, classes in item.objects:
            cls = max(classes, key=lambda c: float(logits[c]))
            item.targets.append(cls)
            item.target_boxes.append([_scale_box(box, image_size, spec.input_size) for _, box, listed in item.objects if cls in listed])
        multi_loaded.append((item, x))
    for item, x in multi_loaded:
        multi_store.add(_point(specs, explainers, multi_store, [(item, x)], device, tolerance, maps_kept, len(maps_kept) + 1, scoring))

    summary = _pointing_summary(config, specs, items, store, [item for item, _ in multi_loaded], multi_store, skipped, n_pairs)
    summary["computed"], summary["resumed"] = computed, len(items) - computed
    summary["scorer"] = scoring.resolved
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return EvaluationRun(summary, specs, items + [item for item, _ in multi_loaded], maps_kept)


def _accuracy(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    hits = sum(sum(record["hits"]) for record in records)
    total = sum(len(record["hits"]) for record in records)
    return {"hits": hits, "misses": total - hits, "accuracy": hits / total if total else None}


def _pointing_summary(config, specs, items, store, multi_items, multi_store, skipped, n_pairs) -> dict[str, Any]:
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
            "class_names": [_class_name(c) for c in item.targets],
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
                        {"object": name, "box": list(box), "class": cls, "class_name": _class_name(cls)}
                        for (name, box, _), cls in zip(item.objects, item.targets)
                    ],
                    "methods": {s.label: {key: multi_store.get(item.id, s.label)[key] for key in ("hits", "peaks")} for s in specs},
                }
                for item in multi_items
            ],
        }
    return summary


# --------------------------------------------------------------------------------------------
# Tables


def _rows(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    methods = summary["methods"]
    if summary["metric"] == "insertion-deletion":
        header = ["Method", "Insertion ↑", "Deletion ↓", "Overall ↑", "Explain s/img", "Ins+del s/img"]
        rows = [
            [label, f"{m['insertion']:.4f}", f"{m['deletion']:.4f}", f"{m['overall']:.4f}", f"{m['explain_seconds_per_image']:.2f}", f"{m['metric_seconds_per_image']:.2f}"]
            for label, m in methods.items()
        ]
        return header, rows
    header = ["Method", "Composites ↑", "Hits", "Misses"]
    multi = summary.get("multi_object", {}).get("methods")
    if multi:
        header.append("Multi-object ↑")
    header.append("Explain s/img")
    rows = []
    for label, m in methods.items():
        row = [label, f"{m['accuracy']:.4f}", str(m["hits"]), str(m["misses"])]
        if multi:
            row.append(f"{multi[label]['hits']}/{multi[label]['hits'] + multi[label]['misses']}")
        seconds = m.get("explain_seconds_per_image")
        row.append(f"{seconds:.2f}" if seconds is not None else "-")
        rows.append(row)
    return header, rows


def _title(summary: Mapping[str, Any]) -> str:
    if summary["metric"] == "insertion-deletion":
        return (
            f"Insertion/deletion on {summary['n_images']} images ({summary['model']}, layer {summary['layer']}, "
            f"target {summary['target']}; overall = insertion - deletion)"
        )
    return (
        f"Pointing game on {summary['n_images']} composites ({summary['model']}, layer {summary['layer']}, "
        f"tolerance {summary['tolerance']} px; accuracy = hits / (hits + misses))"
    )


def format_table(summary: Mapping[str, Any]) -> str:
    """A plain-text table of a run summary (Table I style for insertion/deletion)."""
    header, rows = _rows(summary)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [_title(summary)]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)))
    return "\n".join(lines)


def markdown_table(summary: Mapping[str, Any], labels: Sequence[str] | None = None) -> str:
    """A markdown table of a run summary, optionally only (and in the order of) the given method labels."""
    header, rows = _rows(summary)
    if labels is not None:
        by_label = {row[0]: row for row in rows}
        rows = [by_label[label] for label in labels if label in by_label]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Plots


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


def _plot_grid(rows: list[tuple[str, Image.Image, list[np.ndarray], list[list[Sequence[float]]], list[tuple[int, int] | None]]], labels: Sequence[str], path: Path) -> Path:
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


def _maps_for(run: EvaluationRun, model, layer, batch_size, items: Sequence[_Item], targets: Sequence[list[int]]) -> dict[str, dict[str, np.ndarray]]:
    """The kept maps of `items`, computing the missing ones (e.g. of resumed items)."""
    spec = _model_spec(model)
    device = next(model.parameters()).device
    explainers: dict[str, Any] = {}
    result: dict[str, dict[str, np.ndarray]] = {}
    for item, item_targets in zip(items, targets):
        kept = run.maps.get(item.id, {})
        missing = [s for s in run.specs if s.label not in kept]
        if missing:
            x = preprocess(item.image if item.image is not None else load_image(item.path), spec).to(device)
            for s in missing:
                if s.label not in explainers:
                    explainers[s.label] = s.build(model, layer, batch_size)
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
    spec = _model_spec(model)
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
            image = (item.image if item.image is not None else load_image(item.path)).resize(spec.input_size[::-1])
            title = f"{item.id}\n{_class_name(classes[item.id]) or classes[item.id]}"
            rows.append((title, image, [maps[item.id][label][0] for label in labels], [], [None] * len(labels)))
        written.append(_plot_grid(rows, labels, plots_dir / "overlays.png"))
        return written
    composites = [item for item in run.items if not item.id.startswith("multi:")][: max(1, n_images // 2)]
    chosen = composites + [item for item in run.items if item.id.startswith("multi:")]
    maps = _maps_for(run, model, layer, batch_size, chosen, [item.targets for item in chosen])
    rows = []
    for item in chosen:
        image = (item.image if item.image is not None else load_image(item.path)).resize(spec.input_size[::-1])
        for t, cls in enumerate(item.targets):
            peaks = [_peak(torch.as_tensor(maps[item.id][label][t])) for label in labels]
            title = f"{item.id.split(':')[0] if item.id.startswith('pair') else item.id.split(':', 1)[1]}\n{_class_name(cls) or cls}"
            rows.append((title, image, [maps[item.id][label][t] for label in labels], item.target_boxes[t], peaks))
    written.append(_plot_grid(rows, labels, plots_dir / "pointing_overlays.png"))
    return written
