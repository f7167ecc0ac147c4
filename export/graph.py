"""Export the tail of a split model to one validated ONNX graph.

The graph takes `features` [N,K,h,w] of N images, `masks` [N,M,K] (M masks per image) and the
tensors that cross the split (`extra_0`, … [N,...]), with N and M symbolic axes; it applies the
masks inside (`MaskedTail`, or the factorised form from `fdcam.factorise` when the tail starts with
pooling and a Linear) and returns `logits` [N,M,classes]: N images' switch passes are one run. Other
forms (`TailForm`, used by fdcam.runtime) also take `classes` [N,T] int64 and return [N,M,T], only
those rows of a last Linear computed, and/or gather the few channels of each 0/1 mask row (a static
`bound`) instead of the dense product of a first convolution. A
graph is written only after onnx.checker accepted it and ONNX Runtime (CPU) reproduced the plain
torch masked tail on 1 image × 3 masks and 2 images × 2K masks within tolerance. Exporters, in
order: torch.onnx.export(dynamo=True) with dynamic image and mask axes, then the TorchScript
exporter (dynamo=False) with dynamic_axes.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from torch import nn

from fdcam._version import __version__
from fdcam.errors import ExportError, first_line
from fdcam.factorise import ShortcutGraph, TailShortcut, tail_shortcut
from fdcam.split import SplitModel
from fdcam.tail import CONV_SPARSE_SHARE, MaskedTail

__all__ = [
    "DEFAULT_OPSET",
    "FP16_TOLERANCE",
    "FP32_TOLERANCE",
    "ExportError",
    "ExportedTail",
    "TailForm",
    "Tolerance",
    "export_split",
    "gathers",
    "input_names",
    "model_metadata",
    "read_metadata",
    "to_fp16",
]

log = logging.getLogger("fdcam.export")

DEFAULT_OPSET = 18
# The example image and mask batches used while tracing: a batch of 1 would be specialised into the graph.
EXAMPLE_IMAGES = 2
EXAMPLE_MASK_BATCH = 3
# Above this many bytes of weights the tensors go to one external-data file (protobuf caps a file at 2 GB).
EXTERNAL_DATA_BYTES = 1_800_000_000


@dataclass(frozen=True)
class Tolerance:
    """A graph passes when max |ONNX − torch| over all logits ≤ atol + rtol · max |torch logit|."""

    atol: float
    rtol: float

    def allowed(self, scale: float) -> float:
        return self.atol + self.rtol * scale


FP32_TOLERANCE = Tolerance(atol=1e-5, rtol=1e-4)
# fp16 weights and activations carry ~3 significant digits; 2 % of the largest logit leaves room for
# the rounding accumulated over a deep tail while still catching a wrong graph.
FP16_TOLERANCE = Tolerance(atol=1e-3, rtol=2e-2)


@dataclass
class ExportedTail:
    """A validated graph on disk, the exporter that made it and the largest |ONNX − torch| seen in the check."""

    path: Path
    exporter: str
    max_error: float
    num_classes: int
    metadata: dict[str, str] = field(default_factory=dict)
    session: ort.InferenceSession | None = field(default=None, repr=False)  # the CPU session used for the check


@dataclass(frozen=True)
class TailForm:
    """What a tail graph computes: with `classes`, it takes classes [N,T] and returns [N,M,T]; with `bound`,
    a first convolution's pre-activations are gathered sums over `bound` channels per 0/1 mask row."""

    classes: bool = False
    bound: int | None = None

    @property
    def suffix(self) -> str:
        """The form in a graph's file name: "" for the plain form."""
        return ("-classes" if self.classes else "") + (f"-sparse{self.bound}" if self.bound is not None else "")


def gathers(shortcut: TailShortcut | None, num_channels: int, sparsity: int | None) -> bool:
    """Whether masks whose rows have at most `sparsity` ones or zeros take the gathered sums of a first
    convolution (as fdcam.tail.TorchTail does for a convolution) rather than its dense product."""
    return (
        shortcut is not None
        and shortcut.kind == "conv"
        and sparsity is not None
        and 1 <= sparsity <= CONV_SPARSE_SHARE * num_channels
    )


