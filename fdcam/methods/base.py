"""The shared machinery of every CAM method: split, head forward, targets, gradients, maps."""

from __future__ import annotations

import contextlib
import inspect
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np
import torch
from torch import nn

from ..backends import BACKENDS, tail_backend
from ..concurrency import running, tracing
from ..errors import first_line
from ..head import HeadOutput, class_gradients, forward_head
from ..maps import to_input_size, weighted_sum
from ..model_state import preserved_model_state
from ..options import invalid_choice
from ..split import SplitModel, resolve_layer_name, split_model
from ..tail import Tail, TorchTail, check_torch_precision
from ..timing import stage

__all__ = ["BaseCAM", "Explanation", "NonFiniteError", "Targets", "resolve_targets", "preserved_model_state"]

Targets = Union[None, int, Sequence[int], Sequence[Sequence[int]], torch.Tensor]


class NonFiniteError(ValueError):
    """The model's logits or a saliency map contain NaN or infinite values."""


def _class_index(value: object) -> int:
    """An int from an int-like (int, np.int64, 0-d integer tensor); floats, bools and strings are refused."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"targets must be integer class indices, got {value!r} ({type(value).__name__})")
    return int(value)


def resolve_targets(targets: Targets, logits: torch.Tensor) -> torch.Tensor:
    """Class indices [N,T] from None (top-1), an int, one int per image or equal-length lists per image.

    Integers may be Python or numpy ints; integer tensors and arrays work too; floats and strings are refused.
    """
    n, num_classes = logits.shape
    if isinstance(targets, np.ndarray):
        if targets.dtype.kind not in "iu":
            raise ValueError(f"targets must be integer class indices, got an array of {targets.dtype}")
        targets = torch.from_numpy(np.ascontiguousarray(targets))
    if targets is None:
        resolved = logits.argmax(1, keepdim=True)
    elif isinstance(targets, torch.Tensor):
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise ValueError(f"targets must be integer class indices, got a tensor of {targets.dtype}")
        resolved = targets.to(logits.device, torch.long)
        resolved = resolved.expand(n).reshape(n, 1) if resolved.dim() <= 1 and resolved.numel() in (1, n) else resolved
    elif isinstance(targets, (str, bytes)):
        raise ValueError(f"targets must be integer class indices, got the string {targets!r}")
    elif isinstance(targets, numbers.Integral) and not isinstance(targets, bool):
        resolved = torch.full((n, 1), int(targets), dtype=torch.long, device=logits.device)
    else:
        try:
            targets = list(targets)
        except TypeError:
            raise ValueError(f"targets must be None, an int, or one int or list of ints per image, not {type(targets).__name__}") from None
        if len(targets) != n:
            raise ValueError(f"got {len(targets)} targets for {n} images; give one entry per image")
        rows = [
            [_class_index(c) for c in t] if isinstance(t, (list, tuple, torch.Tensor, np.ndarray)) and np.ndim(t) == 1
            else [_class_index(t)]
            for t in targets
        ]
        if len({len(r) for r in rows}) != 1:
            raise ValueError("every image needs the same number of target classes")
        resolved = torch.tensor(rows, dtype=torch.long, device=logits.device)
    if resolved.dim() != 2 or resolved.shape[0] != n:
        raise ValueError(f"targets must give classes for each of the {n} images")
    if resolved.shape[1] == 0:
        raise ValueError("targets name no class; give at least one class per image")
    bad = resolved[(resolved < 0) | (resolved >= num_classes)]
    if bad.numel():
        raise ValueError(f"class index {int(bad[0])} is out of range for a model with {num_classes} classes")
    return resolved


@dataclass
class Explanation:
    """Everything a method needs to weigh channels for a batch: inputs, split, head output, targets."""

    x: torch.Tensor
    split: SplitModel
    head: HeadOutput
    targets: torch.Tensor
    _gradients: torch.Tensor | None = field(default=None, repr=False)

    @property
    def activations(self) -> torch.Tensor:
        return self.head.activations

    @property
    def gradients(self) -> torch.Tensor:
        """∂f_c/∂A [N,T,K,h,w], computed once on first use."""
        if self._gradients is None:
            with stage("backward"):
                self._gradients = class_gradients(self.split, self.head, self.targets)
        return self._gradients


class BaseCAM:
    """A CAM method over a model split at `target_layer`; call it on a batch to get maps [N,T,H,W] in [0,1].

    Subclasses implement `channel_weights` (weights [N,T,K] or per-pixel [N,T,K,h,w]); the base
    class does the split, the forward pass, target resolution and the map. Engine options apply to
    the masked tail passes (FD-CAM, Ablation-CAM): `backend`, `provider`, `precision` ("fp32",
    "tf32", "fp16"; "bf16" on torch), `batch_size`/`memory_budget`, and `cuda_graph` (torch on CUDA).

    An explainer may be shared between threads: splits and ONNX tails are built under a process-wide
    tracing lock, the model stays in eval mode while any thread explains, and global flags are set
    under a lock and restored (see fdcam.concurrency).
    """

    #: Whether the method runs masked tail passes, i.e. uses backend/provider/precision/cuda_graph.
    uses_tail_engine = False
    #: Attributes that hold constructor options under another name (for __repr__).
    _option_attributes: dict[str, str] = {}

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        batch_size: int | None = None,
        memory_budget: int | None = None,
        progress: bool = False,
        backend: str = "torch",
        provider: str | None = None,
        precision: str = "fp32",
        cuda_graph: bool = False,
        tracer_kwargs: dict | None = None,
    ):
        if backend not in BACKENDS:
            raise invalid_choice("backend", backend, BACKENDS)
        if backend == "torch":
            check_torch_precision(precision)
        elif cuda_graph:
            raise ValueError("cuda_graph applies to the torch backend; ONNX Runtime sessions run without it")
        for name, value in (("batch_size", batch_size), ("memory_budget", memory_budget)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None, not {value!r}")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        self.model = model
        self.tracer_kwargs = tracer_kwargs
        layer = target_layer if target_layer is not None else _default_layer(model, tracer_kwargs)
        self.target_layer = resolve_layer_name(model, layer, tracer_kwargs)
        self.batch_size = batch_size
        self.memory_budget = memory_budget
        self.progress = progress
        self.backend, self.provider, self.precision = backend, provider, precision
        self.cuda_graph = cuda_graph
        self._splits: dict[tuple, SplitModel] = {}
        self._tails: dict[tuple, Tail] = {}
        self._tail_fingerprints: dict[tuple, tuple] = {}
        self._structure = _structure_of(model)
        self._warned: set[str] = set()
        if not self.uses_tail_engine:
            ignored = [
                f"{name}={value!r}"
                for name, value, default in (
                    ("backend", backend, "torch"), ("provider", provider, None),
                    ("precision", precision, "fp32"), ("cuda_graph", cuda_graph, False),
                )
                if value != default
            ]
            if ignored:
                self._warn_once(
                    "ignored",
                    f"{type(self).__name__} ignores {', '.join(ignored)}: only FD-CAM and Ablation-CAM run masked tail passes",
                )

    def __repr__(self) -> str:
        """The class and its options, as torchcam prints its methods: the method's own, then engine options not at their default."""
        options: dict[str, object] = {"target_layer": self.target_layer}
        for cls in type(self).__mro__[::-1]:
            if "__init__" not in cls.__dict__ or not issubclass(cls, BaseCAM):
                continue
            for parameter in inspect.signature(cls.__dict__["__init__"]).parameters.values():
                if parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
                    continue
                value = getattr(self, self._option_attributes.get(parameter.name, parameter.name))
                if cls is not BaseCAM or value != parameter.default:
                    options[parameter.name] = value
        base = [name for name in inspect.signature(BaseCAM.__init__).parameters if name in options and name != "target_layer"]
        ordered = [name for name in options if name not in base] + base
        return f"{type(self).__name__}({', '.join(f'{name}={_short_repr(options[name])}' for name in ordered)})"

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=3)

    @property
    def tails(self) -> tuple[Tail, ...]:
        """The tail engines built so far (one per split), read-only: their `calls` counters show the switch passes."""
        return tuple(self._tails.values())

    def __call__(self, x: torch.Tensor, targets: Targets = None) -> torch.Tensor:
        return self.explain(x, targets)

    def explain(self, x: torch.Tensor, targets: Targets = None) -> torch.Tensor:
        """Saliency maps [N,T,H,W], float32 in [0,1], on x's device, for the requested target classes.

        Raises ValueError (one line) for bad input or targets, and NonFiniteError (a ValueError)
        when the model's logits or the map are NaN or infinite.
        """
        _check_input(x, self.model)
        if self.cuda_graph and not x.is_cuda:
            self._warn_once("cuda_graph", "cuda_graph applies to CUDA inputs only; these switch passes run eagerly")
        with preserved_model_state(self.model):
            split = self.split_for(x)
            with running():
                with stage("head"):
                    head = _one_line_errors(lambda: forward_head(split, x), x)
                if not torch.isfinite(head.logits).all():
                    raise NonFiniteError("the model's logits are NaN or infinite (are its weights finite?)")
                if min(head.activations.shape[-2:]) == 1 and max(head.activations.shape[-2:]) == 1:
                    self._warn_once(
                        "blank",
                        f"layer {self.target_layer!r} is 1x1 for inputs of {tuple(x.shape[-2:])}: its maps are blank (all zero);"
                        " choose an earlier layer or a larger input",
                    )
                explanation = Explanation(x, split, head, resolve_targets(targets, head.logits))
                with stage("weights"):
                    weights = self.channel_weights(explanation)
                if not torch.isfinite(weights).all():
                    raise NonFiniteError(f"{type(self).__name__}'s channel weights are NaN or infinite")
                with stage("map"):
                    maps = self.saliency(explanation, weights)
                if not torch.isfinite(maps).all():
                    raise NonFiniteError(f"{type(self).__name__}'s saliency map is NaN or infinite")
        return maps.float()

    def saliency(self, explanation: Explanation, weights: torch.Tensor) -> torch.Tensor:
        """ReLU of the weighted sum of activations, upsampled to the input and min-max normalised."""
        cams = weighted_sum(explanation.activations, weights.to(explanation.activations.dtype))
        # min-max normalisation would turn NaN into zeros; not while tracing to a graph (no data to look at)
        if not _is_traced(cams) and not torch.isfinite(cams).all():
            raise NonFiniteError(f"{type(self).__name__}'s map is NaN or infinite before normalisation")
        return to_input_size(cams, tuple(explanation.x.shape[-2:]))

    def channel_weights(self, explanation: Explanation) -> torch.Tensor:
        raise NotImplementedError

    def split_for(self, x: torch.Tensor) -> SplitModel:
        """The model split at the target layer for inputs shaped like x (built once, then cached).

        Built under the process-wide tracing lock; if the model's modules were replaced since, the
        splits and tails are built again.
        """
        key = (tuple(x.shape[1:]), x.device, x.dtype)
        structure = _structure_of(self.model)
        if structure != self._structure:
            self._splits, self._tails, self._tail_fingerprints = {}, {}, {}
            self._structure = structure
        split = self._splits.get(key)
        if split is None:
            with tracing():
                split = self._splits.get(key)  # another thread may have built it meanwhile
                if split is None:
                    split = _one_line_errors(lambda: split_model(self.model, self.target_layer, x[:1].detach(), self.tracer_kwargs), x)
                    self._splits[key] = split
        return split

    def tail_for(self, explanation: Explanation) -> Tail:
        """The engine that runs masked tail passes: torch, or an ONNX Runtime session (fdcam.runtime).

        An ONNX Runtime tail is checked against a cheap fingerprint of the tail's weights on every
        call (tensor identities, storage pointers, in-place version counters): weights changed in
        place, by load_state_dict or by batch-norm statistics give a new graph.
        """
        key = id(explanation.split)
        if self.backend != "torch":
            backend = tail_backend(self.backend)
            fingerprint = backend.fingerprint(explanation.split.tail)
            if key in self._tails and self._tail_fingerprints.get(key) == fingerprint:
                return self._tails[key]
            with tracing():
                tail = backend.build(
                    self.model,
                    explanation.split,
                    explanation.activations[:1],
                    [extra[:1] for extra in explanation.head.extras],
                    provider=self.provider,
                    precision=self.precision,
                    memory_budget=self.memory_budget,
                    batch_size=self.batch_size,
                )
            self._tails[key], self._tail_fingerprints[key] = tail, fingerprint
            return tail
        if key not in self._tails:
            self._tails[key] = TorchTail(
                explanation.split.tail,
                batch_size=self.batch_size,
                memory_budget=self.memory_budget,
                precision=self.precision,
                cuda_graph=self.cuda_graph,
            )
        return self._tails[key]


