"""Scorers for forward-bound evaluation work: whole-model logits of many perturbed inputs.

The insertion/deletion curves and Score-CAM / Group-CAM cost hundreds of full forwards per image.
`torch_scorer` is a frozen channels-last copy of the model; `OrtScorer` runs the whole model through
ONNX Runtime on the CPU, where it fuses batch norm and activations into the convolutions (measured
3-5x faster than torch on EfficientNet-Lite0 on 2 CPU cores). `make_scorer` picks one and checks it
against torch before it is used.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .errors import first_line

__all__ = ["SCORERS", "OrtScorer", "Scorer", "make_scorer", "scorer_error", "torch_scorer"]

Scorer = Callable[[torch.Tensor], torch.Tensor]
SCORERS = ("auto", "torch", "onnxruntime")
TOLERANCE = 1e-4  # largest softmax difference from torch accepted for an ONNX Runtime scorer


def torch_scorer(model: nn.Module) -> nn.Module:
    """A frozen channels-last eval copy of the model (1.3-2x faster than contiguous on CPU, same results)."""
    scorer = copy.deepcopy(model).eval()
    for parameter in scorer.parameters():
        parameter.requires_grad_(False)
    return scorer.to(memory_format=torch.channels_last)


class OrtScorer:
    """The model's logits through an ONNX Runtime CPU session of the whole model, exported once per input shape.

    Called like the model on float32 batches [B,C,H,W]; returns float32 logits on the input's device.
    """

    def __init__(self, model: nn.Module, threads: int | None = None):
        import onnxruntime  # noqa: F401  (fail here, not at the first batch, when it is missing)

        self.model = model
        self.threads = threads or torch.get_num_threads()
        self._sessions: dict[tuple[int, ...], object] = {}

    def session_for(self, x: torch.Tensor):
        """The session for inputs shaped like x (any batch size)."""
        key = tuple(x.shape[1:])
        if key not in self._sessions:
            self._sessions[key] = _cpu_session(_onnx_bytes(self.model, x[:1]), self.threads)
        return self._sessions[key]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        session = self.session_for(x)
        feed = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = session.run(None, {"input": feed})
        return torch.from_numpy(logits).to(x.device)


def _onnx_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    """The model as an ONNX graph with a dynamic batch (TorchScript exporter, in memory)."""
    exported = copy.deepcopy(model).eval().float().cpu()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            exported,
            (example.detach().float().cpu(),),
            buffer,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
            do_constant_folding=True,
        )
    return buffer.getvalue()


def _cpu_session(graph: bytes, threads: int):
    """A CPU session with all graph optimisations.

    Its threads sleep between runs so torch work in between keeps the cores.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def scorer_error(scorer: Scorer, reference: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute difference of the softmax probabilities of `scorer` and `reference` on x."""
    return float((scorer(x).softmax(dim=1) - reference(x).softmax(dim=1)).abs().max())


def make_scorer(
    model: nn.Module, kind: str, example: torch.Tensor, reference: nn.Module | None = None
) -> tuple[Scorer, str, str | None]:
    """A scorer of `kind` ('auto', 'torch', 'onnxruntime'), its resolved kind, and why 'auto' fell back to torch.

    'onnxruntime' (and 'auto' on CPU) exports the model and checks it against torch on `example`
    (normalised inputs); a difference above 1e-4 in any probability is an error for 'onnxruntime'
    and a fall-back to torch for 'auto'. 'auto' uses torch off the CPU. `reference` is the torch
    scorer to use and check against (default: torch_scorer(model)).
    """
    if kind not in SCORERS:
        raise ValueError(f"scorer must be one of {', '.join(SCORERS)}, not {kind!r}")
    reference = reference if reference is not None else torch_scorer(model)
    if kind == "torch" or (kind == "auto" and example.device.type != "cpu"):
        return reference, "torch", None
    try:
        scorer = OrtScorer(model)
        error = scorer_error(scorer, reference, example)
    except Exception as failure:  # export or session failures: 'auto' keeps the torch path
        if kind == "onnxruntime":
            raise RuntimeError(f"the ONNX Runtime scorer failed: {first_line(failure, 200)}") from failure
        return reference, "torch", f"ONNX Runtime scorer unavailable ({type(failure).__name__})"
    if error > TOLERANCE:
        message = f"ONNX Runtime scorer differs from torch by {error:.2e} in a probability (> {TOLERANCE:g})"
        if kind == "onnxruntime":
            raise RuntimeError(message)
        return reference, "torch", message
    return scorer, "onnxruntime", None