def input_names(num_extras: int, classes: bool = False) -> list[str]:
    """Graph input names: features, masks, classes (when the graph takes them), then extra_0 … extra_{n-1}."""
    return ["features", "masks", *(["classes"] if classes else []), *(f"extra_{index}" for index in range(num_extras))]


def export_split(
    split: SplitModel,
    features: torch.Tensor,
    extras: Sequence[torch.Tensor],
    path: str | os.PathLike,
    *,
    fp16: bool = False,
    metadata: dict[str, str] | None = None,
    opset: int = DEFAULT_OPSET,
    check_batches: tuple[int, int] | None = None,
    session_options: ort.SessionOptions | None = None,
    factorise: bool = True,
    form: TailForm = TailForm(),
) -> ExportedTail:
    """Export `split.tail` as a masked-tail graph at `path`, checked and validated first (ExportError if not).

    `features` [1,K,h,w] and `extras` are one image's tensors; `check_batches` are the two mask batch
    sizes of the ONNX Runtime check (default 3 and 2K). fp16=True stores fp16 weights and compute
    with fp32 inputs/outputs, validated with FP16_TOLERANCE instead of FP32_TOLERANCE. With
    `factorise`, a tail that starts with pooling and a Linear is exported factorised (same inputs
    and outputs, far fewer operations); the check is always against the plain masked tail. `form`
    adds the classes input and the gathered sums (see `TailForm`; checked on masks that fit its bound).
    """
    path = Path(path)
    tail = _export_copy(split.tail)
    features = _example(features)
    extras = [_example(extra) for extra in extras]
    if features.dim() != 4:
        raise ExportError(f"features must be [1,K,h,w], got shape {tuple(features.shape)}")
    num_channels = features.shape[1]
    batches = check_batches or (3, 2 * num_channels)
    reference = MaskedTail(tail).eval()
    checks = _checks(reference, features, extras, batches, form)
    num_classes = int(_reference_logits(reference, features, torch.ones(1, 1, num_channels), extras).shape[-1])
    tolerance = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
    props = {**(metadata or {}), **_shape_metadata(split, features, num_classes, opset, fp16), **_form_metadata(form)}
    tensors = _tail_tensors(tail)
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    largest_weight = max((t.numel() for t in tensors), default=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    problems = []
    for kind, module in _tail_forms(tail, features, extras, factorise, form):
        for exporter_name, exporter in _EXPORTERS:
            attempt = f"{exporter_name} exporter ({kind} tail)"
            with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fdcam-export-") as staging:
                try:
                    proto = exporter(module, features, extras, opset, Path(staging), largest_weight, form.classes)
                except Exception as error:  # the exporters raise many types; the next one may work
                    log.info("%s failed: %s", attempt, first_line(error))
                    problems.append(f"{attempt} failed ({first_line(error)})")
                    continue
                if fp16:
                    proto = to_fp16(proto)
                final_props = {**props, "exporter": exporter_name, "tail_form": kind}
                _set_metadata(proto, final_props)
                staged = Path(staging) / path.name
                _save(proto, staged, external=weight_bytes > EXTERNAL_DATA_BYTES)
                del proto
                try:
                    onnx.checker.check_model(str(staged))
                except Exception as error:
                    problems.append(f"{attempt} graph fails onnx.checker ({first_line(error)})")
                    continue
                session = _cpu_session(staged, session_options)
                error, scale = _max_error(session, checks)
                if not error <= tolerance.allowed(scale):
                    problems.append(
                        f"{attempt} graph differs from the torch tail by {error:.3g} "
                        f"(max |Δlogit| over 1 image × {batches[0]} and 2 images × {batches[1]} masks; "
                        f"allowed {tolerance.allowed(scale):.3g})"
                    )
                    continue
                _move_into_place(staged, path)
                log.info("exported %s with the %s (max |Δlogit| %.3g)", path, attempt, error)
                return ExportedTail(path, exporter_name, error, num_classes, final_props, session)
    raise ExportError(f"{'; '.join(problems)}; nothing was saved")


def _tail_forms(
    tail: nn.Module, features: torch.Tensor, extras: list[torch.Tensor], factorise: bool, form: TailForm = TailForm()
) -> list[tuple[str, nn.Module]]:
    """The modules to export, best first: the tail's shortcut (fdcam.factorise) when it applies, then MaskedTail.

    All have the inputs and outputs of `form`. The factorised one computes the per-channel
    contributions to the tail's first Linear once, so M masks cost a [M,K]×[K,out] product; the
    shortcut forms compute only the rows of the classes of a last Linear, and gather a first
    convolution's channels under a bound. A tail without such a shortcut exports the masked form.
    """
    forms: list[tuple[str, nn.Module]] = []
    if factorise:
        shortcut = tail_shortcut(tail, features, extras)
        bound = form.bound if gathers(shortcut, features.shape[1], form.bound) else None
        if shortcut is not None and (
            shortcut.kind == "linear" or bound is not None or (form.classes and shortcut.selects_rows)
        ):
            forms.append(
                (
                    "factorised" if shortcut.kind == "linear" else "shortcut",
                    ShortcutGraph(shortcut, form.classes, bound),
                )
            )
    forms.append(("masked", _MaskedClasses(tail) if form.classes else MaskedTail(tail).eval()))
    return forms


class _MaskedClasses(MaskedTail):
    """MaskedTail taking classes [N,T] after the masks: logits [N,M,T] gathered from all classes."""

    def forward(
        self, features: torch.Tensor, masks: torch.Tensor, classes: torch.Tensor, *extras: torch.Tensor
    ) -> torch.Tensor:
        logits = super().forward(features, masks, *extras)
        return logits.gather(2, classes[:, None, :].expand(-1, masks.shape[1], -1))


def _export_copy(tail: nn.Module) -> nn.Module:
    """A CPU fp32 eval-mode copy of the tail, so exporting never touches the user's modules."""
    copied = copy.deepcopy(tail).to("cpu", torch.float32).eval()
    copied.requires_grad_(False)
    return copied


def _example(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[:1].detach().to("cpu", torch.float32).contiguous()


def _tail_tensors(tail: nn.Module) -> list[torch.Tensor]:
    return [*tail.parameters(), *tail.buffers()]


def _checks(
    reference: nn.Module,
    features: torch.Tensor,
    extras: Sequence[torch.Tensor],
    batches: Sequence[int],
    form: TailForm = TailForm(),
) -> list[tuple]:
    """(features, masks, extras, classes, torch logits) cases: 1 image × batches[0] masks, 2 images × batches[1].

    The masks are random 0/1 with the first row all ones (the unmasked tail), or with a `form.bound`
    rows of at most that many ones or zeros; the second image is the first one flipped, its extras
    halved. With `form.classes`, each image asks for 2 random classes (None otherwise).
    """
    generator = torch.Generator().manual_seed(0)
    cases = []
    k = features.shape[1]
    for images, batch in zip((1, 2), batches):
        if form.bound is None:
            masks = (torch.rand(images, int(batch), k, generator=generator) > 0.5).float()
        else:
            masks = _bounded_masks(images, int(batch), k, form.bound, generator)
        masks[:, 0] = 1.0
        batch_features = torch.cat([features, features.flip(-1)])[:images]
        batch_extras = [torch.cat([extra, extra * 0.5])[:images] for extra in extras]
        expected = _reference_logits(reference, batch_features, masks, batch_extras)
        classes = None
        if form.classes:
            classes = torch.randint(0, expected.shape[-1], (images, 2), generator=generator)
            expected = expected.gather(2, classes[:, None, :].expand(-1, masks.shape[1], -1))
        cases.append((batch_features, masks, batch_extras, classes, expected))
    return cases


def _bounded_masks(images: int, batch: int, k: int, bound: int, generator: torch.Generator) -> torch.Tensor:
    """Random 0/1 masks [images,batch,K] whose rows have 1…`bound` ones (even rows) or zeros (odd rows)."""
    order = torch.rand(images, batch, k, generator=generator).argsort(-1)
    counts = torch.randint(1, bound + 1, (images, batch, 1), generator=generator)
    chosen = (order < counts).float()  # `counts` random channels per row
    odd = (torch.arange(batch) % 2 == 1)[None, :, None]
    return torch.where(odd, 1 - chosen, chosen)


@torch.no_grad()
def _reference_logits(
    masked: nn.Module, features: torch.Tensor, masks: torch.Tensor, extras: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The torch tail's logits the graph must reproduce."""
    return masked(features, masks, *extras)


def _max_error(session: ort.InferenceSession, checks: list[tuple]) -> tuple[float, float]:
    """(max |ONNX − torch|, max |torch|) over all check cases; a non-finite output counts as infinite error."""
    error, scale = 0.0, 0.0
    for features, masks, extras, classes, reference in checks:
        tensors = (features, masks, *([] if classes is None else [classes]), *extras)
        feed = dict(zip(input_names(len(extras), classes is not None), (t.numpy() for t in tensors)))
        (logits,) = session.run(["logits"], feed)
        logits = torch.from_numpy(logits)
        if logits.shape != reference.shape:
            return float("inf"), float(reference.abs().max())
        difference = (logits - reference).abs().max()
        error = max(error, float(difference) if torch.isfinite(difference) else float("inf"))
        scale = max(scale, float(reference.abs().max()))
    return error, scale


def _cpu_session(path: Path, options: ort.SessionOptions | None) -> ort.InferenceSession:
    if options is None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# --- exporters -----------------------------------------------------------------------------------


def _export_dynamo(
    masked: nn.Module,
    features: torch.Tensor,
    extras: list[torch.Tensor],
    opset: int,
    staging: Path,
    largest_weight: int,
    classes: bool = False,
) -> onnx.ModelProto:
    """torch.export-based exporter, with the image, mask (and class) batches as the dynamic dimensions."""
    features, masks, extras = _example_batch(features, extras)
    images, batch = torch.export.Dim("images", min=1), torch.export.Dim("masks", min=1)
    rest = [*([_example_classes()] if classes else []), *extras]
    rest_shapes = [
        *([{0: images, 1: torch.export.Dim("classes", min=1)}] if classes else []),
        *({0: images} for _ in extras),
    ]
    # MaskedTail takes the extras as *args, which torch.export sees as one tuple argument.
    dynamic_shapes = ({0: images}, {0: images, 1: batch}, tuple(rest_shapes))
    if not rest:
        dynamic_shapes = dynamic_shapes[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            masked,
            (features, masks, *rest),
            input_names=input_names(len(extras), classes),
            output_names=["logits"],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )
    _fold_weight_constants(program.model, largest_weight)
    return program.model_proto


def _fold_weight_constants(model, largest_weight: int) -> None:
    """Fold ops on weights (a reshape + transpose of a Linear weight, say) into the stored weights.

    The exporter's own pass skips tensors above 8192 elements, which would leave ONNX Runtime
    to transpose hundreds of MB at every session start. Folds that grow the file are still skipped.
    """
    try:
        import onnxscript.optimizer

        onnxscript.optimizer.fold_constants(model, input_size_limit=max(largest_weight, 8192))
    except Exception as error:  # folding is an optimisation; the unfolded graph is correct
        log.info("constant folding skipped: %s", first_line(error))


def _export_torchscript(
    masked: nn.Module,
    features: torch.Tensor,
    extras: list[torch.Tensor],
    opset: int,
    staging: Path,
    largest_weight: int,
    classes: bool = False,
) -> onnx.ModelProto:
    """The legacy TorchScript exporter with a dynamic axis on masks and logits (the fallback)."""
    features, masks, extras = _example_batch(features, extras)
    target = staging / "torchscript.onnx"  # a file path: tails over 2 GB need external data
    names = input_names(len(extras), classes)
    axes = {name: {0: "images"} for name in names}
    axes.update(masks={0: "images", 1: "masks"}, logits={0: "images", 1: "masks"})
    if classes:
        axes.update(classes={0: "images", 1: "classes"}, logits={0: "images", 1: "masks", 2: "classes"})
    rest = [*([_example_classes()] if classes else []), *extras]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            masked,
            (features, masks, *rest),
            str(target),
            input_names=names,
            output_names=["logits"],
            opset_version=opset,
            dynamo=False,
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    return onnx.load(str(target))


def _example_batch(
    features: torch.Tensor, extras: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One image's tensors as a traced example of EXAMPLE_IMAGES images × EXAMPLE_MASK_BATCH masks."""
    repeat = lambda t: t.expand(EXAMPLE_IMAGES, *t.shape[1:]).contiguous()  # noqa: E731
    masks = torch.ones(EXAMPLE_IMAGES, EXAMPLE_MASK_BATCH, features.shape[1])
    return repeat(features), masks, [repeat(extra) for extra in extras]


def _example_classes() -> torch.Tensor:
    """Classes [EXAMPLE_IMAGES, 4] for tracing a graph with a classes input."""
    return torch.zeros(EXAMPLE_IMAGES, 4, dtype=torch.long)


_EXPORTERS: list[tuple[str, Callable[..., onnx.ModelProto]]] = [
    ("dynamo", _export_dynamo),
    ("torchscript", _export_torchscript),
]


# --- fp16 ----------------------------------------------------------------------------------------


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and compute with fp32 graph inputs and outputs (Casts at the borders)."""
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as error:  # pragma: no cover - shipped with every onnxruntime wheel
        raise ExportError("fp16 export needs onnxruntime.transformers.float16, which this onnxruntime lacks") from error
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns for every weight clipped to the fp16 range
        converted = convert_float_to_float16(proto, keep_io_types=True)
    # The converter appends its input Casts at the end of the node list; ONNX wants topological order.
    _sort_topologically(converted.graph)
    return converted


def _sort_topologically(graph: onnx.GraphProto) -> None:
    known = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [node for node in pending if all(name in known for name in node.input)]
        if not ready:
            raise ExportError("the fp16 graph has a node whose inputs are never produced")
        for node in ready:
            known.update(node.output)
        ordered.extend(ready)
        ready_ids = {id(node) for node in ready}
        pending = [node for node in pending if id(node) not in ready_ids]
    del graph.node[:]
    graph.node.extend(ordered)


# --- metadata and files --------------------------------------------------------------------------


def _shape_metadata(
    split: SplitModel, features: torch.Tensor, num_classes: int, opset: int, fp16: bool
) -> dict[str, str]:
    _, channels, height, width = features.shape
    return {
        "target_layer": split.layer,
        "channels": str(channels),
        "height": str(height),
        "width": str(width),
        "num_classes": str(num_classes),
        "num_extras": str(split.num_extras),
        "precision": "fp16" if fp16 else "fp32",
        "opset": str(opset),
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "fdcam_version": __version__,
    }


def _form_metadata(form: TailForm) -> dict[str, str]:
    return {
        "classes_input": "true" if form.classes else "false",
        "sparse_bound": "" if form.bound is None else str(form.bound),
    }


def model_metadata(
    name: str, input_size: tuple[int, int] | None, mean: Sequence[float] | None, std: Sequence[float] | None
) -> dict[str, str]:
    """Metadata about the whole model: its name, input size "HxW" and normalisation (JSON lists) when known."""
    props = {"model": name}
    if input_size is not None:
        props["input_size"] = f"{input_size[0]}x{input_size[1]}"
    if mean is not None:
        props["mean"] = json.dumps([float(v) for v in mean])
    if std is not None:
        props["std"] = json.dumps([float(v) for v in std])
    return props


def _set_metadata(proto: onnx.ModelProto, props: dict[str, str]) -> None:
    proto.producer_name = "fdcam"
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata_props of a graph on disk, without loading its weights."""
    proto = onnx.load(str(path), load_external_data=False)
    return {entry.key: entry.value for entry in proto.metadata_props}


def _save(proto: onnx.ModelProto, path: Path, external: bool) -> None:
    if external:
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            convert_attribute=True,
        )
    else:
        onnx.save_model(proto, str(path))


def _move_into_place(staged: Path, path: Path) -> None:
    """Atomic per file: readers never see a half-written graph."""
    data = staged.with_name(staged.name + ".data")
    if data.exists():
        os.replace(data, path.with_name(path.name + ".data"))
    os.replace(staged, path)
