"""`fdcam serve`: explanations from a Triton Inference Server, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

from .. import models
from ..bounds import MAX_CLASSES, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_OUTPUT_SIDE, PILLOW_LIMIT
from ..methods import METHODS
from .engine import BACKENDS, ServingConfig, default_onnx_paths
from .server import MODEL_NAMES, ServerOptions, TritonProcess, write_repository

__all__ = ["add_arguments", "run", "export_graphs", "clean_stale_workspaces", "WORKSPACE_PREFIX"]

# Workspaces and logs are named fdcam-serve-<pid>-...: a later start removes those of a process that is gone.
WORKSPACE_PREFIX = "fdcam-serve-"
_STALE = re.compile(re.escape(WORKSPACE_PREFIX) + r"(\d+)-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of `fdcam serve` on `parser`."""
    parser.add_argument("--model", default="efficientnet_lite0", help=f"one of {', '.join(models.NAMES)}")
    parser.add_argument(
        "--weights", default="imagenet", help="'imagenet' (offline default), a state_dict file, or 'random'"
    )
    parser.add_argument("--layer", default=None, help="target layer (dotted module name); default: the model's")
    parser.add_argument("--method", default="fdcam", choices=list(METHODS), help="CAM method (default fdcam)")
    parser.add_argument(
        "--backend",
        default="onnxruntime",
        choices=list(BACKENDS),
        help="onnxruntime: the exported explainer graph (default); torch: the library",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--address", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--max-batch", type=int, default=32, help="largest dynamic batch (default 32)")
    parser.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=2000,
        help="how long a request may wait for others to batch with (default 2000 µs)",
    )
    parser.add_argument(
        "--explainer-dir",
        default=None,
        help="onnxruntime backend: keep the exported graphs here and reuse them on the next start",
    )
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for the models to load")
    bounds = parser.add_argument_group("request bounds (fdcam.bounds; the same defaults as fdcam explain; 0: no limit)")
    bounds.add_argument(
        "--max-image-pixels",
        type=int,
        default=MAX_IMAGE_PIXELS,
        metavar="PIXELS",
        help=f"refuse images of more pixels, before decoding them (default {MAX_IMAGE_PIXELS}, at most {PILLOW_LIMIT})",
    )
    bounds.add_argument(
        "--max-request-bytes",
        type=int,
        default=MAX_IMAGE_BYTES,
        metavar="BYTES",
        help=f"refuse encoded images (image_bytes) of more bytes (default {MAX_IMAGE_BYTES})",
    )
    bounds.add_argument(
        "--max-output-side",
        type=int,
        default=MAX_OUTPUT_SIDE,
        metavar="PIXELS",
        help=f"longest side of saliency_original; larger images get it scaled down (default {MAX_OUTPUT_SIDE})",
    )
    bounds.add_argument(
        "--max-classes",
        type=int,
        default=MAX_CLASSES,
        metavar="T",
        help=f"refuse requests for more classes than this (default {MAX_CLASSES})",
    )
    parser.set_defaults(run=run)


