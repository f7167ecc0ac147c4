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
exporter (dynamo=False) with dynamic_axes (export/tail_exporters.py).
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

import onnx
import onnxruntime as ort
import torch
from torch import nn

from fdcam._version import __version__
from fdcam.errors import ExportError, first_line
from fdcam.factorise import ShortcutGraph, tail_shortcut
from fdcam.split import SplitModel
from fdcam.tail import MaskedTail

from .fp16 import to_fp16
from .onnx_io import EXTERNAL_DATA_BYTES, move_into_place, read_metadata, set_props
from .onnx_io import save as _save  # looked up here at each export (a test swaps it for a full disk)
from .tail_checks import check_cases, cpu_session, max_error, reference_logits
from .tail_exporters import EXPORTERS
from .tail_form import TailForm, gathers, input_names

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
    checks = check_cases(reference, features, extras, batches, form)
    num_classes = int(reference_logits(reference, features, torch.ones(1, 1, num_channels), extras).shape[-1])
    tolerance = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
    props = {**(metadata or {}), **_shape_metadata(split, features, num_classes, opset, fp16), **_form_metadata(form)}
    tensors = _tail_tensors(tail)
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    largest_weight = max((t.numel() for t in tensors), default=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    problems = []
    for kind, module in _tail_forms(tail, features, extras, factorise, form):
        for exporter_name, exporter in EXPORTERS:
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
                set_props(proto, final_props)
                staged = Path(staging) / path.name
                _save(proto, staged, external=weight_bytes > EXTERNAL_DATA_BYTES)
                del proto
                try:
                    onnx.checker.check_model(str(staged))
                except Exception as error:
                    problems.append(f"{attempt} graph fails onnx.checker ({first_line(error)})")
                    continue
                session = cpu_session(staged, session_options)
                error, scale = max_error(session, checks)
                if not error <= tolerance.allowed(scale):
                    problems.append(
                        f"{attempt} graph differs from the torch tail by {error:.3g} "
                        f"(max |Δlogit| over 1 image × {batches[0]} and 2 images × {batches[1]} masks; "
                        f"allowed {tolerance.allowed(scale):.3g})"
                    )
                    continue
                move_into_place(staged, path)
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
