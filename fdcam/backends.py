"""Tail engines other than torch, by backend name: a backend registers itself when its module is imported.

fdcam's core does not import them: `BaseCAM.tail_for` asks `tail_backend(name)`, which imports the
module that provides the name (fdcam.runtime for "onnxruntime") on first use, and that module
calls `register_backend`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Hashable

__all__ = ["BACKENDS", "TailBackend", "register_backend", "tail_backend"]

#: Backend names and the modules that register them; "torch" is built into BaseCAM.
_PROVIDED_BY = {"onnxruntime": "fdcam.runtime"}
BACKENDS = ("torch", *_PROVIDED_BY)


@dataclass(frozen=True)
class TailBackend:
    """How to build a tail engine for a split, and a cheap fingerprint of the tail's weights that says when to rebuild."""

    build: Callable[..., Any]  # (model, split, features, extras, *, provider, precision, memory_budget, batch_size) -> Tail
    fingerprint: Callable[[Any], Hashable]  # (tail module) -> key that changes when its weights change


_REGISTERED: dict[str, TailBackend] = {}


def register_backend(name: str, backend: TailBackend) -> None:
    """Make `name` a backend for methods with masked tail passes."""
    _REGISTERED[name] = backend


def tail_backend(name: str) -> TailBackend:
    """The registered backend `name`, importing the module that provides it on first use."""
    if name not in _REGISTERED and name in _PROVIDED_BY:
        importlib.import_module(_PROVIDED_BY[name])
    if name not in _REGISTERED:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {name!r}")
    return _REGISTERED[name]
