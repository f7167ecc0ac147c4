"""The whole explanation as one ONNX graph: image in, logits, targets and saliency out.

`export_explainer` builds a torch function that runs the library's own pipeline for one method —
head forward, the gradient of each target logit through the tail, the method's channel weights
(FD-CAM's grouping, masks and switch passes included) and the map — traces it with `make_fx` in
symbolic mode into plain ATen ops (the gradient becomes explicit backward ops, rewritten in
export/tracing.py into ops every ONNX translator knows), exports that trace with `torch.onnx.export(dynamo=True)` and a
symbolic batch, and saves the file only after ONNX Runtime reproduced the library's logits and
maps at batch 1 and 3 (T = 2 with the classes input).

Graph I/O: `image` float32 [N,3,H,W] (normalised as the Python API's x); optional `classes` int64
[N,T]; outputs `logits` [N,C], `targets` int64 [N,T] and `saliency` [N,T,H,W] in [0,1]. What the
library refuses (a NaN or infinite image or logit, a class outside [0, C)) gets a NaN map instead
(`_refused_rows`): a graph cannot raise a one-line error, and its other images are explained as usual.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from fdcam.concurrency import tracing
from fdcam.errors import first_line
from fdcam.forward import ForwardPass
from fdcam.gradients import TailGraph
from fdcam.methods import METHODS
from fdcam.methods.base import BatchContext
from fdcam.split import SplitModel, resolve_layer_name, split_model
from fdcam.targets import BatchTargets, OutputSelector

from .agreement import ILL_CONDITIONED_FACTOR, SALIENCY_TOLERANCE, agreement  # noqa: F401 — the rule, named here too
from .explainer_io import (
    OUTPUT_NAMES,  # noqa: F401 — importable from here as before
    describe_explainer,
    explainer_inputs,
    explainer_metadata,
    run_explainer,
)
from .graph import DEFAULT_OPSET, ExportError, model_metadata
from .graph_tail import DEFAULT_TAIL_BYTES, GraphTail, graph_method_for
from .onnx_io import EXTERNAL_DATA_BYTES, all_nodes, move_into_place, save, set_props
from .region import RegionExplainerModule, RegionGraphTail, check_target, example_regions, region_metadata
from .tracing import Traced, export_onnx, op_message, trace
from .validation import default_validation_images, example_images, reference_output, validate

__all__ = [
    "EXPLAINER_METHODS",
    "ExportedExplainer",
    "ExplainerModule",
    "GraphTail",
    "export_explainer",
    "explainer_inputs",
    "run_explainer",
]

log = logging.getLogger("fdcam.export")

# Methods whose whole computation fits one graph; the others are refused with the reason.
EXPLAINER_METHODS = ("fdcam", "gradcam", "gradcam++", "xgradcam", "layercam", "ablationcam")
_REFUSED = {
    "scorecam": "scorecam is not exported: it runs K whole-model forwards of masked inputs per image "
    "(K× the model in one graph); serve it from the library or export the model alone",
    "groupcam": "groupcam is not exported: it runs whole-model forwards of blurred, masked inputs per image "
    "and group; serve it from the library or export the model alone",
}
LOGITS_RTOL = 1e-4  # max |Δlogit| relative to max |logit|
_EXAMPLE_BATCH = 2  # a traced batch of 1 would be specialised into the graph


@dataclass
class ExportedExplainer:
    """A validated explainer graph on disk with its metadata and the largest differences seen in the check."""

    path: Path
    metadata: dict[str, str]
    saliency_error: float
    logits_error: float
    session: ort.InferenceSession | None = field(default=None, repr=False)


class ExplainerModule(nn.Module):
    """image [N,3,H,W] (and classes [N,T]) → (logits [N,C], targets [N,T], saliency [N,T,H,W]).

    Runs the library's pipeline in plain torch: head, tail and gradients (fdcam.gradients.TailGraph), the method's
    `channel_weights` and `saliency`. Holds its own copy of the split model (CPU, fp32, eval).
    """

    def __init__(self, split: SplitModel, method, classes_input: bool):
        super().__init__()
        self.head = split.head
        self.tail = split.tail
        self.split = split
        self.method = method
        self.classes_input = classes_input

    def forward(self, image: torch.Tensor, classes: torch.Tensor | None = None):
        # Refusals in-band (a graph cannot raise one line): see _refused_rows. Bad images and classes are
        # replaced by harmless ones for the computation, so the other images and rows are computed as usual.
        finite = torch.isfinite(image).flatten(1).all(1)  # [N]
        image = torch.where(finite[:, None, None, None], image, torch.zeros_like(image))
        asked = classes
        features, *extras = self.head(image)
        features, extras = features.detach(), tuple(e.detach() for e in extras)
        if classes is None:
            graph = TailGraph(self.tail, features, extras)  # the forward's own graph for each image's top class
            logits = graph.image_outputs()
            targets = logits.argmax(1, keepdim=True)
        else:
            graph = TailGraph(self.tail, features, extras, copies=classes.shape[1])
            logits = graph.image_outputs()
            targets = torch.where(_in_range(classes, logits.shape[1]), classes, torch.zeros_like(classes))
        gradients = graph.gradients(BatchTargets.from_classes(targets, logits.shape[1:]))
        forward = ForwardPass(self.split, features, extras, logits)
        context = BatchContext(image, forward, targets, gradients=gradients.detach())
        with torch.no_grad():
            weights = self.method.channel_weights(context)
            saliency = self.method.saliency(context, weights)
        return _refused_rows(finite, logits, targets, saliency.float(), asked)


def _in_range(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Which class indices exist: no wrapping of negative ones, as the library refuses them too."""
    return (classes >= 0) & (classes < num_classes)


