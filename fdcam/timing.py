"""Opt-in wall-clock times of the named stages of an explanation (head, backward, grouping, switch, weights, map).

The methods mark their stages with `stage(name)`; nothing is measured unless the caller records:

    with record_stages(device) as times:
        cam(x)
    times.seconds  # {"head": [...], "backward": [...], ...}

Times are exclusive: a stage inside another (the switch passes inside the channel weights) is
taken out of the outer one, so the stages of a call add up to at most its wall time. Recording
is per thread (a context variable); with no recorder a stage is a shared no-op.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from time import perf_counter
from typing import TypeVar

import torch

__all__ = ["STAGES", "StageTimes", "record_stages", "stage", "timed_stage"]

#: The stages of FD-CAM in call order; other methods mark the subset they have.
STAGES = ("head", "backward", "grouping", "switch", "weights", "map")

_RECORDER: contextvars.ContextVar[StageTimes | None] = contextvars.ContextVar("fdcam_stage_times", default=None)
_Function = TypeVar("_Function", bound=Callable)


class StageTimes:
    """Seconds per stage name (one entry per time the stage ran), CUDA synchronised at stage edges."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else None
        self.seconds: dict[str, list[float]] = {}
        self._open: list[list[float]] = []  # per open stage: [start, seconds of stages inside it]

    def _synchronise(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def total(self) -> float:
        """Seconds of all recorded stages together."""
        return sum(sum(values) for values in self.seconds.values())


class _Stage:
    __slots__ = ("recorder", "name")

    def __init__(self, recorder: StageTimes, name: str):
        self.recorder, self.name = recorder, name

    def __enter__(self) -> None:
        self.recorder._synchronise()
        self.recorder._open.append([perf_counter(), 0.0])

    def __exit__(self, *exc) -> bool:
        recorder = self.recorder
        recorder._synchronise()
        start, inner = recorder._open.pop()
        elapsed = perf_counter() - start
        if recorder._open:
            recorder._open[-1][1] += elapsed
        recorder.seconds.setdefault(self.name, []).append(elapsed - inner)
        return False


class _NoStage:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> bool:
        return False


_NO_STAGE = _NoStage()


def stage(name: str) -> _Stage | _NoStage:
    """A context manager that times its block as stage `name` while a recorder is active, else does nothing."""
    recorder = _RECORDER.get()
    return _NO_STAGE if recorder is None else _Stage(recorder, name)


def timed_stage(name: str) -> Callable[[_Function], _Function]:
    """Decorator form of `stage`: every call of the function is stage `name`."""

    def decorate(function: _Function) -> _Function:
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            with stage(name):
                return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


@contextlib.contextmanager
def record_stages(device: torch.device | str | None = None) -> Iterator[StageTimes]:
    """Record the stages run in this thread inside the block; CUDA work on `device` is synchronised at stage edges."""
    times = StageTimes(device)
    token = _RECORDER.set(times)
    try:
        yield times
    finally:
        _RECORDER.reset(token)
