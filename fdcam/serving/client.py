"""A client of `fdcam serve` (tritonclient, HTTP or gRPC) and `fdcam explain --server URL`.

One ExplainClient per thread: tritonclient's HTTP client is not thread-safe.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from .. import models
from ..errors import ServerError
from ..explain_output import (
    check_classes,
    check_output_dir,
    class_labels,
    finish,
    output_stems,
    save_explanation,
    skip_line,
)
from ..images import ImageError, load_image, output_size, resize_map

_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, as fdcam explain resizes the image it overlays

__all__ = ["ExplainClient", "ServerError", "parse_url", "explain_remote"]


def parse_url(url: str) -> tuple[str, str]:
    """("http" | "grpc", "host:port") from "grpc://host:port", "http://host:port" or "host:port" (HTTP)."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", "grpc"):
        raise ValueError(f"server URL must start with http:// or grpc://, got {url!r}")
    if not parsed.hostname or not parsed.port:
        raise ValueError(f"server URL needs a host and a port, e.g. http://127.0.0.1:8000; got {url!r}")
    return parsed.scheme, f"{parsed.hostname}:{parsed.port}"


class ExplainClient:
    """Explain images with a running `fdcam serve`: tensors (model `fdcam`) or encoded images (`fdcam_image`)."""

    def __init__(self, url: str, timeout_s: float = 120.0):
        self.protocol, address = parse_url(url)
        try:
            if self.protocol == "grpc":
                import tritonclient.grpc as triton
            else:
                import tritonclient.http as triton
        except ImportError:
            raise ImportError("--server needs the [serve] extra: pip install 'fdcam[serve]' (tritonclient)") from None
        self._triton = triton
        self.timeout_s = timeout_s
        if self.protocol == "grpc":
            self.client = triton.InferenceServerClient(address)
        else:
            self.client = triton.InferenceServerClient(address, connection_timeout=timeout_s, network_timeout=timeout_s)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> ExplainClient:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def _call(self, method, *args, **kwargs):
        from tritonclient.utils import InferenceServerException

        try:
            return method(*args, **kwargs)
        except InferenceServerException as error:
            text = (error.message() or str(error)).strip()
            raise ServerError(text.splitlines()[0] if text else "request failed") from None
        except (ConnectionError, OSError) as error:
            raise ServerError(f"cannot reach the server: {error}") from None

    def server_config(self, model: str = "fdcam") -> dict:
        """The fdcam settings the server runs (model, layer, method, backend, device)."""
        if self.protocol == "grpc":
            config = self._call(self.client.get_model_config, model, as_json=True)["config"]
        else:
            config = self._call(self.client.get_model_config, model)
        encoded = config["parameters"]["fdcam_config"]["string_value"]
        return json.loads(base64.b64decode(encoded).decode("utf-8"))

    def _input(self, name: str, array: np.ndarray, datatype: str):
        tensor = self._triton.InferInput(name, list(array.shape), datatype)
        if self.protocol == "http":
            tensor.set_data_from_numpy(array, binary_data=True)
        else:
            tensor.set_data_from_numpy(array)
        return tensor

    def _infer(self, model: str, inputs: list, outputs: list[str]) -> dict[str, np.ndarray]:
        requested = [self._triton.InferRequestedOutput(name) for name in outputs]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        result = self._call(self.client.infer, model, inputs, outputs=requested, **kwargs)
        return {
            name: np.array(result.as_numpy(name)) for name in outputs
        }  # writable: tritonclient hands out read-only views

    @staticmethod
    def _classes(classes) -> np.ndarray | None:
        return None if classes is None else np.asarray(classes, dtype=np.int64).reshape(1, -1)

    def explain_tensor(
        self, image: np.ndarray | torch.Tensor, classes=None, model: str = "fdcam"
    ) -> dict[str, np.ndarray]:
        """One normalised image [3,H,W] (or [1,3,H,W]) → logits [1,C], targets [1,T], saliency [1,T,H,W].

        `model` may also name an `explainer.onnx` that Triton's own onnxruntime backend hosts (same I/O).
        """
        image = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        image = image.reshape(1, *image.shape[-3:]) if image.ndim == 3 else image
        inputs = [self._input("image", image, _datatype(image))]
        if classes is not None:
            classes = self._classes(classes)
            inputs.append(self._input("classes", classes, _datatype(classes)))
        return self._infer(model, inputs, ["logits", "targets", "saliency"])

    def explain_bytes(self, data: bytes, classes=None, original: bool = True) -> dict[str, np.ndarray]:
        """One encoded image (JPEG, PNG, ...) → the outputs of explain_tensor plus saliency_original [1,T,h,w].

        `original=False` leaves saliency_original out (the server then does not compute it).
        """
        inputs = [self._input("image_bytes", np.array([[data]], dtype=np.object_), "BYTES")]
        if classes is not None:
            classes = self._classes(classes)
            inputs.append(self._input("classes", classes, "INT64"))
        outputs = ["logits", "targets", "saliency"] + (["saliency_original"] if original else [])
        return self._infer("fdcam_image", inputs, outputs)

    def statistics(self, model: str = "fdcam", settle: float = 0.0) -> dict:
        """Triton's counters for `model`: requests (inference_count), executions, and executions per batch size.

        Triton records a request's statistics after its answer is sent, so a read right after an answer can miss
        it: with `settle` > 0 the counters are read until two reads `settle` seconds apart agree (at most 15 s).
        """
        deadline = time.monotonic() + 15.0
        last = self._statistics(model)
        while settle > 0 and time.monotonic() < deadline:
            time.sleep(settle)
            now = self._statistics(model)
            if now == last:
                break
            last = now
        return last

    def _statistics(self, model: str) -> dict:
        if self.protocol == "grpc":
            stats = self._call(self.client.get_inference_statistics, model, as_json=True)
        else:
            stats = self._call(self.client.get_inference_statistics, model)
        entry = stats["model_stats"][0]
        batches = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in entry.get("batch_stats", [])}
        return {
            "inference_count": int(entry.get("inference_count", 0)),
            "execution_count": int(entry.get("execution_count", 0)),
            "batches": batches,
        }


