"""`OrtTail`: the `Tail` protocol over an ONNX Runtime session of an exported masked tail."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import onnxruntime as ort
import torch

from fdcam.tail import chunk_size, expand_masks

__all__ = ["OrtTail"]


class OrtTail:
    """The `Tail` protocol over a session: N images' masked passes in one `session.run` (chunked only under
    a user memory budget or batch size).

    Torch tensors in, float32 logits out on the features' device. On a CUDA session with
    CUDA tensors, inputs and the preallocated output are bound by pointer (IOBinding): nothing goes
    through the host. `runs` counts session runs; `bound_runs` the ones that went through IOBinding.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        provider: str,
        *,
        batch_size: int | None = None,
        memory_budget: int | None = None,
        stream: int | None = None,
    ):
        self.session = session
        self.provider = provider
        self.batch_size = batch_size
        self.memory_budget = memory_budget
        self.stream = stream  # the CUDA stream the session's kernels run on (None: ORT's own or CPU)
        self.input_names = [value.name for value in session.get_inputs()]
        self.num_classes = _num_classes(session)
        self.runs = 0
        self.bound_runs = 0

    @property
    def on_gpu(self) -> bool:
        return self.provider in ("cuda", "tensorrt")

    @torch.no_grad()
    def run(
        self,
        features: torch.Tensor,
        masks: torch.Tensor,
        extras: Sequence[torch.Tensor] = (),
        classes: torch.Tensor | None = None,
        *,
        sparsity: int | None = None,
    ) -> torch.Tensor:
        """Float32 logits [N,M,C] of the tail on features [N,K,h,w] masked by masks [N,M,K] (or [M,K] shared),
        or [N,M,T] of `classes` [N,T]: all N images in one session run unless a budget splits them.

        `sparsity` is accepted for the protocol; the graph computes every mask densely.
        """
        if len(extras) != len(self.input_names) - 2:
            raise ValueError(f"this tail graph takes {len(self.input_names) - 2} extra tensors, got {len(extras)}")
        masks = expand_masks(features, masks)
        n, m, _ = masks.shape
        if self.batch_size is None and self.memory_budget is None:
            outputs = [self._run_once(features, masks, extras)]
        else:
            rows = chunk_size(features, self.memory_budget, self.batch_size, n * m)
            outputs = []
            if rows >= m:  # whole images per run
                step = rows // m
                for start in range(0, n, step):
                    chosen = slice(start, start + step)
                    outputs.append(self._run_once(features[chosen], masks[chosen], [e[chosen] for e in extras]))
            else:  # slices of one image's masks per run
                for i in range(n):
                    pieces = [
                        self._run_once(features[i : i + 1], masks[i : i + 1, lo : lo + rows], [e[i : i + 1] for e in extras])
                        for lo in range(0, m, rows)
                    ]
                    outputs.append(torch.cat(pieces, 1))
        logits = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        if classes is not None:
            logits = logits.gather(2, classes.to(logits.device)[:, None, :].expand(-1, m, -1))
        return logits

    def _run_once(self, features: torch.Tensor, masks: torch.Tensor, extras: Sequence[torch.Tensor]) -> torch.Tensor:
        self.runs += 1
        try:
            if self.on_gpu and features.is_cuda:
                self.bound_runs += 1
                return self._run_bound(features, masks, extras)
            return self._run_host(features, masks, extras)
        except Exception as error:
            if not type(error).__module__.startswith("onnxruntime"):
                raise
            # ORT's errors are not RuntimeErrors; one line, with the usual remedy (out of memory).
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            raise RuntimeError(
                f"onnxruntime failed on {masks.shape[0]}×{masks.shape[1]} masks ({first_line}); "
                "if memory ran out, set memory_budget or batch_size to run them in chunks"
            ) from error

    def _run_host(self, features: torch.Tensor, masks: torch.Tensor, extras: Sequence[torch.Tensor]) -> torch.Tensor:
        """Numpy feeds: zero-copy views of contiguous CPU fp32 tensors (CUDA tensors are copied, for a CPU session)."""
        tensors = [_as_input(t).cpu() for t in (features, masks, *extras)]
        feed = {name: tensor.numpy() for name, tensor in zip(self.input_names, tensors)}
        (logits,) = self.session.run(["logits"], feed)
        return torch.from_numpy(logits).to(features.device)

    def _run_bound(self, features: torch.Tensor, masks: torch.Tensor, extras: Sequence[torch.Tensor]) -> torch.Tensor:
        """IOBinding on device pointers; the output is a torch tensor ORT writes into."""
        device = features.device
        index = device.index if device.index is not None else torch.cuda.current_device()
        tensors = [_as_input(t.to(device)) for t in (features, masks, *extras)]
        logits = torch.empty((*masks.shape[:2], self.num_classes), device=device, dtype=torch.float32)
        binding = self.session.io_binding()
        for name, tensor in zip(self.input_names, tensors):
            binding.bind_input(name, "cuda", index, np.float32, tuple(tensor.shape), tensor.data_ptr())
        binding.bind_output("logits", "cuda", index, np.float32, tuple(logits.shape), logits.data_ptr())
        with _on_session_stream(self.stream, device):
            self.session.run_with_iobinding(binding)
        return logits


def _num_classes(session: ort.InferenceSession) -> int:
    """The static class axis of `logits`, else the num_classes our exporter writes in the metadata."""
    size = session.get_outputs()[0].shape[-1]
    if isinstance(size, int):
        return size
    return int(session.get_modelmeta().custom_metadata_map["num_classes"])


def _as_input(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.float32).contiguous()


@contextlib.contextmanager
def _on_session_stream(stream: int | None, device: torch.device) -> Iterator[None]:
    """Order the session's stream after torch's current one and back, when they differ.

    The session was built on the then-current torch stream; if the caller has switched streams
    since, ORT's kernels must wait for the inputs written there and torch must wait for the logits.
    (ORT also synchronises its stream at the end of each run, so the logits are ready on return.)
    """
    current = torch.cuda.current_stream(device)
    if stream is None:  # ORT's own stream, unknown to torch: finish the inputs first
        current.synchronize()
        yield
        return
    if stream == current.cuda_stream:
        yield
        return
    session_stream = torch.cuda.ExternalStream(stream, device=device)
    session_stream.wait_stream(current)
    yield
    current.wait_stream(session_stream)
