"""The tail of a split model run on batches of channel masks: the `Tail` protocol and its torch backend.

A switch pass is one forward of the tail on the target activation with some channels zeroed.
`Tail.run(features, masks, extras)` runs B of them for one image: features [1,K,h,w], masks [B,K]
of 0/1 (or any weights), extras the other tensors that cross the split (batch 1); it returns
logits [B, classes]. `Tail.run_images` does the same for N images at once (masks [M,K] shared, or
[N,M,K] per image) and returns [N, M, classes]. The ONNX Runtime backend (`fdcam.runtime`)
implements the same protocol over an exported `MaskedTail`.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from typing import Callable, Iterator, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from .options import TORCH_PRECISIONS

__all__ = ["Tail", "MaskedTail", "TorchTail", "TORCH_PRECISIONS", "chunk_size", "tail_precision"]

DEFAULT_MEMORY_BUDGET = 2 * 1024**3
_MAX_GRAPHS = 4


@runtime_checkable
class Tail(Protocol):
    """Runs masked copies of images' features through the tail of a split model."""

    def run(self, features: torch.Tensor, masks: torch.Tensor, extras: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Logits [B, classes] of the tail on `features * masks[:, :, None, None]` (features batch 1)."""
        ...

    def run_images(self, features: torch.Tensor, masks: torch.Tensor, extras: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Logits [N, M, classes] for features [N,K,h,w] and masks [M,K] (shared) or [N,M,K]."""
        ...


class MaskedTail(nn.Module):
    """`tail(features ⊙ masks[:, :, None, None], *extras)` with batch-1 features and extras broadcast to B.

    This is the module exported to ONNX, so the masks are applied inside the graph and only B×K
    floats travel per explanation.
    """

    def __init__(self, tail: nn.Module):
        super().__init__()
        self.tail = tail
        self.training = False  # this wrapper's own flag only; see fdcam.factorise.FactorisedMaskedTail

    def forward(self, features: torch.Tensor, masks: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
        batch = masks.shape[0]
        masked = features * masks[:, :, None, None]
        expanded = [extra.expand(batch, *extra.shape[1:]) for extra in extras]
        return self.tail(masked, *expanded)


def chunk_size(features: torch.Tensor, memory_budget: int | None, batch_size: int | None, total: int) -> int:
    """How many masks to run per tail call: `batch_size` if given, else what fits `memory_budget` bytes.

    The budget is split over the masked copies of the features, with a factor of 4 for the tail's
    own intermediate activations.
    """
    if batch_size is not None:
        return max(1, min(int(batch_size), total))
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    per_mask = 4 * features[0].numel() * features.element_size()
    return max(1, min(total, budget // max(per_mask, 1)))


def check_torch_precision(precision: str) -> str:
    """The precision if the torch backend knows it, else ValueError."""
    if precision not in TORCH_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(TORCH_PRECISIONS)} for the torch backend, not {precision!r}")
    return precision


class _Tf32Flags:
    """torch's process-wide TF32 flags, set for as long as any thread computes with a setting.

    Threads asking for the same setting share it; a thread asking for the other one waits until the
    others are done (or, if it is the only holder, switches and switches back). The flags the
    process had are restored when the last holder leaves, so concurrent explanations neither
    compute with the wrong math nor leave the flags changed.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._holders = 0
        self._allow: bool | None = None
        self._saved: tuple[bool, bool] | None = None
        self._local = threading.local()

    @staticmethod
    def _set(allow: bool) -> None:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow

    @contextlib.contextmanager
    def held(self, allow: bool) -> Iterator[None]:
        stack = self._local.__dict__.setdefault("stack", [])
        with self._condition:
            while self._holders > len(stack) and self._allow != allow:
                self._condition.wait()
            if self._holders == 0:
                self._saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            stack.append(self._allow)
            if self._allow != allow:
                self._set(allow)
                self._allow = allow
            self._holders += 1
        try:
            yield
        finally:
            with self._condition:
                previous = stack.pop()
                self._holders -= 1
                if self._holders == 0:
                    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._saved
                    self._allow = self._saved = None
                elif previous is not None and previous != self._allow:
                    # This thread switched the setting inside its own outer hold: switch back once
                    # the threads that joined under the inner setting are gone.
                    while self._holders > len(stack):
                        self._condition.wait()
                    self._set(previous)
                    self._allow = previous
                self._condition.notify_all()


_TF32 = _Tf32Flags()


@contextlib.contextmanager
def tail_precision(precision: str, device: torch.device) -> Iterator[None]:
    """Math of the switch passes: "fp32" exact (TF32 off), "tf32" TF32 matmuls and convolutions on CUDA,
    "bf16"/"fp16" autocast. torch's global TF32 flags are set under a process-wide lock shared by the
    threads that want the same setting, and restored when the last of them leaves."""
    check_torch_precision(precision)
    with _TF32.held(precision == "tf32"):
        if precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            # No cast cache: a CUDA graph captured under autocast must not keep casts of the capture's inputs.
            with torch.autocast(device.type, dtype=dtype, cache_enabled=False):
                yield
        else:
            yield


class _GraphedCall:
    """A function of fixed-shape CUDA tensors captured once as a CUDA graph, then replayed on copies of new inputs."""

    def __init__(self, function: Callable[..., torch.Tensor], example: Sequence[torch.Tensor]):
        self.inputs = [tensor.clone() for tensor in example]
        side = torch.cuda.Stream(example[0].device)
        side.wait_stream(torch.cuda.current_stream(example[0].device))
        with torch.cuda.stream(side):  # warm-up off the capture: cuBLAS handles, lazy inits
            for _ in range(2):
                function(*self.inputs)
        torch.cuda.current_stream(example[0].device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = function(*self.inputs)

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        for static, tensor in zip(self.inputs, tensors):
            static.copy_(tensor)
        self.graph.replay()
        return self.output.clone()


class TorchTail:
    """The torch backend of `Tail`: batched forwards of the fx tail, chunked under a memory budget.

    With `factorise` (the default), a tail that starts with channel-wise linear ops and a Linear
    (VGG16 at features.30, ResNet50 at layer4) runs factorised (`fdcam.factorise`): the per-channel
    contributions to the Linear are computed once per image and each chunk of masks is one product
    with them; other tails run as `MaskedTail`. The choice is made once per feature shape.
    `precision` sets the switch passes' math (see `tail_precision`). With `cuda_graph`, CUDA inputs
    run as a CUDA graph captured once per input shape (the last few shapes are kept).
    """

    def __init__(
        self,
        tail: nn.Module,
        batch_size: int | None = None,
        memory_budget: int | None = None,
        factorise: bool = True,
        precision: str = "fp32",
        cuda_graph: bool = False,
    ):
        self.masked_tail = MaskedTail(tail)
        self.batch_size = batch_size
        self.memory_budget = memory_budget
        self.factorise = factorise
        self.precision = check_torch_precision(precision)
        self.cuda_graph = cuda_graph
        self.calls = 0
        self.graph_replays = 0
        self._factorised: dict[tuple, nn.Module | None] = {}
        self._graphs: OrderedDict[tuple, _GraphedCall] = OrderedDict()

    def factorised_for(self, features: torch.Tensor, extras: Sequence[torch.Tensor] = ()) -> nn.Module | None:
        """The factorised tail for features shaped like `features`, or None (pattern absent or off)."""
        if not self.factorise:
            return None
        key = (
            tuple(features.shape[1:]),
            features.dtype,
            features.device,
            tuple((tuple(extra.shape[1:]), extra.dtype) for extra in extras),
        )
        if key not in self._factorised:
            from .factorise import factorised_masked_tail

            self._factorised[key] = factorised_masked_tail(self.masked_tail.tail, features[:1], tuple(e[:1] for e in extras))
        return self._factorised[key]

    def run(self, features: torch.Tensor, masks: torch.Tensor, extras: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Logits [B, classes] for the B masks of one image, in as few tail forwards as the budget allows."""
        return self.run_images(features[:1], masks, [extra[:1] for extra in extras])[0]

    @torch.no_grad()
    def run_images(self, features: torch.Tensor, masks: torch.Tensor, extras: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Logits [N, M, classes] of M masks on each of N images (masks [M,K] shared, or [N,M,K])."""
        n = features.shape[0]
        masks = masks.to(features.dtype)
        masks = masks.expand(n, *masks.shape) if masks.dim() == 2 else masks
        if masks.shape[0] != n or masks.shape[2] != features.shape[1]:
            raise ValueError(f"masks {tuple(masks.shape)} do not fit features {tuple(features.shape)}")
        extras = list(extras)
        factorised = self.factorised_for(features, extras)
        if self.cuda_graph and features.is_cuda:
            return self._graphed(factorised, features, masks, extras)
        with tail_precision(self.precision, features.device):
            return self._compute(factorised, features, masks, extras).float()

    def _graphed(self, factorised, features: torch.Tensor, masks: torch.Tensor, extras: list) -> torch.Tensor:
        tensors = [features, masks.contiguous(), *extras]
        key = (tuple((tuple(t.shape), t.dtype) for t in tensors), features.device, factorised is not None)
        graphed = self._graphs.get(key)
        if graphed is None:
            def function(features, masks, *extras):
                return self._compute(factorised, features, masks, list(extras)).float()

            with tail_precision(self.precision, features.device):
                graphed = _GraphedCall(function, tensors)
            self._graphs[key] = graphed
            while len(self._graphs) > _MAX_GRAPHS:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        self.graph_replays += 1
        return graphed(*tensors)

    def _rows_per_chunk(self, factorised, features: torch.Tensor, total: int) -> int:
        if factorised is not None and self.batch_size is None:
            budget = DEFAULT_MEMORY_BUDGET if self.memory_budget is None else int(self.memory_budget)
            per_row = 4 * factorised.out_features * features.element_size()
            return max(1, min(total, budget // per_row))
        return chunk_size(features, self.memory_budget, self.batch_size, total)

    def _compute(self, factorised, features: torch.Tensor, masks: torch.Tensor, extras: list) -> torch.Tensor:
        """Logits [N,M,classes]: the N·M masked passes in chunks of rows, each chunk one tail forward."""
        n, m, _ = masks.shape
        total = n * m
        step = self._rows_per_chunk(factorised, features, total)
        contributions = factorised.contributions(features) if factorised is not None else None  # [N,K,out], once
        outputs = []
        for start in range(0, total, step):
            end = min(total, start + step)
            segments = [(i, max(start, i * m) - i * m, min(end, (i + 1) * m) - i * m) for i in range(start // m, (end - 1) // m + 1)]
            self.calls += 1
            if factorised is not None:
                pre = [factorised.pre_activation(contributions[i], masks[i, lo:hi]) for i, lo, hi in segments]
                outputs.append(factorised.rest(_cat(pre), *_rows(extras, segments)))
            else:
                masked = torch.empty((end - start, *features.shape[1:]), dtype=features.dtype, device=features.device)
                offset = 0
                for i, lo, hi in segments:
                    torch.mul(features[i : i + 1], masks[i, lo:hi, :, None, None], out=masked[offset : offset + hi - lo])
                    offset += hi - lo
                outputs.append(self.masked_tail.tail(masked, *_rows(extras, segments)))
        logits = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        return logits.reshape(n, m, -1)


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors) if len(tensors) > 1 else tensors[0]


def _rows(extras: list[torch.Tensor], segments: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    """Each extra repeated for the rows of each image segment (a broadcast view when there is one segment)."""
    return [_cat([extra[i : i + 1].expand(hi - lo, *extra.shape[1:]) for i, lo, hi in segments]) for extra in extras]
