"""The whole explanation as one ONNX graph: image in, logits, targets and saliency out.

`export_explainer` builds a torch function that runs the library's own pipeline for one method —
head forward, the gradient of each target logit through the tail, the method's channel weights
(FD-CAM's grouping, masks and switch passes included) and the map — traces it with `make_fx` in
symbolic mode into plain ATen ops (the gradient becomes explicit backward ops, rewritten below into
ops every ONNX translator knows), exports that trace with `torch.onnx.export(dynamo=True)` and a
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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from fdcam._version import __version__
from fdcam.concurrency import running, tracing
from fdcam.errors import first_line
from fdcam.factorise import max_group_size
from fdcam.forward import ForwardPass
from fdcam.methods import METHODS
from fdcam.methods.base import BatchContext
from fdcam.model_state import preserved_model_state
from fdcam.split import SplitModel, resolve_layer_name, split_model
from fdcam.switch import switch_scores
from fdcam.targets import OutputSelector, select_output

from .agreement import ILL_CONDITIONED_FACTOR, SALIENCY_TOLERANCE, agreement  # noqa: F401 — the rule, named here too
from .graph import DEFAULT_OPSET, EXTERNAL_DATA_BYTES, ExportError, model_metadata
from .graph_tail import DEFAULT_TAIL_BYTES, GraphTail, drop_unused_initializers
from .region import (
    REGION_INPUT,
    RegionExplainerModule,
    RegionGraphTail,
    check_target,
    example_regions,
    library_targets,
    region_cases,
    region_input,
    region_metadata,
)

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


def _graph_method(method: str, model: nn.Module, layer: str, options: dict, tail: GraphTail):
    """The library's method object, its masked tail passes run by `tail` (the traceable engine)."""
    base = METHODS[method]

    class GraphMethod(base):
        def tail_for(self, context):  # noqa: D102 - the engine swap is the whole point
            return tail

    if method == "fdcam":
        GraphMethod.switch_scores = _group_switch_scores
    GraphMethod.__name__ = f"Graph{base.__name__}"
    return GraphMethod(model, layer, **options)


def _group_switch_scores(self, context):
    """FD-CAM's switch scores with the passes made from the groups themselves (`GraphTail.group_passes`:
    one gathered sum per group serves its switch-on and switch-off rows)."""
    classes = context.targets.classes
    if classes is None:
        return type(self).__mro__[1].switch_scores(self, context)
    activations = context.activations
    sparsity = max_group_size(activations.shape[1], self.theta) if self.grouping else 1
    logits = self.tail_for(context).group_passes(
        activations, self.groups(activations), context.extras, classes, sparsity=sparsity, switch=self.switch
    )
    return switch_scores(logits, context.scores, None, self.switch)


