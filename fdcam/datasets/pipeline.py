"""explain_dataset and evaluate_dataset: the library's explanations and metrics as a Ray Data pipeline.

from_items(paths) → decode tasks (fdcam.images) → an actor pool that loads the model once per actor
(map_batches) → Ray's Parquet writer into the output folder's staging area (see output.py).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__, models
from ..methods import METHODS
from .cluster import PoolPlan, plan_pool, ray_session
from .output import OutputFolder
from .sources import MAP_SIZES, ImageRecord, ModelRef, read_source
from .workers import NO_LABEL, EvaluateActor, ExplainActor, decode_batch, feature_map_supported

__all__ = ["DatasetRun", "PoolPlan", "evaluate_dataset", "explain_dataset", "plan_pool"]

# Rows per Parquet file: millions of images must not become millions of files; a file is also the unit that
# Ctrl-C keeps (rows of a file not yet written are computed again on resume).
ROWS_PER_FILE = 1000
DECODE_CPUS = 0.25  # a decode or write task is short; it must fit beside the actors on a small machine


@dataclass
class DatasetRun:
    """What a run did: counts over the whole output folder and over this run, its wall time, the folder."""

    out: Path
    images: int  # images with rows in the output (this run and earlier ones)
    rows: int
    errors: int  # images whose rows are error rows
    computed: int  # images this run explained
    resumed: int  # images found in the output and skipped
    seconds: float
    interrupted: bool = False
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        return (
            f"{self.images} images, {self.rows} rows, {self.errors} errors; {self.computed} explained in "
            f"{self.seconds:.1f} s ({self.images_per_second:.2f} images/s), {self.resumed} resumed → {self.out}"
        )


def _targets_option(targets: Any) -> Any:
    if targets in ("top1", "label"):
        return targets
    if isinstance(targets, bool):
        raise ValueError(f"targets must be 'top1', 'label', an int k (top-k) or a list of classes, not {targets!r}")
    if isinstance(targets, int):
        if targets < 1:
            raise ValueError(f"top-k needs k of at least 1, got {targets}")
        return targets
    if isinstance(targets, (list, tuple)) and targets and all(type(c) is int for c in targets):
        return list(targets)
    raise ValueError(f"targets must be 'top1', 'label', an int k (top-k) or a list of classes, not {targets!r}")


def _check_classes(targets: Any, num_classes: int) -> None:
    if isinstance(targets, int) and targets > num_classes:
        raise ValueError(f"top-{targets} of a model with {num_classes} classes")
    if isinstance(targets, list):
        for c in targets:
            if not 0 <= c < num_classes:
                raise ValueError(f"class {c} is out of range for a model with {num_classes} classes")


def _versions() -> dict[str, str]:
    import pyarrow
    import ray
    import torch

    return {
        "fdcam": __version__,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
        "python": sys.version.split()[0],
    }


def _run(
    kind: str,
    records: list[ImageRecord],
    out: OutputFolder,
    config: dict[str, Any],
    actor: type,
    actor_kwargs: dict[str, Any],
    spec: models.ModelSpec,
    *,
    actors: int | None,
    gpus_per_actor: float,
    batch_size: int,
    ray_address: str | None,
    progress: bool,
    rows_per_file: int,
) -> DatasetRun:
    started = time.perf_counter()
    done = out.open(config)
    todo = [r for r in records if r.path not in done]
    resumed = len(records) - len(todo)
    interrupted = False
    plan = None
    try:
        if todo:
            with ray_session(ray_address, quiet=not progress) as ray:
                import ray.data

                context = ray.data.DataContext.get_current()
                context.enable_progress_bars = progress
                context.enable_operator_progress_bars = progress
                plan = plan_pool(ray.cluster_resources(), actors, gpus_per_actor)
                threads = None if plan.gpus_per_actor else max(1, int(plan.cpus_per_actor))
                device = "cuda" if plan.gpus_per_actor else "cpu"
                items = [{"path": r.path, "label": NO_LABEL if r.label is None else r.label} for r in todo]
                dataset = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / batch_size))
                dataset = dataset.map_batches(
                    decode_batch,
                    batch_size=batch_size,
                    num_cpus=DECODE_CPUS,
                    compute=ray.data.TaskPoolStrategy(size=plan.decode_tasks),
                    fn_kwargs={"spec": spec},
                    batch_format="numpy",
                )
                dataset = dataset.map_batches(
                    actor,
                    batch_size=batch_size,
                    batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=plan.actors),
                    num_cpus=plan.cpus_per_actor,
                    num_gpus=plan.gpus_per_actor or None,
                    fn_constructor_kwargs={**actor_kwargs, "device": device, "threads": threads},
                )
                # Ray's writer asks for a whole CPU per task by default: on small nodes next to the actors it
                # would never be scheduled.
                dataset.write_parquet(
                    str(out.staging),
                    min_rows_per_file=rows_per_file,
                    ray_remote_args={"num_cpus": DECODE_CPUS},
                    concurrency=plan.decode_tasks,
                )
    except KeyboardInterrupt:
        interrupted = True
    finally:
        written = out.promote()
    seconds = time.perf_counter() - started
    this_run = out.counts(written)
    total = out.counts()
    summary = {
        "config": config,
        "status": "interrupted" if interrupted else "complete",
        "versions": _versions(),
        "pool": vars(plan) if plan else None,
        "batch_size": batch_size,
        "counts": {**total, "computed": this_run["images"], "resumed": resumed, "listed": len(records)},
        "seconds": round(seconds, 3),
        "files": len(out.finished_files()),
    }
    out.write_run_json(summary)
    result = DatasetRun(
        out.path,
        total["images"],
        total["rows"],
        total["errors"],
        this_run["images"],
        resumed,
        seconds,
        interrupted,
        summary,
    )
    if interrupted:
        raise DatasetInterrupted(result)
    return result


class DatasetInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the finished files are in place; `run` says what was written. Rerun to resume."""

    def __init__(self, run: DatasetRun):
        super().__init__("interrupted")
        self.run = run


