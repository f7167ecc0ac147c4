"""Clocks and the timed runs: every row of a model built, warmed up and timed in interleaved rounds.

`synchronise`, `clock` and `timed` are shared with benchmarks/gpu_check.py.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from .memory import PeakMemory
from .models import BenchModel
from .rows import Row, Runner, one_line, unavailable

__all__ = ["Result", "batch_of", "clock", "median", "run_model", "synchronise", "timed"]

_T = TypeVar("_T")


def synchronise(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a clock read after it includes that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(function: Callable[[], _T], device: torch.device) -> tuple[_T, float]:
    """The result of `function()` and its wall time in seconds, the device synchronised before and after."""
    synchronise(device)
    start = time.perf_counter()
    result = function()
    synchronise(device)
    return result, time.perf_counter() - start


def timed(function: Callable[[], _T], device: torch.device, repeats: int) -> tuple[_T | None, list[float]]:
    """The last result and the wall time of each of `repeats` calls (device synchronised around each)."""
    times, result = [], None
    for _ in range(repeats):
        result, seconds = clock(function, device)
        times.append(seconds)
    return result, times


def median(times: list[float]) -> float | None:
    """The median of `times`, or None when there are none."""
    return statistics.median(times) if times else None


@dataclass
class Result:
    model: str
    method: str
    library: str
    label: str
    backend: str
    precision: str
    device: str
    status: str = "ok"  # "ok" or "skipped"
    reason: str | None = None
    median_ms: float | None = None
    min_ms: float | None = None
    repeats: int = 0
    warmup: int = 0
    ratio_to_pgc_gradcam: float | None = None
    batch: int = 1
    throughput_ips: float | None = None
    peak_mem_mb: float | None = None
    peak_delta_mb: float | None = None
    memory_kind: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class _Active:
    row: Row
    result: Result
    runner: Runner
    times: list[float] = field(default_factory=list)
    batch_times: list[float] = field(default_factory=list)


def run_model(rows: list[Row], bm: BenchModel, device: torch.device, args) -> list[Result]:
    """Every row on one model: build and warm up each, then time them in interleaved rounds
    (round i runs each row once), so load from other processes spreads evenly over the rows."""
    results: list[Result] = []
    active: list[_Active] = []
    for row in rows:
        result = Result(
            bm.name, row.key, row.library, row.label, row.backend, row.precision, device.type, batch=args.batch
        )
        results.append(result)
        reason = unavailable(row, device)
        if reason:
            result.status, result.reason = "skipped", reason
            print(f"  {bm.name:<20} {row.key:<16} skipped: {reason}", flush=True)
            continue
        quick_slow = row.slow and args.quick
        result.warmup, result.repeats = (0, 1) if quick_slow else (args.warmup, args.repeat)
        entry = None
        try:
            entry = _Active(row, result, row.build(bm))
            for _ in range(result.warmup):
                _call(entry.runner, bm.x, device)
            active.append(entry)
        except Exception as error:  # a row that cannot run is reported, never fatal
            _drop(entry, result, error)
        print(
            f"  {bm.name:<20} {row.key:<16} {'ready' if result.status == 'ok' else 'skipped: ' + str(result.reason)}",
            flush=True,
        )

    # A row timed without a warm-up (--quick's slow rows: one call of minutes) has its peak memory taken around its
    # timed call; every other row's comes from one more, untimed call below.
    probed_when_timed = [a for a in active if a.result.warmup == 0]
    for round_index in range(max([a.result.repeats for a in active], default=0)):
        for entry in [a for a in active if round_index < a.result.repeats]:
            try:
                if entry in probed_when_timed:
                    entry.times.append(_probed_call(entry, bm.x, device))
                else:
                    entry.times.append(_call(entry.runner, bm.x, device))
            except Exception as error:
                _drop(entry, entry.result, error)
                active.remove(entry)

    # The probe gives the freed heap back to the system first (malloc_trim), so a timed call inside it would pay for
    # faulting its memory in afresh, as a process calling again and again does not (ResNet-50's FD-CAM: 8900 page
    # faults a call, ~24 ms of system time on a 2-core VM).
    for entry in [a for a in active if a not in probed_when_timed]:
        try:
            _probed_call(entry, bm.x, device)
        except Exception as error:
            _drop(entry, entry.result, error)
            active.remove(entry)

    if args.batch > 1:
        batched = [a for a in active if not (a.row.slow and args.quick)]
        for entry in active:
            if entry not in batched:
                entry.result.notes.append("--quick: no batch run for a slow row")
        xb = batch_of(bm.x, args.batch)
        for round_index in range(1 + max(1, min(args.repeat, 3))):  # round 0 warms up the batch size
            for entry in list(batched):
                try:
                    seconds = _call(entry.runner, xb, device)
                    if round_index:
                        entry.batch_times.append(seconds)
                except Exception as error:
                    entry.result.notes.append(f"batch run failed: {one_line(error)}")
                    batched.remove(entry)

    for entry in active:
        result = entry.result
        if entry.times:
            result.median_ms = statistics.median(entry.times) * 1e3
            result.min_ms = min(entry.times) * 1e3
            result.throughput_ips = (
                args.batch / statistics.median(entry.batch_times)
                if entry.batch_times
                else (1e3 / result.median_ms if args.batch == 1 else None)
            )
        if entry.row.backend == "onnxruntime" and device.type == "cuda":
            result.notes.append("ORT memory is outside torch's allocator")
        _close(entry.runner)
    gc.collect()
    return results


def _call(runner: Runner, x: torch.Tensor, device: torch.device) -> float:
    """Seconds of one explanation (CUDA synchronised before each clock read); hooks untimed."""
    runner.before()
    try:
        return clock(lambda: runner.explain(x), device)[1]
    finally:
        runner.after()


def _probed_call(entry: _Active, x: torch.Tensor, device: torch.device) -> float:
    """`_call` inside the peak-memory probe, whose peak (the largest over the row's probed calls) goes to the row."""
    with PeakMemory(device) as memory:
        seconds = _call(entry.runner, x, device)
    result = entry.result
    result.peak_mem_mb = max(result.peak_mem_mb or 0.0, memory.peak_mb)
    result.peak_delta_mb = max(result.peak_delta_mb or 0.0, memory.delta_mb or 0.0)
    result.memory_kind = memory.kind
    return seconds


def _drop(entry: _Active | None, result: Result, error: BaseException) -> None:
    result.status, result.reason = "skipped", one_line(error)
    result.median_ms = result.min_ms = result.throughput_ips = None
    if entry is not None:
        _close(entry.runner)


def _close(runner: Runner) -> None:
    try:
        runner.close()
    except Exception:
        pass


def batch_of(x: torch.Tensor, n: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(1)
    noise = torch.randn(n, *x.shape[1:], generator=generator).to(x.device)
    return x.expand(n, *x.shape[1:]) + 0.05 * noise
