"""Tail engines other than torch, by backend name: a backend module is imported on first use and read.

fdcam's core does not import them: `BaseCAM.tail_for` asks `tail_backend(name)`, which imports the
module that provides the name (fdcam.runtime for "onnxruntime") on first use and registers what its
`TAIL_BACKEND` holds (the fields of `TailBackend`). The provider imports nothing from here, so the
registry's import by name closes no import cycle; another package may still call `register_backend`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from .options import BACKENDS

__all__ = ["BACKENDS", "TailBackend", "register_backend", "tail_backend"]

#: The modules that provide the backends (fdcam.options.BACKENDS) other than "torch", built into BaseCAM.
_PROVIDED_BY = {"onnxruntime": "fdcam.runtime"}


@dataclass(frozen=True)
class TailBackend:
    """How to build a tail engine for a split, a cheap fingerprint of the tail's weights (when to rebuild) and how
    to release what was built for an explainer when it closes."""

    # (model, split, features, extras, *, provider, precision, memory_budget, batch_size, owner) -> Tail
    build: Callable[..., Any]
    fingerprint: Callable[[Any], Hashable]  # (tail module) -> key that changes when its weights change
    release: Callable[[Any], None] = lambda owner: None  # (owner) -> drop what was built for `owner` (its close())


_REGISTERED: dict[str, TailBackend] = {}


def register_backend(name: str, backend: TailBackend) -> None:
    """Make `name` a backend for methods with masked tail passes."""
    _REGISTERED[name] = backend


def tail_backend(name: str) -> TailBackend:
    """The registered backend `name`, importing the module that provides it on first use."""
    if name not in _REGISTERED and name in _PROVIDED_BY:
        register_backend(name, TailBackend(**importlib.import_module(_PROVIDED_BY[name]).TAIL_BACKEND))
    if name not in _REGISTERED:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {name!r}")
    return _REGISTERED[name]
