"""What makes explainers safe to share between threads: a process-wide tracing lock and shared model state.

torch.fx tracing and ONNX export patch process-wide things while they run (`nn.Module.__call__`,
`torch` functions, fx's current patcher), so a module run by another thread during a trace would be
recorded into it, and two traces at once break each other. `tracing()` is the exclusive side of a
readers-writer lock whose shared side, `running()`, every explanation holds while it runs modules:
a trace waits for running explanations and new ones wait for the trace. A thread that holds the
shared side may ask for the exclusive side (an explainer building its split or ONNX tail on first
use): it steps out of its shared holds while it waits and takes them back afterwards.

`model_in_eval(model)` puts a model in eval mode for as long as any thread explains with it and
restores every module's train/eval flag and every parameter's requires_grad when the last one leaves,
so concurrent explanations never see (or leave) a model in train mode.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from torch import nn

__all__ = ["tracing", "running", "model_in_eval"]


class _TracingLock:
    """A readers-writer lock, writer-preferring, reentrant on both sides, with upgrade by release."""

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._readers = 0  # shared holds of all threads, not counting ones stepped out for a write
        self._writer: int | None = None
        self._writer_depth = 0
        self._waiting_writers = 0
        self._local = threading.local()

    def _held(self) -> int:
        return getattr(self._local, "shared", 0)

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._condition:
            if self._writer != me:
                if self._held() == 0:  # a thread already inside never waits (no deadlock with a waiting writer)
                    while self._writer is not None or self._waiting_writers:
                        self._condition.wait()
                self._readers += 1
            self._local.shared = self._held() + 1
            counted = self._writer != me
        try:
            yield
        finally:
            with self._condition:
                self._local.shared -= 1
                if counted:
                    self._readers -= 1
                    self._condition.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._condition:
            if self._writer == me:
                self._writer_depth += 1
                stepped_out = 0
            else:
                stepped_out = self._held()
                self._readers -= stepped_out
                self._condition.notify_all()
                self._waiting_writers += 1
                try:
                    while self._writer is not None or self._readers:
                        self._condition.wait()
                finally:
                    self._waiting_writers -= 1
                self._writer, self._writer_depth = me, 1
        try:
            yield
        finally:
            with self._condition:
                self._writer_depth -= 1
                if self._writer_depth == 0:
                    self._writer = None
                    self._readers += stepped_out
                    self._condition.notify_all()


_LOCK = _TracingLock()


def tracing() -> contextlib.AbstractContextManager[None]:
    """Exclusive: no explanation runs modules while this thread traces or exports a model."""
    return _LOCK.exclusive()


def running() -> contextlib.AbstractContextManager[None]:
    """Shared: this thread runs modules; no trace or export is in progress meanwhile."""
    return _LOCK.shared()


_state_lock = threading.Lock()
_in_eval: dict[int, list] = {}  # id(model) -> [users, modes, requires_grad flags]


@contextlib.contextmanager
def model_in_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode while any thread explains with `model`; its flags and requires_grad restored after the last."""
    key = id(model)
    with _state_lock:
        entry = _in_eval.get(key)
        if entry is None:
            modes = [(module, module.training) for module in model.modules()]
            grads = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
            entry = _in_eval[key] = [0, modes, grads]
            model.eval()
        entry[0] += 1
    try:
        yield
    finally:
        with _state_lock:
            entry[0] -= 1
            if entry[0] == 0:
                del _in_eval[key]
                _, modes, grads = entry
                for module, training in modes:
                    module.training = training
                for parameter, requires_grad in grads:
                    parameter.requires_grad_(requires_grad)