def _datatype(array: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(array.dtype)


def explain_remote(args: argparse.Namespace) -> int:
    """`fdcam explain --server URL`: the same files and table as the local command, computed by the server."""
    client = ExplainClient(args.server)
    try:
        config = client.server_config("fdcam_image")
        if args.method is not None and args.method != config["method"]:
            raise ValueError(
                f"the server explains with {config['method']}, not {args.method}; omit --method or start "
                f"a server with --method {args.method}"
            )
        method, spec = config["method"], models.spec(config["model"])
        check_classes(args.classes, args.topk, spec)
        if args.max_size < 1:
            raise ValueError(f"--max-size must be a positive number of pixels, not {args.max_size}")
        names = class_labels(spec)
        out = Path(args.out)
        check_output_dir(out)
        rows, failures = [], []
        for path, stem in zip(args.images, output_stems(args.images)):
            try:
                image = load_image(path)
                data = Path(path).read_bytes()
                result = client.explain_bytes(data, args.classes, original=False)
                if not args.classes and args.topk > 1:
                    top = torch.tensor(result["logits"][0]).topk(args.topk).indices.tolist()
                    result = client.explain_bytes(data, top, original=False)
            except (ImageError, ServerError, OSError) as error:
                failures.append(str(error))
                print(skip_line(path, error), file=sys.stderr)
                continue
            probabilities = torch.softmax(torch.tensor(result["logits"][0]), dim=0)
            # The maps are scaled to the output size here, as the local command does (same --max-size, same files).
            width, height = output_size(image.size, args.max_size)
            shown = image if (width, height) == image.size else image.resize((width, height), resample=_BILINEAR)
            for class_index, saliency in zip(result["targets"][0].tolist(), result["saliency"][0]):
                full = resize_map(torch.from_numpy(saliency), (height, width)).numpy()
                files = save_explanation(shown, full, out / f"{stem}_{method}_{class_index}")
                rows.append((stem, method, class_index, names[class_index], float(probabilities[class_index]), files))
        return finish(rows, failures, len(args.images))
    finally:
        client.close()
