"""CUDA graphs of the torch switch passes: a function of fixed-shape tensors captured once, then replayed."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["GraphedCall"]


class GraphedCall:
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