def export_graphs(config: ServingConfig, directory: Path) -> ServingConfig:
    """Export (or reuse) the explainer graphs the onnxruntime backend runs: top-1, and with a classes input."""
    try:
        from fdcam.export import export_explainer
    except ImportError:
        raise ImportError("this fdcam has no fdcam.export.export_explainer; serve with --backend torch") from None
    top1, with_classes = default_onnx_paths(directory)
    # Graphs are reused only for the same model, weights, layer and method: another --method (or a
    # changed weights file) with the same --explainer-dir exports afresh instead of serving stale maps.
    key = {"model": config.model, "weights": config.weights, "layer": config.layer, "method": config.method}
    if config.weights not in (None, "imagenet"):
        stat = Path(config.weights).stat()
        key["weights_file"] = [str(Path(config.weights).resolve()), stat.st_size, stat.st_mtime_ns]
    key_path = Path(directory) / "serving.json"
    try:
        fresh = json.loads(key_path.read_text(encoding="utf-8")) == key
    except (OSError, ValueError):
        fresh = False
    if not fresh:
        key_path.unlink(missing_ok=True)  # an interrupted export must not leave old and new graphs under one key
    model = None
    for path, classes_input in ((top1, False), (with_classes, True)):
        if fresh and path.is_file():
            continue
        if model is None:
            model = models.load(config.model, weights=config.weights)
        print(
            f"fdcam: exporting the {config.method} explainer graph{' (classes input)' if classes_input else ''}...",
            file=sys.stderr,
            flush=True,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        written = Path(
            export_explainer(model, path, target_layer=config.layer, method=config.method, classes_input=classes_input)
        )
        if written.resolve() != path.resolve():
            written.replace(path)
    key_path.write_text(json.dumps(key), encoding="utf-8")
    return ServingConfig(
        **{**config.to_dict(), "explainer_onnx": str(top1), "explainer_classes_onnx": str(with_classes)}
    )


def _check_port_free(address: str, port: int, option: str) -> None:
    """A port another server holds is refused now: otherwise the readiness check would find that server."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tritonserver binds: TIME_WAIT is no obstacle
        try:
            probe.bind((address, port))
        except OSError as error:
            raise ValueError(f"{option} {port} cannot be used on {address}: {error.strerror or error}") from None


def _check_arguments(args: argparse.Namespace) -> None:
    for name in ("http_port", "grpc_port", "metrics_port"):
        if not 0 < getattr(args, name) < 65536:
            raise ValueError(f"--{name.replace('_', '-')} must be a port number (1-65535)")
    if len({args.http_port, args.grpc_port, args.metrics_port}) != 3:
        raise ValueError("--http-port, --grpc-port and --metrics-port must differ")
    for name in ("http_port", "grpc_port", "metrics_port"):
        _check_port_free(args.address, getattr(args, name), f"--{name.replace('_', '-')}")
    if not 1 <= args.max_batch <= 1024:
        raise ValueError("--max-batch must be between 1 and 1024")
    if args.max_queue_delay_us < 0:
        raise ValueError("--max-queue-delay-us must be 0 or more")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise ValueError(f"--device must be cpu or cuda, not {args.device!r}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    for name in ("max_image_pixels", "max_request_bytes", "max_output_side", "max_classes"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be 0 (no limit) or more, not {getattr(args, name)}")
    if args.max_image_pixels > PILLOW_LIMIT:
        raise ValueError(f"--max-image-pixels may be at most {PILLOW_LIMIT} (Pillow refuses larger images itself)")
    _check_method_backend(args.method, args.backend)


def _check_method_backend(method: str, backend: str) -> None:
    """A method the explainer graph cannot hold is refused before anything is exported."""
    if backend != "onnxruntime":
        return
    try:
        from fdcam.export.explainer import EXPLAINER_METHODS
    except ImportError:
        raise ImportError("this fdcam has no fdcam.export (the explainer graph); serve with --backend torch") from None
    if method not in EXPLAINER_METHODS:
        raise ValueError(
            f"--method {method} does not fit the exported explainer graph of the onnxruntime backend "
            f"(it holds {', '.join(EXPLAINER_METHODS)}); serve it with --backend torch"
        )


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def clean_stale_workspaces(directory: str | os.PathLike | None = None) -> list[Path]:
    """Remove the workspaces and logs that `fdcam serve` processes which no longer run left in `directory`.

    A `fdcam serve` killed outright (SIGKILL) cannot remove its own; its tritonserver gets SIGTERM from
    the kernel. Returns what was removed.
    """
    directory = Path(directory or tempfile.gettempdir())
    removed = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _STALE.match(entry.name)
        if not match or int(match.group(1)) == os.getpid() or _pid_alive(int(match.group(1))):
            continue
        try:
            if entry.lstat().st_uid != os.getuid():
                continue  # another user's server (its pid may live in another pid namespace)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            continue  # another user's, or already gone
    return removed


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; then stop tritonserver and its stubs before returning."""
    clean_stale_workspaces()  # first: also a start that fails on its arguments cleans up after a killed server
    _check_arguments(args)
    spec = models.spec(args.model)
    config = ServingConfig(
        model=spec.name,
        weights=None if args.weights == "random" else args.weights,
        layer=args.layer,
        method=args.method,
        backend=args.backend,
        device=args.device,
        max_image_pixels=args.max_image_pixels or None,
        max_request_bytes=args.max_request_bytes or None,
        max_output_side=args.max_output_side or None,
        max_classes=args.max_classes or None,
    )
    if config.weights not in (None, "imagenet") and not Path(config.weights).is_file():
        raise FileNotFoundError(f"weights file not found: {config.weights}")
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    options = ServerOptions(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        address=args.address,
        max_batch=args.max_batch,
        max_queue_delay_us=args.max_queue_delay_us,
    )
    # The server's log lives beside the workspace: an error names it, so it outlives a failed start.
    prefix = f"{WORKSPACE_PREFIX}{os.getpid()}-"
    handle, log_name = tempfile.mkstemp(prefix=prefix, suffix=".log")
    os.close(handle)
    log_path = Path(log_name)
    try:
        with tempfile.TemporaryDirectory(prefix=prefix) as workspace:
            workspace = Path(workspace)
            if config.backend == "onnxruntime":
                config = export_graphs(
                    config, Path(args.explainer_dir) if args.explainer_dir else workspace / "explainer"
                )
            repository, backends = write_repository(workspace, config, options)
            server = TritonProcess(repository, backends, options, log_path)
            server.start()
            try:
                server.wait_ready(args.startup_timeout, stop_requested=stop.is_set)
                if not stop.is_set():
                    host = args.address if args.address not in ("0.0.0.0", "") else "127.0.0.1"
                    print(
                        f"fdcam: serving {', '.join(MODEL_NAMES)} ({config.method} on {spec.name}, {config.backend}, "
                        f"{config.device}) at http://{host}:{args.http_port} and grpc://{host}:{args.grpc_port}; "
                        f"metrics at http://{host}:{args.metrics_port}/metrics; tritonserver pid {server.pid}",
                        flush=True,
                    )
                while not stop.wait(0.5):
                    if not server.running():
                        raise RuntimeError(f"tritonserver stopped unexpectedly: {server.failure_line()}")
            finally:
                server.stop()
        print("fdcam: server stopped", file=sys.stderr, flush=True)
        log_path.unlink(missing_ok=True)
        return 0
    finally:
        if log_path.is_file() and log_path.stat().st_size == 0:
            log_path.unlink()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
