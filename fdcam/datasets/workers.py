"""What runs on Ray's workers: decoding tasks (image files to model inputs, or an error) and the actors that
load the model once and explain or evaluate batches, returning one Arrow table of output rows per batch."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from .. import models
from ..errors import first_line
from ..images import ImageError, load_image, preprocess
from ..maps import normalise_maps, weighted_sum
from ..methods import METHODS, BaseCAM
from ..targets import TopK
from .sources import ModelRef

__all__ = ["decode_batch", "ExplainActor", "EvaluateActor", "EXPLAIN_SCHEMA", "EVALUATE_SCHEMA", "NO_LABEL"]

NO_LABEL = -1  # the label column of the inputs: -1 when an image has none

_COMMON = [
    ("path", pa.string()),
    ("class", pa.int64()),
    ("label", pa.int64()),
    ("logit", pa.float32()),
    ("probability", pa.float32()),
    ("method", pa.string()),
    ("layer", pa.string()),
]
EXPLAIN_SCHEMA = pa.schema(
    _COMMON
    + [
        ("rank", pa.int32()),  # 0 for the top class (or the only one), k-1 for the k-th of --topk
        ("map_height", pa.int32()),
        ("map_width", pa.int32()),
        ("saliency", pa.list_(pa.float16())),  # row-major [map_height, map_width] in [0, 1]
        ("error", pa.string()),
    ]
)
EVALUATE_SCHEMA = pa.schema(
    _COMMON
    + [
        ("insertion", pa.float64()),
        ("deletion", pa.float64()),
        ("overall", pa.float64()),
        ("insertion_curve", pa.list_(pa.float32())),
        ("deletion_curve", pa.list_(pa.float32())),
        ("error", pa.string()),
    ]
)


def _read(path: str):
    """The image at a local path or a URI that pyarrow's file systems open, through the library's loader."""
    if "://" not in path or path.startswith("file://"):
        return load_image(path[len("file://") :] if path.startswith("file://") else path)
    from pyarrow import fs

    try:
        filesystem, inner = fs.FileSystem.from_uri(path)
        with filesystem.open_input_stream(inner) as stream:
            data = stream.read()
    except (OSError, pa.ArrowException) as error:
        raise ImageError(f"cannot read {path}: {first_line(error, None)}") from None
    suffix = os.path.splitext(inner)[1]
    with tempfile.NamedTemporaryFile(suffix=suffix) as handle:  # load_image's bounds and EXIF handling, unchanged
        handle.write(data)
        handle.flush()
        return load_image(handle.name)


def decode_batch(batch: dict[str, np.ndarray], spec: models.ModelSpec) -> dict[str, np.ndarray]:
    """Decode and preprocess a batch of paths (a Ray task): inputs `x` [n,3,H,W], and `error` ('' when it loaded)."""
    height, width = spec.input_size
    inputs = np.zeros((len(batch["path"]), 3, height, width), dtype=np.float32)
    errors = []
    for i, path in enumerate(batch["path"]):
        try:
            inputs[i] = preprocess(_read(str(path)), spec)[0].numpy()
            errors.append("")
        except ImageError as error:
            errors.append(first_line(error, None))
    return {"path": batch["path"], "label": batch["label"], "x": inputs, "error": np.array(errors, dtype=object)}


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def _capturing(method: type[BaseCAM], map_size: str) -> type[BaseCAM]:
    """`method` that with map_size 'feature' returns the map at the layer's h×w (ReLU of the weighted sum, min-max
    normalised) instead of upsampling it to the input."""

    class Capturing(method):
        def saliency(self, context, weights):
            if map_size == "feature":
                return normalise_maps(weighted_sum(context.activations, weights.to(context.activations.dtype)))
            return super().saliency(context, weights)

    Capturing.__name__ = Capturing.__qualname__ = method.__name__
    return Capturing


def feature_map_supported(method: str) -> bool:
    """Whether a method's map is a weighted sum of the layer's channels (Group-CAM's is made at the input's size)."""
    return METHODS[method].saliency is BaseCAM.saliency


class ExplainActor:
    """Loads the model and the method once (per actor) and explains batches of decoded images into output rows."""

    def __init__(
        self,
        model: ModelRef,
        method: str,
        layer: str | None,
        options: dict[str, Any],
        targets: Any,
        map_size: str,
        device: str = "cpu",
        threads: int | None = None,
    ):
        _set_threads(threads)
        self.device = torch.device(device)
        self.model = model.build(self.device)
        self.method_name = method
        self.cam = _capturing(METHODS[method], map_size)(self.model, layer, **options)
        self.layer = self.cam.target_layer
        self.targets = targets

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        good = [i for i, error in enumerate(batch["error"]) if not error]
        rows: list[dict[str, Any]] = [
            self._error_row(batch, i, batch["error"][i]) for i in range(len(batch["path"])) if batch["error"][i]
        ]
        if good:
            try:
                rows += self._explain(batch, good)
            except (ValueError, RuntimeError):
                for i in good:  # one image the model or method refuses must not lose its batchmates
                    try:
                        rows += self._explain(batch, [i])
                    except (ValueError, RuntimeError) as error:
                        rows.append(self._error_row(batch, i, first_line(error, None)))
        return pa.Table.from_pylist(rows, schema=EXPLAIN_SCHEMA)

    def _classes(self, batch: dict[str, np.ndarray], indices: list[int], x: torch.Tensor):
        if self.targets == "top1":
            return None
        if self.targets == "label":
            labels = [int(batch["label"][i]) for i in indices]
            if any(label == NO_LABEL for label in labels):
                raise ValueError("no label for this image (targets='label')")
            return labels
        if isinstance(self.targets, int):
            return TopK(self.targets)  # chosen from the explanation's own forward: the model runs once
        return [list(self.targets)] * len(indices)

    def _explain(self, batch: dict[str, np.ndarray], indices: list[int]) -> list[dict[str, Any]]:
        x = torch.from_numpy(np.stack([batch["x"][i] for i in indices])).to(self.device)
        classes = self._classes(batch, indices, x)
        explanation = self.cam.explanation(x, classes)  # maps [n,T,h,w], the logits and classes of one forward
        maps, logits, chosen = explanation.maps, explanation.logits.float(), explanation.classes
        probabilities = torch.softmax(logits, dim=1)
        height, width = maps.shape[-2:]
        saliency = maps.to(torch.float16).cpu().numpy()
        picked_logits = logits.gather(1, chosen).cpu().numpy()
        picked_probabilities = probabilities.gather(1, chosen).cpu().numpy()
        rows = []
        for row, i in enumerate(indices):
            for rank in range(chosen.shape[1]):
                rows.append(
                    {
                        **self._base(batch, i),
                        "class": int(chosen[row, rank]),
                        "logit": float(picked_logits[row, rank]),
                        "probability": float(picked_probabilities[row, rank]),
                        "rank": rank,
                        "map_height": int(height),
                        "map_width": int(width),
                        "saliency": saliency[row, rank].reshape(-1),
                        "error": None,
                    }
                )
        return rows

    def _base(self, batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
        label = int(batch["label"][i])
        return {
            "path": str(batch["path"][i]),
            "label": None if label == NO_LABEL else label,
            "method": self.method_name,
            "layer": self.layer,
        }

    def _error_row(self, batch: dict[str, np.ndarray], i: int, reason: str) -> dict[str, Any]:
        return {**self._base(batch, i), "error": str(reason)}


class EvaluateActor:
    """Loads the model and the methods once (per actor) and scores batches with RISE insertion/deletion, through
    the same explainers and scoring code as `fdcam evaluate` (fdcam.evaluation)."""

    def __init__(
        self,
        model: ModelRef,
        methods: list,
        layer: str | None,
        target: str,
        step: int,
        scorer: str = "torch",
        batch_size: int | None = None,
        device: str = "cpu",
        threads: int | None = None,
    ):
        from ..evaluation.run import start_run
        from ..metrics import default_batch_size

        _set_threads(threads)
        self.device = torch.device(device)
        self.model = model.build(self.device)
        spec = model.input_spec(self.model)
        self.run = start_run(
            self.model,
            spec,
            methods,
            "insertion-deletion",
            layer=layer,
            batch_size=batch_size,
            scorer=scorer,
            model_name=model.name,
            weights=None,
            partial_path=None,
            resume=False,
            keep_maps=0,
        )
        self.layer = self.run.config["layer"]
        self.target, self.step = target, step
        self.score_batch = batch_size or default_batch_size(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from ..tail import tail_precision

        rows: list[dict[str, Any]] = []
        good = []
        for i, error in enumerate(batch["error"]):
            if not error and self.target == "label" and int(batch["label"][i]) == NO_LABEL:
                error = "no label for this image (target='label')"
            if error:
                rows += [self._error_row(batch, i, s.label, error) for s in self.run.specs]
            else:
                good.append(i)
        with tail_precision("fp32", torch.device("cpu")):  # as fdcam evaluate: no TF32 in maps or curves
            try:
                rows += self._score(batch, good) if good else []
            except (ValueError, RuntimeError):
                for i in good:
                    try:
                        rows += self._score(batch, [i])
                    except (ValueError, RuntimeError) as error:
                        rows += [self._error_row(batch, i, s.label, first_line(error, None)) for s in self.run.specs]
        return pa.Table.from_pylist(rows, schema=EVALUATE_SCHEMA)

    def _score(self, batch: dict[str, np.ndarray], indices: list[int]) -> list[dict[str, Any]]:
        from ..evaluation.insertion_deletion import _chunk_records
        from ..evaluation.items import Item

        labels = [int(batch["label"][i]) for i in indices]
        items = [
            Item(str(batch["path"][i]), None, None if label == NO_LABEL else label) for i, label in zip(indices, labels)
        ]
        x = torch.from_numpy(np.stack([batch["x"][i] for i in indices])).to(self.device)
        todo = [[s.label for s in self.run.specs] for _ in indices]
        records = _chunk_records(self.run, items, x, todo, self.target, self.step, self.score_batch)
        with torch.no_grad():
            logits = self.run.scoring.reference(x).float()
        probabilities = torch.softmax(logits, dim=1)
        position = {item.id: row for row, item in enumerate(items)}
        rows = []
        for record in records:
            row = position[record["item"]]
            i = indices[row]
            rows.append(
                {
                    **self._base(batch, i, record["method"]),
                    "class": record["class"],
                    "logit": float(logits[row, record["class"]]),
                    "probability": float(probabilities[row, record["class"]]),
                    "insertion": record["insertion"],
                    "deletion": record["deletion"],
                    "overall": record["insertion"] - record["deletion"],
                    "insertion_curve": record["insertion_curve"],
                    "deletion_curve": record["deletion_curve"],
                    "error": None,
                }
            )
        return rows

    def _base(self, batch: dict[str, np.ndarray], i: int, method: str) -> dict[str, Any]:
        label = int(batch["label"][i])
        return {
            "path": str(batch["path"][i]),
            "label": None if label == NO_LABEL else label,
            "method": method,
            "layer": self.layer,
        }

    def _error_row(self, batch: dict[str, np.ndarray], i: int, method: str, reason: str) -> dict[str, Any]:
        return {**self._base(batch, i, method), "error": str(reason)}
