"""ONNX Runtime tails: the `Tail` protocol over a session of the exported masked tail, on CPU, CUDA or TensorRT."""

from fdcam.backends import TailBackend, register_backend

from .cache import RuntimeStats, clear_sessions, default_cache_dir, ort_tail, stats, tail_fingerprint
from .providers import PRECISIONS, PROVIDERS, ProviderError, available_providers, resolve_provider
from .session import OrtTail

__all__ = [
    "PRECISIONS",
    "PROVIDERS",
    "OrtTail",
    "ProviderError",
    "RuntimeStats",
    "available_providers",
    "clear_sessions",
    "default_cache_dir",
    "ort_tail",
    "resolve_provider",
    "stats",
]

register_backend("onnxruntime", TailBackend(build=ort_tail, fingerprint=tail_fingerprint))