class ExplainerModule(nn.Module):
    """image [N,3,H,W] (and classes [N,T]) → (logits [N,C], targets [N,T], saliency [N,T,H,W]).

    Runs the library's pipeline in plain torch: head, tail, gradients by autograd, the method's
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
        extras = tuple(extras)
        with torch.enable_grad():
            if classes is None:
                leaf = features.detach().requires_grad_(True)
                logits = self.tail(leaf, *extras)
                targets = logits.argmax(1, keepdim=True)
                (gradients,) = torch.autograd.grad(logits.gather(1, targets).sum(), leaf)
                gradients = gradients[:, None]
                logits = logits.detach()
            else:
                n, t = classes.shape
                repeated = features[:, None].expand(n, t, *features.shape[1:]).reshape(n * t, *features.shape[1:])
                leaf = repeated.detach().requires_grad_(True)
                rows = [e[:, None].expand(n, t, *e.shape[1:]).reshape(n * t, *e.shape[1:]) for e in extras]
                all_logits = self.tail(leaf, *rows)
                classes = torch.where(_in_range(classes, all_logits.shape[1]), classes, torch.zeros_like(classes))
                targets = classes
                selected = all_logits.gather(1, classes.reshape(n * t, 1)).sum()
                (gradients,) = torch.autograd.grad(selected, leaf)
                gradients = gradients.reshape(n, t, *features.shape[1:])
                logits = all_logits.detach().reshape(n, t, -1)[:, 0]
        features = features.detach()
        forward = ForwardPass(self.split, features, tuple(e.detach() for e in extras), logits)
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


# --- tracing: autograd → plain ATen ops ----------------------------------------------------------


def _decompositions() -> dict:
    """Core ATen decompositions, plus backward ops the ONNX translator lacks written as forward ops."""
    from torch._decomp import core_aten_decompositions

    aten = torch.ops.aten
    table = dict(core_aten_decompositions())

    def convolution_backward(
        grad_output,
        input,
        weight,
        bias_sizes,
        stride,
        padding,
        dilation,
        transposed,
        output_padding,
        groups,
        output_mask,
    ):
        if transposed:
            raise ExportError(
                "the tail's gradient needs aten.convolution_backward of a transposed convolution, which is not exported"
            )
        grad_input = grad_weight = grad_bias = None
        if output_mask[0]:
            # ∂/∂input of a convolution is the transposed convolution with the same weights; output_padding
            # restores the rows a strided forward dropped.
            spatial = input.dim() - 2
            extra = [
                input.shape[2 + i]
                - (
                    (grad_output.shape[2 + i] - 1) * stride[i]
                    - 2 * padding[i]
                    + dilation[i] * (weight.shape[2 + i] - 1)
                    + 1
                )
                for i in range(spatial)
            ]
            grad_input = aten.convolution.default(
                grad_output, weight, None, stride, padding, dilation, True, extra, groups
            )
        if output_mask[1] or output_mask[2]:
            raise ExportError("the tail's gradient needs aten.convolution_backward for weights, which is not exported")
        return grad_input, grad_weight, grad_bias

    def adaptive_avg_pool2d_backward(grad_output, input):
        # The adjoint of adaptive average pooling: each input pixel gets the mean-weights of every window it lies in.
        h, w = input.shape[-2], input.shape[-1]
        oh, ow = grad_output.shape[-2], grad_output.shape[-1]
        rows = _pool_matrix(h, oh, input)
        cols = _pool_matrix(w, ow, input)
        return torch.einsum("...ij,ia,jb->...ab", grad_output, rows, cols).to(input.dtype)

    table[aten.convolution_backward.default] = convolution_backward
    table[aten._adaptive_avg_pool2d_backward.default] = adaptive_avg_pool2d_backward
    return table


def _pool_matrix(size: int, out: int, like: torch.Tensor) -> torch.Tensor:
    """[out, size] weights of adaptive average pooling along one axis (static sizes; built in Python so
    the trace stores it as one constant)."""
    size, out = int(size), int(out)
    rows = []
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        rows.append([1.0 / (end - start) if start <= j < end else 0.0 for j in range(size)])
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def _trace(module: nn.Module, image: torch.Tensor, classes: torch.Tensor | None, region: torch.Tensor | None = None):
    """make_fx (symbolic) of the whole explanation with parameters as inputs: a graph of ATen ops."""
    from torch.fx.experimental.proxy_tensor import make_fx

    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    names = list(params) + list(buffers)

    def explain(tensors, image, classes, region):
        state = dict(zip(names, tensors))
        args = tuple(t for t in (image, classes, region) if t is not None)
        return torch.func.functional_call(module, state, args)

    tensors = [*params.values(), *buffers.values()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fake = _batch_symbolic_inputs(tensors, image, classes, region)
        graph = make_fx(explain, decomposition_table=_decompositions(), tracing_mode="symbolic")(*fake)
    return graph, names, tensors


def _batch_symbolic_inputs(
    tensors: list[torch.Tensor], image: torch.Tensor, classes: torch.Tensor | None, region: torch.Tensor | None = None
):
    """Fake inputs whose only symbolic sizes are the batch N (and the class count T): every other size
    stays a number, which keeps the shape reasoning (sympy) of the trace small."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=False)

    def fake(tensor: torch.Tensor, dynamic: Sequence[int] = ()):
        sizes = [DimDynamic.DYNAMIC if dim in dynamic else DimDynamic.STATIC for dim in range(tensor.dim())]
        return mode.from_tensor(tensor, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))

    fake_tensors = [fake(tensor) for tensor in tensors]
    fake_region = None if region is None else fake(region, (0, 1))
    return fake_tensors, fake(image, (0,)), None if classes is None else fake(classes, (0, 1)), fake_region


