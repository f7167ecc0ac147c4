"""Peak memory of a block: CUDA max allocated, or the process's peak RSS on the CPU."""

from __future__ import annotations

import gc
import re
import threading
import time
from pathlib import Path

import torch

__all__ = ["PeakMemory"]


def _status_kb(field_name: str) -> int | None:
    try:
        match = re.search(rf"^{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _release_free_heap() -> None:
    """Give freed heap back to the OS (glibc malloc_trim), so RSS at the start of a row is what is live."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


class PeakMemory:
    """Peak memory over a block: CUDA max allocated, or CPU RSS (VmHWM after resetting it through
    /proc/self/clear_refs; else a 5 ms RSS sampler; else the process-lifetime ru_maxrss)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"
        self.peak_mb: float | None = None
        self.start_mb: float | None = None
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        gc.collect()
        _release_free_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        self.start_mb = (_status_kb("VmRSS") or 0) / 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._mode = "hwm"
        except OSError:
            self._mode = "sample" if _status_kb("VmRSS") is not None else "rusage"
            if self._mode == "sample":
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._samples.append(_status_kb("VmRSS") or 0)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return False
        if self._mode == "hwm":
            self.peak_mb = (_status_kb("VmHWM") or 0) / 1024
        elif self._mode == "sample":
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._samples + [_status_kb("VmRSS") or 0]) / 1024
        else:
            import resource

            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.kind = "cpu_lifetime_max_rss"
        return False

    @property
    def delta_mb(self) -> float | None:
        """Peak above what was in use when the block started (the explanation's own working memory)."""
        if self.peak_mb is None or self.start_mb is None:
            return None
        return max(0.0, self.peak_mb - self.start_mb)
