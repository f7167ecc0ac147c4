"""Throughput and latency of `fdcam serve` (Triton, dynamic batching) under concurrent clients vs in-process calls.

    python -m benchmarks.serving [--device cpu|cuda] [--concurrency 1,4,16] [--requests N]
                                 [--method fdcam] [--backend onnxruntime|torch] [--model efficientnet_lite0]
                                 [--protocol http|grpc] [--input tensor|image] [--max-batch 32]
                                 [--max-queue-delay-us 2000] [--json out.json]

For each concurrency C, C client threads (one tritonclient each) send N requests in all, one image per
request, as fast as answers come back. Printed per row: requests/s, p50/p95/p99 latency, and the mean
executed batch size from Triton's own statistics (requests / model executions during that row).
The comparison rows make the same N explanations in this process with the same engine: one image per
call, and in batches of --max-batch images (what dynamic batching can at best reach). The server runs
first and is stopped before the in-process rows, so they never compete for the CPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as fdcam serve sets for its stubs: the in-process rows run alike

import numpy as np  # noqa: E402
import torch  # noqa: E402

import fdcam  # noqa: E402
from fdcam import models  # noqa: E402
from fdcam.images import load_image, preprocess  # noqa: E402
from fdcam.serving.client import ExplainClient  # noqa: E402
from fdcam.serving.command import export_graphs  # noqa: E402
from fdcam.serving.engine import ServingConfig, make_explainer  # noqa: E402
from fdcam.serving.ports import free_ports  # noqa: E402

IMAGES = sorted((Path(fdcam.__file__).parent / "data").glob("*.jpg")) + sorted(
    (Path(fdcam.__file__).parent / "data").glob("*.png")
)


class ServeProcess:
    """`fdcam serve` as a child process on free loopback ports; stopped with SIGINT."""

    def __init__(self, arguments: list[str], timeout_s: float = 900.0):
        self.http_port, self.grpc_port, metrics_port = free_ports(3)
        command = [
            sys.executable,
            "-m",
            "fdcam.cli",
            "serve",
            "--address",
            "127.0.0.1",
            "--http-port",
            str(self.http_port),
            "--grpc-port",
            str(self.grpc_port),
            "--metrics-port",
            str(metrics_port),
            *arguments,
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in self.process.stdout:
                self.lines.append(line)
                if line.startswith("fdcam: serving"):
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout_s) or self.process.poll() is not None:
            self.stop()
            raise RuntimeError("fdcam serve did not start: " + "".join(self.lines[-5:]).strip())

    def url(self, protocol: str) -> str:
        return f"{protocol}://127.0.0.1:{self.http_port if protocol == 'http' else self.grpc_port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _percentiles(latencies_s: list[float]) -> dict:
    ms = np.asarray(latencies_s) * 1000.0
    return {f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)}


def _inputs(spec: models.ModelSpec) -> tuple[list[np.ndarray], list[bytes]]:
    tensors = [preprocess(load_image(path), spec).numpy() for path in IMAGES]
    tensors += [t[..., ::-1].copy() for t in tensors]  # mirror images: more distinct inputs
    return tensors, [path.read_bytes() for path in IMAGES]


def _served_row(
    server: ServeProcess, protocol: str, kind: str, concurrency: int, requests: int, tensors, encoded
) -> dict:
    counts = [requests // concurrency + (1 if i < requests % concurrency else 0) for i in range(concurrency)]
    model = "fdcam" if kind == "tensor" else "fdcam_image"
    barrier = threading.Barrier(concurrency)

    def client_thread(index: int) -> list[float]:
        latencies = []
        with ExplainClient(server.url(protocol)) as client:  # one client per thread: the HTTP client is not thread-safe
            barrier.wait()
            for i in range(counts[index]):
                item = index + i * concurrency
                started = time.perf_counter()
                if kind == "tensor":
                    client.explain_tensor(tensors[item % len(tensors)])
                else:
                    client.explain_bytes(encoded[item % len(encoded)])
                latencies.append(time.perf_counter() - started)
        return latencies

    with ExplainClient(server.url("http")) as client:
        before = client.statistics(model, settle=0.5)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        latencies = [value for values in pool.map(client_thread, range(concurrency)) for value in values]
    wall = time.perf_counter() - started
    with ExplainClient(server.url("http")) as client:
        after = client.statistics(model, settle=0.5)
    executions = after["execution_count"] - before["execution_count"]
    served = after["inference_count"] - before["inference_count"]
    return {
        "path": f"triton {protocol} ({kind})",
        "concurrency": concurrency,
        "requests": len(latencies),
        "throughput_rps": len(latencies) / wall,
        **_percentiles(latencies),
        "mean_batch": served / executions if executions else None,
        "executions": executions,
    }


def _in_process_rows(config: ServingConfig, requests: int, batch: int, tensors) -> list[dict]:
    explainer = make_explainer(config)
    images = [tensors[i % len(tensors)] for i in range(requests)]
    explainer.explain(np.concatenate(images[: min(batch, requests)]), None)  # warm-up
    rows = []
    for size in sorted({1, min(batch, requests)}):
        latencies = []
        started = time.perf_counter()
        for first in range(0, requests, size):
            call_started = time.perf_counter()
            explainer.explain(np.concatenate(images[first : first + size]), None)
            latencies.extend([time.perf_counter() - call_started] * len(images[first : first + size]))
        wall = time.perf_counter() - started
        rows.append(
            {
                "path": f"in-process, {size} image{'s' if size > 1 else ''}/call",
                "concurrency": 1,
                "requests": requests,
                "throughput_rps": requests / wall,
                **_percentiles(latencies),
                "mean_batch": float(size),
                "executions": -(-requests // size),
            }
        )
    return rows


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _print_table(header: str, rows: list[dict]) -> None:
    print(header)
    columns = ("path", "clients", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "mean batch")
    table = [columns] + [
        (
            r["path"],
            str(r["concurrency"]),
            str(r["requests"]),
            f"{r['throughput_rps']:.2f}",
            f"{r['p50_ms']:.0f}",
            f"{r['p95_ms']:.0f}",
            f"{r['p99_ms']:.0f}",
            "-" if r["mean_batch"] is None else f"{r['mean_batch']:.2f}",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for row in table:
        print(
            "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths))
            )
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level (default 64)")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--method", default="fdcam")
    parser.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    parser.add_argument("--protocol", default="http", choices=["http", "grpc"])
    parser.add_argument(
        "--input", default="tensor", choices=["tensor", "image"], help="model fdcam (tensor) or fdcam_image (bytes)"
    )
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process comparison rows")
    parser.add_argument("--json", default=None, help="also write the rows and the machine to this file")
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not concurrencies or min(concurrencies) < 1 or args.requests < 1:
        parser.error("--concurrency needs positive integers and --requests at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA GPU is available")

    load_before = os.getloadavg()[0]
    spec = models.spec(args.model)
    config = ServingConfig(model=spec.name, method=args.method, backend=args.backend, device=args.device)
    tensors, encoded = _inputs(spec)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fdcam-bench-") as workspace:
        server_arguments = [
            "--model",
            spec.name,
            "--method",
            args.method,
            "--backend",
            args.backend,
            "--device",
            args.device,
            "--max-batch",
            str(args.max_batch),
            "--max-queue-delay-us",
            str(args.max_queue_delay_us),
        ]
        if args.backend == "onnxruntime":
            config = export_graphs(config, Path(workspace) / "explainer")  # exported once, shared with the server
            server_arguments += ["--explainer-dir", str(Path(workspace) / "explainer")]
        server = ServeProcess(server_arguments)
        try:
            warm = max(concurrencies)
            _served_row(server, args.protocol, args.input, warm, warm * 2, tensors, encoded)  # warm-up, not reported
            for concurrency in concurrencies:
                rows.append(
                    _served_row(server, args.protocol, args.input, concurrency, args.requests, tensors, encoded)
                )
        finally:
            server.stop()
        if not args.no_in_process:
            rows += _in_process_rows(config, args.requests, args.max_batch, tensors)

    machine = _machine()
    # Other processes' load skews every row (2-core machines most): say how busy the machine was.
    machine["load_average_1m"] = {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)}
    command = ("python -m benchmarks.serving " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    header = (
        f"fdcam serve: {args.method} on {spec.name} ({spec.default_layer}), {args.backend} backend, {args.device}; "
        f"max batch {args.max_batch}, queue delay {args.max_queue_delay_us} µs; {args.protocol}, {args.input} input\n"
        f"machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs"
        + (f", {machine['gpu']}" if machine["gpu"] else "")
        + f"; torch {machine['torch']}, onnxruntime {machine['onnxruntime']}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
        f"{machine['date']}; load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end\n"
        f"command: {command}"
    )
    _print_table(header, rows)
    if args.json:
        record = {"command": command, "machine": machine, "config": vars(args), "rows": rows}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