def _refused_rows(
    finite: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    saliency: torch.Tensor,
    asked: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, targets, saliency) with what the library would refuse marked instead of explained.

    Where the library raises a ValueError (a NaN or infinite image or logit, a class outside [0, C)),
    the graph makes that image's or row's saliency NaN: never a valid-looking map. An image that is not
    finite also gets NaN logits and, without the classes input, target −1; given classes are echoed as asked.
    """
    valid = finite & torch.isfinite(logits).all(1)  # [N]
    rows = valid[:, None] if asked is None else valid[:, None] & _in_range(asked, logits.shape[1])  # [N,T]
    saliency = torch.where(rows[:, :, None, None], saliency, torch.full_like(saliency, float("nan")))
    logits = torch.where(finite[:, None], logits, torch.full_like(logits, float("nan")))
    targets = asked if asked is not None else torch.where(valid[:, None], targets, torch.full_like(targets, -1))
    return logits, targets, saliency


# --- export, validation, files -------------------------------------------------------------------


def export_explainer(
    model: nn.Module,
    path: str | os.PathLike,
    target_layer: str | nn.Module | None = None,
    method: str = "fdcam",
    classes_input: bool = False,
    *,
    input_size: tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    validation_images: torch.Tensor | None = None,
    target: str = "class",
    output: OutputSelector = None,
    **method_options,
) -> Path:
    """Export `method`'s whole explanation of `model` at `target_layer` as one validated ONNX file at `path`.

    Also writes `path` with suffix .json (the metadata). Input size, normalisation and class names
    default to the model's spec (fdcam.models.load). Raises ExportError in one line if the method or
    an op of the tail's gradient cannot be exported, or if ONNX Runtime does not reproduce the
    library's maps (≤ 1e-4, or the conditioning rule of export/agreement.py where float32 rounding alone
    moves the library's own maps by more) and logits (≤ 1e-4 of their scale) at batch 1 and 3; then
    nothing is written.

    `target="region"` exports a segmentation model's explanation of a class over a region: the graph
    takes `classes` [N,T] and `region` float32 [N,T,h,w] (h,w the output map's size) and explains
    Σ region · logits of the class, as fdcam.targets.RegionLogit (see export/region.py); `output`
    picks the entry of a dict or tuple output ("out" of a dict that has it).
    """
    return export_explainer_full(
        model,
        path,
        target_layer,
        method,
        classes_input,
        input_size=input_size,
        mean=mean,
        std=std,
        class_names=class_names,
        opset=opset,
        validation_images=validation_images,
        target=target,
        output=output,
        **method_options,
    ).path


def export_explainer_full(
    model: nn.Module,
    path: str | os.PathLike,
    target_layer: str | nn.Module | None = None,
    method: str = "fdcam",
    classes_input: bool = False,
    *,
    input_size: tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    validation_images: torch.Tensor | None = None,
    target: str = "class",
    output: OutputSelector = None,
    **method_options,
) -> ExportedExplainer:
    """`export_explainer`, returning the metadata, the differences measured and the validation session."""
    from fdcam.models import class_names as imagenet_names
    from fdcam.models import spec_of

    from .model import model_name

    if method in _REFUSED:
        raise ExportError(_REFUSED[method])
    if method not in EXPLAINER_METHODS:
        raise ExportError(f"unknown method {method!r}; exportable: {', '.join(EXPLAINER_METHODS)}")
    spec = spec_of(model)
    if target_layer is None:
        if spec is None:
            raise ExportError("target_layer is required for models not made by fdcam.models.load")
        target_layer = spec.default_layer
    layer = resolve_layer_name(model, target_layer)
    input_size = tuple(int(v) for v in (input_size or (spec.input_size if spec else (224, 224))))
    mean = tuple(mean if mean is not None else (spec.mean if spec else ()))
    std = tuple(std if std is not None else (spec.std if spec else ()))
    path = Path(path)

    # The reference method on the user's model validates the options before any tracing.
    reference = METHODS[method](model, layer, output=output, **method_options)
    example = example_images(_EXAMPLE_BATCH, input_size, seed=1)
    try:
        map_output, output_key = reference_output(model, example[:1], output)
    except ValueError as error:
        raise ExportError(first_line(error)) from None
    check_target(target, map_output)
    region = target == "region"
    classes_input = classes_input or region  # a region is explained for a class: the classes input comes with it
    example_classes = torch.tensor([[1, 2], [3, 4]], dtype=torch.long) if classes_input else None
    example_region = example_regions(example_classes, map_output.shape[-2:], seed=4) if region else None
    # The whole build runs under the process-wide tracing lock: split, head and tail runs and the trace all call
    # modules, which another thread's trace (fdcam.layers, a new explainer's split) would otherwise capture.
    with tracing():
        private = copy.deepcopy(model).to("cpu", torch.float32).eval()
        private.requires_grad_(False)
        split = split_model(private, layer, example[:1], None, output)
        with torch.no_grad():
            features, *extras = split.head(example[:1])
        if features.dim() != 4:
            raise ExportError(f"layer {layer!r} outputs a {features.dim()}-D tensor; CAM methods need [N,K,h,w]")
        engine = GraphTail(split.tail, features, extras, batch_size=reference.tail_batch_size)
        if region:
            engine = RegionGraphTail(engine, map_output[0].numel(), features, DEFAULT_TAIL_BYTES)
        graph_method = graph_method_for(method, private, layer, method_options, engine)
        if region:
            module = RegionExplainerModule(split, graph_method, _refused_rows).eval()
        else:
            module = ExplainerModule(split, graph_method, classes_input).eval()
        try:
            traced, names, tensors = trace(module, example, example_classes, example_region)
            traced_module = Traced(traced, names, tensors, classes_input)
            proto = export_onnx(traced_module, example, example_classes, opset, example_region)
        except ExportError:
            raise
        except Exception as error:  # tracing and translation raise many types; the user needs the op
            raise ExportError(
                f"the {method} explanation at {layer!r} cannot be exported ({op_message(error)})"
            ) from None
    foreign = sorted(
        {f"{node.domain}::{node.op_type}" for node in all_nodes(proto.graph) if node.domain not in ("", "ai.onnx")}
    )
    if foreign:
        raise ExportError(f"the exported graph uses non-standard operators ({', '.join(foreign)}); nothing was saved")

    num_classes = int(map_output.shape[1])
    if class_names is None and spec is not None and spec.num_classes == num_classes == 1000:
        class_names = imagenet_names()
    metadata = {
        **model_metadata(model_name(model), input_size, mean or None, std or None),
        **explainer_metadata(layer, method, reference, method_options, classes_input, num_classes, opset),
        **(region_metadata(output_key, map_output.shape[-2:]) if region else {"target": "class"}),
    }
    if class_names is not None:
        metadata["class_names"] = json.dumps(list(class_names), ensure_ascii=False)
    set_props(proto, metadata)

    path.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fdcam-explainer-") as staging:
        staged = Path(staging) / path.name
        save(proto, staged, external=weight_bytes > EXTERNAL_DATA_BYTES, convert_attribute=False)
        del proto
        try:
            onnx.checker.check_model(str(staged))
        except Exception as error:
            raise ExportError(
                f"the explainer graph fails onnx.checker ({first_line(error)}); nothing was saved"
            ) from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(staged), options, providers=["CPUExecutionProvider"])
        images = (
            validation_images if validation_images is not None else default_validation_images(input_size, mean, std)
        )
        saliency_error, logits_error, scale, cases = validate(
            session, reference, model, images, classes_input, num_classes, output, region
        )
        options = {**method_options, "output": output}
        allowed_logits = LOGITS_RTOL * max(scale, 1.0)
        # The conditioning rule (export/agreement.py): 1e-4, or, where float32 rounding alone moves the library's
        # own map by more, within 1e-4 + 4x that spread of the float64 library.
        judged = (
            [
                agreement(model, layer, method, options, batch, targets, got, expected, SALIENCY_TOLERANCE)
                for batch, targets, expected, got in cases
            ]
            if np.isfinite(saliency_error)
            else []
        )
        spread = max((a.spread for a in judged if a.spread is not None), default=None)
        exact_error = max((a.exact_error for a in judged if a.exact_error is not None), default=None)
        allowed_saliency = max((a.allowed for a in judged), default=SALIENCY_TOLERANCE)
        if not (judged and all(a.passed for a in judged) and logits_error <= allowed_logits):
            conditioning = (
                ""
                if exact_error is None
                else (
                    f"; {exact_error:.3g} from the float64 library, allowed {allowed_saliency:.3g} as float32 rounding"
                    f" alone moves the library's maps {spread:.3g} from it"
                )
            )
            raise ExportError(
                f"the explainer graph differs from the library: saliency max |Δ| {saliency_error:.3g}"
                f" (allowed {SALIENCY_TOLERANCE:.3g}{conditioning}), logits max |Δ| {logits_error:.3g}"
                f" (allowed {allowed_logits:.3g}); nothing was saved"
            )
        metadata["validation"] = json.dumps(
            {
                "saliency_max_abs_diff": saliency_error,
                "logits_max_abs_diff": logits_error,
                "saliency_tolerance": SALIENCY_TOLERANCE,
                "library_float32_vs_float64": spread,
                "graph_vs_float64_library": exact_error,
                "graph_vs_float64_allowed": allowed_saliency if exact_error is not None else None,
            }
        )
        description = path.with_suffix(".json")
        staged_json = Path(staging) / description.name
        staged_json.write_text(
            json.dumps(describe_explainer(metadata), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        move_into_place(staged, path)
        os.replace(staged_json, description)
    log.info("exported %s (saliency max |Δ| %.3g, logits max |Δ| %.3g)", path, saliency_error, logits_error)
    return ExportedExplainer(path, metadata, saliency_error, logits_error, session)