def _model_ref(model: str | ModelRef, weights: str | None, model_spec: models.ModelSpec | str | None) -> ModelRef:
    return (
        model
        if isinstance(model, ModelRef)
        else ModelRef.of(model, weights if weights is not None else "imagenet", model_spec)
    )


def _prepare(ref: ModelRef, method_names: Sequence[str], layer: str | None):
    """Build the model here once to check the layer and the methods before any worker starts (one-line errors)."""
    model = ref.build("cpu")
    spec = ref.input_spec(model)
    layer = METHODS[method_names[0]](model, layer if layer is not None else spec.default_layer).target_layer
    return spec, layer


def explain_dataset(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    out: str | os.PathLike,
    model: str | ModelRef = "efficientnet_lite0",
    weights: str | None = None,
    model_spec: models.ModelSpec | str | None = None,
    layer: str | None = None,
    method: str = "fdcam",
    targets: str | int | Sequence[int] = "top1",
    labels: str | os.PathLike | None = None,
    map_size: str = "feature",
    actors: int | None = None,
    gpus_per_actor: float = 0,
    batch_size: int = 4,
    ray_address: str | None = None,
    progress: bool = True,
    rows_per_file: int = ROWS_PER_FILE,
    **method_options: Any,
) -> DatasetRun:
    """Explain every image of `source` with `method` on Ray Data, writing Parquet files and run.json under `out`.

    `source`: a folder, a labels CSV (file,class_index,wnid,name) or a list of paths/URIs. `model`: a zoo name
    (with `weights`: "imagenet", a file, or "random") or a factory "pkg.module:fn" (with `model_spec`).
    `targets`: "top1", "label" (from the CSV or `labels`), k (the top-k classes) or a list of classes for every
    image. `map_size`: "feature" (the map at the layer's h×w) or "input" (the library's map at the input size).
    About `rows_per_file` rows make one Parquet file. `method_options` go to the method (FD-CAM's theta, engine
    options such as backend="onnxruntime"). Without `ray_address` (or $RAY_ADDRESS) a Ray of the run's own is started
    and shut down; images already in `out` are skipped (resume).
    Returns the run's counts; raises DatasetInterrupted (a KeyboardInterrupt) on Ctrl-C after saving.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    if map_size not in MAP_SIZES:
        raise ValueError(f"map_size must be 'feature' or 'input', not {map_size!r}")
    if map_size == "feature" and not feature_map_supported(method):
        raise ValueError(f"{method} makes its map at the input's size: use map_size='input'")
    if batch_size < 1 or rows_per_file < 1:
        raise ValueError(f"batch_size and rows_per_file must be at least 1, got {batch_size} and {rows_per_file}")
    targets = _targets_option(targets)
    ref = _model_ref(model, weights, model_spec)
    records = read_source(source, labels)
    if targets == "label" and all(r.label is None for r in records):
        raise ValueError("targets='label' needs labels: a labels CSV source, a folder with labels.csv, or labels=CSV")
    spec, layer = _prepare(ref, [method], layer)
    _check_classes(targets, spec.num_classes)
    folder = OutputFolder(out)
    config = {
        "kind": "explain",
        **ref.describe(),
        "layer": layer,
        "method": method,
        "options": {k: v for k, v in sorted(method_options.items())},
        "targets": targets,
        "map_size": map_size,
        "input_size": list(spec.input_size),
        "saliency": "float16, row-major [map_height, map_width] per row",
    }
    actor_kwargs = {
        "model": ref,
        "method": method,
        "layer": layer,
        "options": method_options,
        "targets": targets,
        "map_size": map_size,
    }
    return _run(
        "explain",
        records,
        folder,
        config,
        ExplainActor,
        actor_kwargs,
        spec,
        actors=actors,
        gpus_per_actor=gpus_per_actor,
        batch_size=batch_size,
        ray_address=ray_address,
        progress=progress,
        rows_per_file=rows_per_file,
    )


def evaluate_dataset(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    out: str | os.PathLike,
    model: str | ModelRef = "efficientnet_lite0",
    weights: str | None = None,
    model_spec: models.ModelSpec | str | None = None,
    layer: str | None = None,
    methods: str | Sequence[str] = "fdcam",
    target: str = "predicted",
    labels: str | os.PathLike | None = None,
    step: int | None = None,
    scorer: str = "torch",
    forward_batch_size: int | None = None,
    actors: int | None = None,
    gpus_per_actor: float = 0,
    batch_size: int = 4,
    ray_address: str | None = None,
    progress: bool = True,
    rows_per_file: int = ROWS_PER_FILE,
) -> DatasetRun:
    """RISE insertion/deletion of `methods` on every image of `source` on Ray Data: one Parquet row per image ×
    method with `fdcam evaluate`'s per-image values (insertion, deletion, overall, curves), computed by the same
    code (fdcam.evaluation). `target`: "predicted" (the top-1 class) or "label". `batch_size` images are
    explained and scored together (as `fdcam evaluate --images-per-call`); `forward_batch_size` is its
    --batch-size. Other arguments as explain_dataset.
    """
    from ..evaluation import DEFAULT_STEP, method_specs

    if target not in ("predicted", "label"):
        raise ValueError(f"target must be 'predicted' or 'label', not {target!r}")
    step = DEFAULT_STEP if step is None else step
    if step < 1:
        raise ValueError(f"step must be at least 1 pixel, got {step}")
    if batch_size < 1 or rows_per_file < 1:
        raise ValueError(f"batch_size and rows_per_file must be at least 1, got {batch_size} and {rows_per_file}")
    specs = method_specs(methods) if isinstance(methods, str) else list(methods)
    if specs and isinstance(specs[0], str):
        specs = method_specs(list(specs))
    ref = _model_ref(model, weights, model_spec)
    records = read_source(source, labels)
    if target == "label" and all(r.label is None for r in records):
        raise ValueError("target='label' needs labels: a labels CSV source, a folder with labels.csv, or labels=CSV")
    spec, layer = _prepare(ref, [s.name for s in specs], layer)
    folder = OutputFolder(out)
    config = {
        "kind": "evaluate",
        "metric": "insertion-deletion",
        **ref.describe(),
        "layer": layer,
        "methods": [s.label for s in specs],
        "options": {s.label: dict(s.options) for s in specs},
        "targets": target,
        "step": step,
        "scorer": scorer,
        "input_size": list(spec.input_size),
    }
    actor_kwargs = {
        "model": ref,
        "methods": specs,
        "layer": layer,
        "target": target,
        "step": step,
        "scorer": scorer,
        "batch_size": forward_batch_size,
    }
    return _run(
        "evaluate",
        records,
        folder,
        config,
        EvaluateActor,
        actor_kwargs,
        spec,
        actors=actors,
        gpus_per_actor=gpus_per_actor,
        batch_size=batch_size,
        ray_address=ray_address,
        progress=progress,
        rows_per_file=rows_per_file,
    )
