"""The shared machinery of every CAM method: split, head forward, targets, gradients, maps."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence, Union

import torch
from torch import nn

from ..head import HeadOutput, class_gradients, forward_head
from ..maps import to_input_size, weighted_sum
from ..split import SplitModel, resolve_layer_name, split_model
from ..tail import Tail, TorchTail, check_torch_precision

__all__ = ["BaseCAM", "Explanation", "Targets", "resolve_targets", "preserved_model_state"]

Targets = Union[None, int, Sequence[int], Sequence[Sequence[int]], torch.Tensor]


@contextlib.contextmanager
def preserved_model_state(model: nn.Module) -> Iterator[None]:
    """Run in eval mode, then restore every module's train/eval flag and every parameter's requires_grad."""
    modes = [(module, module.training) for module in model.modules()]
    grads = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training
        for parameter, requires_grad in grads:
            parameter.requires_grad_(requires_grad)


def resolve_targets(targets: Targets, logits: torch.Tensor) -> torch.Tensor:
    """Class indices [N,T] from None (top-1), an int, one int per image or equal-length lists per image."""
    n, num_classes = logits.shape
    if targets is None:
        resolved = logits.argmax(1, keepdim=True)
    elif isinstance(targets, torch.Tensor):
        resolved = targets.to(logits.device, torch.long)
        resolved = resolved.expand(n).reshape(n, 1) if resolved.dim() <= 1 and resolved.numel() in (1, n) else resolved
    elif isinstance(targets, int):
        resolved = torch.full((n, 1), targets, dtype=torch.long, device=logits.device)
    else:
        targets = list(targets)
        if len(targets) != n:
            raise ValueError(f"got {len(targets)} targets for {n} images; give one entry per image")
        rows = [list(t) if isinstance(t, (list, tuple)) else [t] for t in targets]
        if len({len(r) for r in rows}) != 1:
            raise ValueError("every image needs the same number of target classes")
        resolved = torch.tensor(rows, dtype=torch.long, device=logits.device)
    if resolved.dim() != 2 or resolved.shape[0] != n:
        raise ValueError(f"targets must give classes for each of the {n} images")
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
            self._gradients = class_gradients(self.split, self.head, self.targets)
        return self._gradients


class BaseCAM:
    """A CAM method over a model split at `target_layer`; call it on a batch to get maps [N,T,H,W] in [0,1].

    Subclasses implement `channel_weights` (weights [N,T,K] or per-pixel [N,T,K,h,w]); the base
    class does the split, the forward pass, target resolution and the map. Engine options apply to
    the masked tail passes (FD-CAM, Ablation-CAM): `backend`, `provider`, `precision` ("fp32",
    "tf32", "fp16"; "bf16" on torch), `batch_size`/`memory_budget`, and `cuda_graph` (torch on CUDA).
    """

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
    ):
        if backend not in ("torch", "onnxruntime"):
            raise ValueError(f"backend must be 'torch' or 'onnxruntime', not {backend!r}")
        if backend == "torch":
            check_torch_precision(precision)
        elif cuda_graph:
            raise ValueError("cuda_graph applies to the torch backend; ONNX Runtime sessions run without it")
        self.model = model
        self.target_layer = resolve_layer_name(model, target_layer if target_layer is not None else _default_layer(model))
        self.batch_size = batch_size
        self.memory_budget = memory_budget
        self.progress = progress
        self.backend, self.provider, self.precision = backend, provider, precision
        self.cuda_graph = cuda_graph
        self._splits: dict[tuple, SplitModel] = {}
        self._tails: dict[tuple, Tail] = {}

    def __call__(self, x: torch.Tensor, targets: Targets = None) -> torch.Tensor:
        return self.explain(x, targets)

    def explain(self, x: torch.Tensor, targets: Targets = None) -> torch.Tensor:
        """Saliency maps [N,T,H,W], float32 in [0,1], on x's device, for the requested target classes."""
        _check_input(x)
        with preserved_model_state(self.model):
            split = self.split_for(x)
            head = forward_head(split, x)
            explanation = Explanation(x, split, head, resolve_targets(targets, head.logits))
            weights = self.channel_weights(explanation)
            maps = self.saliency(explanation, weights)
        return maps.float()

    def saliency(self, explanation: Explanation, weights: torch.Tensor) -> torch.Tensor:
        """ReLU of the weighted sum of activations, upsampled to the input and min-max normalised."""
        cams = weighted_sum(explanation.activations, weights.to(explanation.activations.dtype))
        return to_input_size(cams, tuple(explanation.x.shape[-2:]))

    def channel_weights(self, explanation: Explanation) -> torch.Tensor:
        raise NotImplementedError

    def split_for(self, x: torch.Tensor) -> SplitModel:
        """The model split at the target layer for inputs shaped like x (built once, then cached)."""
        key = (tuple(x.shape[1:]), x.device, x.dtype)
        if key not in self._splits:
            self._splits[key] = split_model(self.model, self.target_layer, x[:1].detach())
        return self._splits[key]

    def tail_for(self, explanation: Explanation) -> Tail:
        """The engine that runs masked tail passes: torch, or an ONNX Runtime session (fdcam.runtime)."""
        key = id(explanation.split)
        if key not in self._tails:
            if self.backend == "onnxruntime":
                from ..runtime import ort_tail

                self._tails[key] = ort_tail(
                    self.model,
                    explanation.split,
                    explanation.activations[:1],
                    [extra[:1] for extra in explanation.head.extras],
                    provider=self.provider,
                    precision=self.precision,
                    memory_budget=self.memory_budget,
                    batch_size=self.batch_size,
                )
            else:
                self._tails[key] = TorchTail(
                    explanation.split.tail,
                    batch_size=self.batch_size,
                    memory_budget=self.memory_budget,
                    precision=self.precision,
                    cuda_graph=self.cuda_graph,
                )
        return self._tails[key]


def _default_layer(model: nn.Module) -> str:
    from ..models import spec_of

    spec = spec_of(model)
    if spec is None:
        raise ValueError("target_layer is required for models not made by fdcam.models.load")
    return spec.default_layer


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"input must be a float tensor [N,C,H,W], got {shape}")
    if not torch.isfinite(x).all():
        raise ValueError("input contains NaN or infinite values")
