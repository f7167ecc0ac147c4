"""ONNX Runtime tails: the `Tail` protocol over a session of the exported masked tail, on CPU, CUDA or TensorRT."""

from .cache import (
    RuntimeStats,
    clear_sessions,
    default_cache_dir,
    open_sessions,
    ort_tail,
    release_sessions,
    stats,
    tail_fingerprint,
)
from .providers import PRECISIONS, PROVIDERS, ProviderError, available_providers, resolve_provider
from .session import OrtTail

__all__ = [
    "PRECISIONS",
    "PROVIDERS",
    "TAIL_BACKEND",
    "OrtTail",
    "ProviderError",
    "RuntimeStats",
    "available_providers",
    "clear_sessions",
    "default_cache_dir",
    "open_sessions",
    "ort_tail",
    "release_sessions",
    "resolve_provider",
    "stats",
]

#: What fdcam.backends registers for backend="onnxruntime" (the fields of fdcam.backends.TailBackend). The
#: registry imports this package by name; this package does not import the registry (no import cycle).
TAIL_BACKEND = {"build": ort_tail, "fingerprint": tail_fingerprint, "release": release_sessions}
