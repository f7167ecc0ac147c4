"""What is printed and saved: the machine, the latency table."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

import fdcam

from .timing import Result

__all__ = ["ENGINE_PAIRS", "engine_ratios", "format_machine", "format_ratios", "format_table", "machine_info"]


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
    header = [
        "model",
        "row",
        "library",
        "backend",
        "median ms",
        "min ms",
        "x pgc GradCAM",
        f"img/s (batch {batch})",
        "peak MB",
        "+MB",
        "runs",
        "note",
    ]
    lines = []
    for r in results:
        if r.status != "ok":
            lines.append([r.model, r.method, r.library, _backend(r), *["-"] * 7, f"skipped: {r.reason}"])
            continue
        lines.append(
            [
                r.model,
                r.method,
                r.library,
                _backend(r),
                f"{r.median_ms:.1f}",
                f"{r.min_ms:.1f}",
                f"{r.ratio_to_pgc_gradcam:.2f}" if r.ratio_to_pgc_gradcam is not None else "-",
                f"{r.throughput_ips:.2f}" if r.throughput_ips is not None else "-",
                f"{r.peak_mem_mb:.0f}" if r.peak_mem_mb is not None else "-",
                f"{r.peak_delta_mb:.0f}" if r.peak_delta_mb is not None else "-",
                f"{r.warmup}+{r.repeats}",
                "; ".join(r.notes),
            ]
        )
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    render = lambda row: "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([render(header), render(["-" * w for w in widths]), *map(render, lines)])


#: FD-CAM against fdcam's own Grad-CAM in the same engine: (engine, FD-CAM row, Grad-CAM row).
ENGINE_PAIRS = (("torch", "fdcam", "gradcam"), ("graph", "explainer-fdcam", "explainer-gradcam"))


def engine_ratios(results: list[Result]) -> list[dict[str, object]]:
    """Per model and engine whose two rows both ran: FD-CAM's and Grad-CAM's median ms and their ratio.

    What FD-CAM adds to a Grad-CAM is the grouping and the switch passes; the ratio measures that
    cost in the engine that runs both (torch = the library, graph = the one-file explainer)."""
    ok = {(r.model, r.method): r for r in results if r.status == "ok" and r.median_ms}
    ratios = []
    for model in dict.fromkeys(r.model for r in results):
        for engine, fdcam_key, gradcam_key in ENGINE_PAIRS:
            fdcam, gradcam = ok.get((model, fdcam_key)), ok.get((model, gradcam_key))
            if fdcam is None or gradcam is None:
                continue
            ratios.append(
                {
                    "model": model,
                    "engine": engine,
                    "device": fdcam.device,
                    "batch": fdcam.batch,
                    "fdcam_ms": fdcam.median_ms,
                    "gradcam_ms": gradcam.median_ms,
                    "ratio": fdcam.median_ms / gradcam.median_ms,
                    "fdcam_ips": fdcam.throughput_ips,
                    "gradcam_ips": gradcam.throughput_ips,
                }
            )
    return ratios


def format_ratios(ratios: list[dict[str, object]], batch: int) -> str:
    """The FD-CAM / Grad-CAM table (median ms at batch 1, and explanations/s at `batch` where measured)."""
    header = [
        "model",
        "engine",
        "FD-CAM ms",
        "Grad-CAM ms",
        "FD-CAM / Grad-CAM",
        f"FD-CAM img/s (batch {batch})",
        f"Grad-CAM img/s (batch {batch})",
    ]
    ips = lambda value: f"{value:.2f}" if value is not None else "-"  # noqa: E731
    lines = [
        [
            r["model"],
            r["engine"],
            f"{r['fdcam_ms']:.1f}",
            f"{r['gradcam_ms']:.1f}",
            f"{r['ratio']:.2f}x",
            ips(r["fdcam_ips"]),
            ips(r["gradcam_ips"]),
        ]
        for r in ratios
    ]
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    render = lambda row: "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()  # noqa: E731
    title = "FD-CAM / Grad-CAM in the same engine (median ms, one process):"
    return "\n".join([title, render(header), render(["-" * w for w in widths]), *map(render, lines)])


def _backend(r: Result) -> str:
    return f"{r.backend} {r.precision}"