def _short_repr(value: object) -> str:
    """repr of an option; a model or other object by its type, so that a repr stays one short line."""
    if value is None or isinstance(value, (bool, int, float, str, dict, list, tuple)):
        return repr(value)
    return f"<{type(value).__name__}>"


def _structure_of(model: nn.Module) -> tuple:
    """Which module objects make up the model: a split built before a submodule was replaced is stale."""
    return tuple(id(module) for module in model.modules())


def _one_line_errors(function, x: torch.Tensor):
    """Run `function`; a RuntimeError of the model on this input becomes a one-line ValueError (out of memory stays)."""
    try:
        return function()
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:
        raise ValueError(f"the model cannot run on an input of shape {tuple(x.shape)} ({first_line(error)})") from error


def _default_layer(model: nn.Module, tracer_kwargs: dict | None = None) -> str:
    """The spec's layer for fdcam's models, else the last layer with a spatial 4-D output (named in a warning)."""
    from ..models import spec_of
    from ..nodes import last_spatial_layer

    spec = spec_of(model)
    if spec is not None:
        return spec.default_layer
    try:
        chosen = last_spatial_layer(model, tracer_kwargs)
    except Exception as error:  # fx and the model raise many types; the user needs one line
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"give target_layer: no layer could be found for this model ({first_line})") from error
    if chosen is None:
        raise ValueError("give target_layer: the model has no layer with a spatial 4-D output")
    warnings.warn(
        f"no target_layer given: explaining {chosen.name!r} ({chosen.type}, output {list(chosen.shape)}),"
        " the last layer with a spatial 4-D output",
        UserWarning,
        stacklevel=3,
    )
    return chosen.name


def _model_dtype_and_channels(model: nn.Module) -> tuple[torch.dtype | None, int | None]:
    """The dtype of the model's floating-point weights and the input channels of its first convolution."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    channels = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return dtype, channels


def _is_traced(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is symbolic (export tracing), so that checks of its values cannot run."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(tensor) or torch.fx._symbolic_trace.is_fx_tracing()


def _check_input(x: torch.Tensor, model: nn.Module | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"input must be a float tensor [N,C,H,W], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"input must be a 4-D float tensor [N,C,H,W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"input must be a float tensor [N,C,H,W], got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"the input batch is empty (shape {tuple(x.shape)}); give at least one image")
    if min(x.shape[-2:]) == 0:
        raise ValueError(f"the input images are empty (shape {tuple(x.shape)})")
    if model is not None:
        dtype, channels = _model_dtype_and_channels(model)
        if dtype is not None and x.dtype != dtype:
            raise ValueError(f"input is {x.dtype} but the model's weights are {dtype}; convert it with x.to({dtype})")
        if channels is not None and x.shape[1] != channels:
            raise ValueError(f"input has {x.shape[1]} channels but the model's first convolution takes {channels}")
    if not torch.isfinite(x).all():
        raise ValueError("input contains NaN or infinite values")
