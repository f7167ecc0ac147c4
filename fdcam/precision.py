"""The math of the torch switch passes (fp32, TF32, bf16/fp16 autocast) and the TF32 flags that threads share."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from .options import check_precision

__all__ = ["check_torch_precision", "tail_precision"]


def check_torch_precision(precision: str) -> str:
    """The precision if the torch backend knows it, else ValueError."""
    return check_precision("torch", precision)


class _Tf32Flags:
    """torch's process-wide TF32 flags, set for as long as any thread computes with a setting.

    Threads asking for the same setting share it; a thread asking for the other one waits until the
    others are done (or, if it is the only holder, switches and switches back). The flags the
    process had are restored when the last holder leaves, so concurrent explanations neither
    compute with the wrong math nor leave the flags changed.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._holders = 0
        self._allow: bool | None = None
        self._saved: tuple[bool, bool] | None = None
        self._local = threading.local()

    @staticmethod
    def _set(allow: bool) -> None:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow

    @contextlib.contextmanager
    def held(self, allow: bool) -> Iterator[None]:
        stack = self._local.__dict__.setdefault("stack", [])
        with self._condition:
            while self._holders > len(stack) and self._allow != allow:
                self._condition.wait()
            if self._holders == 0:
                self._saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            stack.append(self._allow)
            if self._allow != allow:
                self._set(allow)
                self._allow = allow
            self._holders += 1
        try:
            yield
        finally:
            with self._condition:
                previous = stack.pop()
                self._holders -= 1
                if self._holders == 0:
                    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._saved
                    self._allow = self._saved = None
                elif previous is not None and previous != self._allow:
                    # This thread switched the setting inside its own outer hold: switch back once
                    # the threads that joined under the inner setting are gone.
                    while self._holders > len(stack):
                        self._condition.wait()
                    self._set(previous)
                    self._allow = previous
                self._condition.notify_all()


_TF32 = _Tf32Flags()


@contextlib.contextmanager
def tail_precision(precision: str, device: torch.device) -> Iterator[None]:
    """Math of the switch passes: "fp32" exact (TF32 off), "tf32" TF32 matmuls and convolutions on CUDA,
    "bf16"/"fp16" autocast. torch's global TF32 flags are set under a process-wide lock shared by the
    threads that want the same setting, and restored when the last of them leaves. `precision` is checked once,
    where the engine is made (fdcam.EngineOptions, TorchTail), not on every call."""
    with _TF32.held(precision == "tf32"):
        if precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            # No cast cache: a CUDA graph captured under autocast must not keep casts of the capture's inputs.
            with torch.autocast(device.type, dtype=dtype, cache_enabled=False):
                yield
        else:
            yield
