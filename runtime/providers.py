"""ONNX Runtime execution providers for tail sessions: which one to use, its options, its fallbacks.

Precision is explicit. "fp32": full fp32 (the CUDA EP's default TF32 math is switched off with
use_tf32=0). "tf32": CUDA EP with TF32 tensor-core math for matmuls and convolutions (≈10-bit
mantissa inputs; the CPU ignores it). "fp16": the fp16 graph variant on CPU/CUDA, and TensorRT's
fp16 mode on the fp32 graph. TensorRT chooses its own tactics and may use TF32 under "fp32".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import torch

from fdcam.errors import ProviderError, first_line
from fdcam.options import ORT_PRECISIONS, ORT_PROVIDERS
from fdcam.options import check_precision as _check_precision

__all__ = [
    "PRECISIONS",
    "PROVIDERS",
    "ProviderError",
    "check_precision",
    "create_session",
    "resolve_provider",
]

log = logging.getLogger("fdcam.runtime")

PRECISIONS = ORT_PRECISIONS
PROVIDERS = ORT_PROVIDERS

_ORT_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def check_precision(precision: str) -> str:
    """The precision if it is one of PRECISIONS, else ValueError."""
    return _check_precision("onnxruntime", precision)


def available_providers() -> list[str]:
    """Short names (cpu, cuda, tensorrt) of the providers this onnxruntime build offers."""
    offered = set(ort.get_available_providers())
    return [short for short, name in _ORT_NAMES.items() if name in offered]


def resolve_provider(provider: str | None, device: torch.device) -> str:
    """cpu, cuda or tensorrt for a request.

    None/"auto" is cuda when the features live on a GPU and ORT has CUDA, else cpu.

    An explicit "cuda" that this onnxruntime cannot serve is a ProviderError; "tensorrt" is
    resolved later, with fallbacks (see create_session).
    """
    name = "auto" if provider is None else str(provider).strip().lower()
    if name not in PROVIDERS:
        raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, not {provider!r}")
    if name == "auto":
        return "cuda" if device.type == "cuda" and "cuda" in available_providers() else "cpu"
    if name == "cuda" and "cuda" not in available_providers():
        raise ProviderError(_missing_cuda_message())
    return name


def _missing_cuda_message() -> str:
    offered = ", ".join(available_providers()) or "none"
    return (
        f"provider 'cuda' is not available: this onnxruntime offers {offered}; "
        "install onnxruntime-gpu on a machine with an NVIDIA GPU, or use provider 'cpu'"
    )


def _stream_options(device: torch.device) -> dict[str, str]:
    """Run ORT's kernels on torch's current CUDA stream, so no extra synchronisation is needed."""
    if device.type != "cuda":
        return {}
    stream = torch.cuda.current_stream(device).cuda_stream
    return {"has_user_compute_stream": "1", "user_compute_stream": str(stream)}


def _device_index(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return device.index if device.index is not None else torch.cuda.current_device()


def cuda_options(device: torch.device, precision: str) -> dict[str, str]:
    """CUDA EP options: the device, TF32 on only for precision "tf32", torch's stream."""
    return {
        "device_id": str(_device_index(device)),
        "use_tf32": "1" if precision == "tf32" else "0",
        **_stream_options(device),
    }


# The most images one TensorRT engine takes per run (its optimisation profile's upper bound).
TENSORRT_MAX_IMAGES = 32