class _Traced(nn.Module):
    """The traced graph with the weights held as buffers, so the exported file carries them inside."""

    def __init__(self, graph, names: list[str], tensors: list[torch.Tensor], classes_input: bool):
        super().__init__()
        self.graph_module = graph
        self.count = len(tensors)
        self.classes_input = classes_input
        for index, tensor in enumerate(tensors):
            self.register_buffer(f"w{index}", tensor.detach(), persistent=True)

    def forward(self, image: torch.Tensor, classes: torch.Tensor | None = None, region: torch.Tensor | None = None):
        tensors = [getattr(self, f"w{index}") for index in range(self.count)]
        return self.graph_module(tensors, image, classes, region)


def explainer_inputs(classes_input: bool, region: bool = False) -> list[str]:
    return ["image", "classes"] + ([REGION_INPUT] if region else []) if classes_input else ["image"]


OUTPUT_NAMES = ["logits", "targets", "saliency"]


def _export_onnx(
    module: nn.Module, image: torch.Tensor, classes: torch.Tensor | None, opset: int, region: torch.Tensor | None = None
) -> onnx.ModelProto:
    batch = torch.export.Dim("N", min=1)
    if classes is None:
        args, dynamic = (image,), ({0: batch},)
    else:
        rows = {0: batch, 1: torch.export.Dim("T", min=1)}
        args, dynamic = (image, classes), ({0: batch}, rows)
        if region is not None:
            args, dynamic = (*args, region), (*dynamic, rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            input_names=explainer_inputs(classes is not None, region is not None),
            output_names=OUTPUT_NAMES,
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dynamic,
            optimize=True,
            verbose=False,
        )
    try:
        import onnxscript.optimizer

        largest = max((t.numel() for t in module.buffers()), default=0)
        onnxscript.optimizer.fold_constants(program.model, input_size_limit=max(largest, 8192))
    except Exception as error:  # folding is an optimisation only
        log.info("constant folding skipped: %s", error)
    proto = program.model_proto
    drop_unused_initializers(proto.graph)
    return proto


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
    example = _example_images(_EXAMPLE_BATCH, input_size, seed=1)
    try:
        map_output, output_key = _reference_output(model, example[:1], output)
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
        engine = GraphTail(split.tail, features, extras)
        if region:
            engine = RegionGraphTail(engine, map_output[0].numel(), features, DEFAULT_TAIL_BYTES)
        graph_method = _graph_method(method, private, layer, method_options, engine)
        if region:
            module = RegionExplainerModule(split, graph_method, _refused_rows).eval()
        else:
            module = ExplainerModule(split, graph_method, classes_input).eval()
        try:
            traced, names, tensors = _trace(module, example, example_classes, example_region)
            traced_module = _Traced(traced, names, tensors, classes_input)
            proto = _export_onnx(traced_module, example, example_classes, opset, example_region)
        except ExportError:
            raise
        except Exception as error:  # tracing and translation raise many types; the user needs the op
            raise ExportError(
                f"the {method} explanation at {layer!r} cannot be exported ({_op_message(error)})"
            ) from None
    foreign = sorted(
        {f"{node.domain}::{node.op_type}" for node in _all_nodes(proto.graph) if node.domain not in ("", "ai.onnx")}
    )
    if foreign:
        raise ExportError(f"the exported graph uses non-standard operators ({', '.join(foreign)}); nothing was saved")

    num_classes = int(map_output.shape[1])
    if class_names is None and spec is not None and spec.num_classes == num_classes == 1000:
        class_names = imagenet_names()
    metadata = {
        **model_metadata(model_name(model), input_size, mean or None, std or None),
        **_explainer_metadata(layer, method, reference, method_options, classes_input, num_classes, opset),
        **(region_metadata(output_key, map_output.shape[-2:]) if region else {"target": "class"}),
    }
    if class_names is not None:
        metadata["class_names"] = json.dumps(list(class_names), ensure_ascii=False)
    _set_props(proto, metadata)

    path.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fdcam-explainer-") as staging:
        staged = Path(staging) / path.name
        _save(proto, staged, external=weight_bytes > EXTERNAL_DATA_BYTES)
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
        images = validation_images if validation_images is not None else _validation_images(input_size, mean, std)
        saliency_error, logits_error, scale, cases = _validate(
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
        data = staged.with_name(staged.name + ".data")
        if data.exists():
            os.replace(data, path.with_name(path.name + ".data"))
        os.replace(staged, path)
        os.replace(staged_json, description)
    log.info("exported %s (saliency max |Δ| %.3g, logits max |Δ| %.3g)", path, saliency_error, logits_error)
    return ExportedExplainer(path, metadata, saliency_error, logits_error, session)


def describe_explainer(metadata: dict[str, str]) -> dict:
    """The JSON written beside the graph: the metadata typed (JSON-valued entries decoded, booleans and
    integers as JSON's own; ONNX's metadata_props can hold only strings), and the I/O."""
    described = {}
    for key, value in metadata.items():
        try:
            if key in _JSON_KEYS:
                described[key] = json.loads(value)
            elif key in _BOOLEAN_KEYS:
                described[key] = {"true": True, "false": False}[value]
            elif key in _INTEGER_KEYS:
                described[key] = int(value)
            else:
                described[key] = value
        except (ValueError, KeyError):
            described[key] = value
    classes_input = metadata.get("classes_input") == "true"
    h, w = (int(v) for v in metadata["input_size"].split("x"))
    described["inputs"] = [{"name": "image", "dtype": "float32", "shape": ["N", 3, h, w]}]
    if classes_input:
        described["inputs"].append({"name": "classes", "dtype": "int64", "shape": ["N", "T"]})
    described["inputs"].extend(region_input(metadata))
    t = "T" if classes_input else 1
    described["outputs"] = [
        {"name": "logits", "dtype": "float32", "shape": ["N", int(metadata["num_classes"])]},
        {"name": "targets", "dtype": "int64", "shape": ["N", t]},
        {"name": "saliency", "dtype": "float32", "shape": ["N", t, h, w]},
    ]
    return described


_JSON_KEYS = {"mean", "std", "method_options", "class_names", "validation"}
_BOOLEAN_KEYS = {"classes_input"}
_INTEGER_KEYS = {"num_classes", "opset"}


def run_explainer(
    session: ort.InferenceSession,
    image: np.ndarray,
    classes: np.ndarray | None = None,
    region: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, targets, saliency) of an explainer session on a float32 image batch (and int64 classes, and
    for a region graph float32 region masks [N,T,h,w])."""
    feed = {"image": np.ascontiguousarray(image, dtype=np.float32)}
    if classes is not None:
        feed["classes"] = np.ascontiguousarray(classes, dtype=np.int64)
    if region is not None:
        feed[REGION_INPUT] = np.ascontiguousarray(region, dtype=np.float32)
    logits, targets, saliency = session.run(OUTPUT_NAMES, feed)
    return logits, targets, saliency


def _explainer_metadata(layer, method, reference, options, classes_input, num_classes, opset) -> dict[str, str]:
    import onnxruntime

    resolved = {}
    if method == "fdcam":
        resolved = {name: getattr(reference, name) for name in ("theta", "bias", "combine", "switch", "grouping")}
    resolved.update({k: v for k, v in options.items() if isinstance(v, (int, float, str, bool))})
    return {
        "target_layer": layer,
        "method": method,
        "method_options": json.dumps(resolved, sort_keys=True),
        "classes_input": "true" if classes_input else "false",
        "num_classes": str(num_classes),
        "inputs": ",".join(explainer_inputs(classes_input)),
        "outputs": ",".join(OUTPUT_NAMES),
        "opset": str(opset),
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "fdcam_version": __version__,
    }


def _example_images(batch: int, input_size: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, *input_size, generator=torch.Generator().manual_seed(seed))


def _validation_images(input_size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Three images: the shipped photo (normalised with the model's mean/std), a flipped copy and noise."""
    try:
        from importlib.resources import files

        from PIL import Image

        with Image.open(files("fdcam") / "data" / "afghan_hound.jpg") as picture:
            picture = picture.convert("RGB").resize((input_size[1], input_size[0]), Image.BILINEAR)
            photo = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1)
        if mean and std:
            photo = (photo - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    except Exception:  # no picture: random images still check the graph
        photo = _example_images(1, input_size, seed=2)[0]
    noise = _example_images(1, input_size, seed=3)[0]
    return torch.stack([photo, photo.flip(-1), noise])


def _reference_logits(model: nn.Module, image: torch.Tensor, output: OutputSelector = None) -> torch.Tensor:
    """The model's output for `image` (the entry `output` selects of a dict or tuple), float32 on the CPU."""
    return _reference_output(model, image, output)[0]


@torch.no_grad()
def _reference_output(
    model: nn.Module, image: torch.Tensor, output: OutputSelector = None
) -> tuple[torch.Tensor, OutputSelector]:
    """(`_reference_logits`, the key or index of the entry explained: "out" of a dict by default, None for a tensor)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with preserved_model_state(model), running():  # no other thread's trace captures these module calls
        raw = model(image.to(device))
    key = "out" if output is None and isinstance(raw, dict) else output
    return select_output(raw, output).float().cpu(), key


def _validate(
    session,
    reference,
    model,
    images: torch.Tensor,
    classes_input: bool,
    num_classes: int,
    output: OutputSelector = None,
    region: bool = False,
):
    """(saliency max |Δ|, logits max |Δ|, max |logit|, cases) of the graph against the library at batch 1 and 3.

    `cases` are the (images, targets, library maps, graph maps) compared, for the conditioning rule (`agreement`).
    A region graph is compared with the library's RegionLogit targets (`region_cases`) and its logits with
    the output map's mean over the pixels.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    saliency_error = logits_error = scale = 0.0
    cases = []
    generator = torch.Generator().manual_seed(0)
    for batch in (images[:1], images[:3]):
        expected_logits = _reference_logits(model, batch, output)
        regions = None
        if region:
            classes, regions = region_cases(expected_logits, generator)
            targets, expected_logits = library_targets(classes, regions), expected_logits.mean((-2, -1))
        else:
            targets = expected_logits.argmax(1, keepdim=True)
            classes = None
            if classes_input:
                other = torch.randint(0, num_classes, (batch.shape[0], 1), generator=generator)
                classes = targets = torch.cat([targets, other], 1)
        expected = reference(batch.to(device), targets if region else targets.to(device)).float().cpu()
        echoed = classes if region else targets  # what the graph's `targets` output holds
        try:
            logits, got_targets, saliency = run_explainer(
                session,
                batch.numpy(),
                None if classes is None else classes.numpy(),
                None if regions is None else regions.numpy(),
            )
        except Exception as error:  # ONNX Runtime raises its own types
            raise ExportError(
                f"ONNX Runtime cannot run the explainer graph ({first_line(error)}); nothing was saved"
            ) from None
        if saliency.shape != tuple(expected.shape) or not np.array_equal(got_targets, echoed.numpy()):
            return float("inf"), float("inf"), 0.0, cases
        saliency_error = max(saliency_error, _max_abs(saliency, expected))
        logits_error = max(logits_error, _max_abs(logits, expected_logits))
        scale = max(scale, float(expected_logits.abs().max()))
        cases.append((batch, targets, expected, saliency))
    return saliency_error, logits_error, scale, cases


def _max_abs(got: np.ndarray, expected: torch.Tensor) -> float:
    difference = np.abs(got.astype(np.float64) - expected.double().numpy()).max()
    return float(difference) if np.isfinite(difference) else float("inf")


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)
            for sub in attribute.graphs:
                yield from _all_nodes(sub)


def _set_props(proto: onnx.ModelProto, props: dict[str, str]) -> None:
    proto.producer_name = "fdcam"
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)


def _save(proto: onnx.ModelProto, path: Path, external: bool) -> None:
    if external:
        onnx.save_model(
            proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data"
        )
    else:
        onnx.save_model(proto, str(path))


def _op_message(error: BaseException) -> str:
    """The first line of an export error, naming the ATen op when the message carries one."""
    import re

    text = str(error)
    found = re.search(r"(aten[.:]{1,2}[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)", text)
    first = first_line(error)
    return f"no ONNX translation for {found.group(1)}: {first}" if found and found.group(1) not in first else first
