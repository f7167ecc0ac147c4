"""What is printed and saved: the machine, the latency table."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

import fdcam

from .timing import Result

__all__ = ["format_machine", "format_table", "machine_info"]


def machine_info(device: torch.device) -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = match.group(1).strip() if match else cpu
    except OSError:
        pass
    info: dict[str, object] = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fdcam": fdcam.__version__,
        "platform": platform.platform(),
    }
    for name, module in (("torchvision", "torchvision"), ("onnxruntime", "onnxruntime")):
        try:
            info[name] = __import__(module).__version__
        except Exception:
            info[name] = None
    try:
        from importlib.metadata import version

        info["grad_cam"] = version("grad-cam")
    except Exception:
        info["grad_cam"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def format_machine(info: dict[str, object]) -> str:
    line = f"CPU: {info['cpu']} ({info['logical_cpus']} logical CPUs, torch threads {info['torch_threads']})"
    if info.get("gpu"):
        line += f"\nGPU: {info['gpu']} (CUDA {info.get('cuda')})"
    line += (
        f"\ntorch {info['torch']}, torchvision {info['torchvision']}, onnxruntime {info['onnxruntime']}, "
        f"grad-cam {info['grad_cam']}, fdcam {info['fdcam']}, Python {info['python']}"
    )
    return line


def format_table(results: list[Result], batch: int) -> str:
    header = ["model", "row", "library", "backend", "median ms", "min ms", "x pgc GradCAM",
              f"img/s (batch {batch})", "peak MB", "+MB", "runs", "note"]
    lines = []
    for r in results:
        if r.status != "ok":
            lines.append([r.model, r.method, r.library, _backend(r), *["-"] * 7, f"skipped: {r.reason}"])
            continue
        lines.append([
            r.model, r.method, r.library, _backend(r), f"{r.median_ms:.1f}", f"{r.min_ms:.1f}",
            f"{r.ratio_to_pgc_gradcam:.2f}" if r.ratio_to_pgc_gradcam is not None else "-",
            f"{r.throughput_ips:.2f}" if r.throughput_ips is not None else "-",
            f"{r.peak_mem_mb:.0f}" if r.peak_mem_mb is not None else "-",
            f"{r.peak_delta_mb:.0f}" if r.peak_delta_mb is not None else "-",
            f"{r.warmup}+{r.repeats}", "; ".join(r.notes),
        ])
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    render = lambda row: "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([render(header), render(["-" * w for w in widths]), *map(render, lines)])


def _backend(r: Result) -> str:
    return f"{r.backend} {r.precision}"