def tensorrt_options(
    device: torch.device, precision: str, engine_dir: Path, mask_batch: int, input_shapes: dict[str, tuple[int, ...]]
) -> dict[str, str]:
    """TensorRT EP options: fp16 mode, an engine and timing cache, one profile for 1…TENSORRT_MAX_IMAGES images
    of 1…mask_batch masks. `input_shapes` are one image's graph inputs without the batch axis (masks: (K,))."""
    engine_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def profile(images: int, masks: int) -> str:
        dims = {
            name: (images, masks, *shape) if name == "masks" else (images, *shape)
            for name, shape in input_shapes.items()
        }
        return ",".join(f"{name}:{'x'.join(str(d) for d in shape)}" for name, shape in dims.items())

    return {
        "device_id": str(_device_index(device)),
        "trt_fp16_enable": "True" if precision == "fp16" else "False",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(engine_dir),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(engine_dir),
        "trt_profile_min_shapes": profile(1, 1),
        "trt_profile_opt_shapes": profile(1, mask_batch),
        "trt_profile_max_shapes": profile(TENSORRT_MAX_IMAGES, mask_batch),
        **_stream_options(device),
    }


def session_options() -> ort.SessionOptions:
    """Full graph optimisation; CPU threads follow torch.get_num_threads() so both backends share one budget."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only: ORT's own fallback chatter is replaced by one warning of ours
    return options


def create_session(
    graph: Callable[[bool], Path],
    provider: str,
    precision: str,
    device: torch.device,
    *,
    engine_dir: Path,
    mask_batch: int,
    input_shapes: dict[str, tuple[int, ...]],
) -> tuple[ort.InferenceSession, str]:
    """A session and the provider it really runs on; `graph(fp16)` gives the path of the fp32 or fp16 graph.

    "tensorrt" falls back to CUDA, then CPU, with one logged warning; "cuda" that does not load is a
    ProviderError.
    """
    if provider == "tensorrt":
        session, reason = _try_tensorrt(graph, precision, device, engine_dir, mask_batch, input_shapes)
        if session is not None:
            return session, "tensorrt"
        fallbacks = (["cuda"] if "cuda" in available_providers() else []) + ["cpu"]
        for fallback in fallbacks:
            try:
                session, used = create_session(
                    graph,
                    fallback,
                    precision,
                    device,
                    engine_dir=engine_dir,
                    mask_batch=mask_batch,
                    input_shapes=input_shapes,
                )
            except ProviderError:
                continue
            log.warning("TensorRT cannot be used (%s); falling back to %s", reason, used.upper())
            return session, used
    path = graph(precision == "fp16")
    if provider == "cuda":
        hint = "check the CUDA and cuDNN libraries onnxruntime-gpu needs, or use provider 'cpu'"
        try:
            session = ort.InferenceSession(
                str(path),
                session_options(),
                providers=[(_ORT_NAMES["cuda"], cuda_options(device, precision)), _ORT_NAMES["cpu"]],
            )
        except Exception as error:  # ORT's pybind errors are not RuntimeErrors: make it one line the CLI prints
            raise ProviderError(
                f"the CUDA execution provider failed to start ({first_line(error, 200)}); {hint}"
            ) from error
        if session.get_providers()[0] != _ORT_NAMES["cuda"]:
            raise ProviderError(f"the CUDA execution provider did not load; {hint}")
        return session, "cuda"
    return ort.InferenceSession(str(path), session_options(), providers=[_ORT_NAMES["cpu"]]), "cpu"


def _try_tensorrt(
    graph, precision, device, engine_dir, mask_batch, input_shapes
) -> tuple[ort.InferenceSession | None, str]:
    if "tensorrt" not in available_providers():
        return None, "this onnxruntime has no TensorrtExecutionProvider"
    providers = [
        (_ORT_NAMES["tensorrt"], tensorrt_options(device, precision, engine_dir, mask_batch, input_shapes)),
        (_ORT_NAMES["cuda"], cuda_options(device, "tf32" if precision == "tf32" else "fp32")),
        _ORT_NAMES["cpu"],
    ]
    try:
        # TensorRT does its own fp16 conversion, so it always gets the fp32 graph.
        session = ort.InferenceSession(str(graph(False)), session_options(), providers=providers)
    except Exception as error:  # TensorRT raises from deep inside (missing libs, unsupported op, build failure)
        return None, first_line(error, 200)
    if session.get_providers()[0] != _ORT_NAMES["tensorrt"]:
        return None, "the TensorRT library did not load"
    return session, ""
