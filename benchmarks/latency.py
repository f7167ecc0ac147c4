"""Latency, throughput and peak memory of fdcam's CAM methods against pytorch-grad-cam and the FD-CAM authors' loop.

    python -m benchmarks.latency [--device cpu|cuda] [--models vgg16,efficientnet_lite0,resnet50]
                                 [--methods ROWS] [--batch N] [--repeat R] [--warmup W] [--quick]
                                 [--profile] [--json out.json]

Rows (select with --methods, comma-separated; a prefix such as `pgc` or `fdcam-ort` selects a family):
  fdcam                FD-CAM, torch backend (factorised tail where the pattern applies), fp32
  fdcam-tf32|bf16      the same with TF32 / bf16-autocast switch passes (CUDA only)
  fdcam-graph[-tf32]   the same with the switch passes replayed as a CUDA graph (CUDA only)
  fdcam-ort-fp32|tf32|fp16   FD-CAM, onnxruntime backend (fp32 on CPU; fp32/tf32/fp16 on CUDA)
  gradcam ablationcam scorecam groupcam   fdcam's other methods
  pgc-gradcam pgc-ablationcam pgc-scorecam   pytorch-grad-cam 1.5.7 with its defaults
  explainer-fdcam explainer-gradcam   the whole explanation as one ONNX graph (fdcam.export.export_explainer)
                       run by ONNX Runtime (CPU; CUDA provider on a GPU); the export is untimed
  authors-fdcam        the FD-CAM authors' loop: per class, 2K switch passes through the full,
                       unfactorised torch tail in chunks of 128 masks
pgc-gradcam is always measured: every row's ratio is to it, from the same run. VGG16 and ResNet50
use random weights (seeded), EfficientNet-Lite0 its real ImageNet weights; `tiny` is a small conv net
for smoke tests. Rows that cannot run (no fdcam.runtime, no pytorch-grad-cam, no CUDA, an error)
are printed as skipped with the reason. `--quick` runs the slow rows (Score-CAMs, pgc Ablation-CAM:
one full-model forward per channel) once, without warm-up.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's progress bars; read when tqdm is imported

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fdcam  # noqa: E402
from fdcam import models  # noqa: E402
from fdcam.groups import channel_groups  # noqa: E402
from fdcam.head import HeadOutput, class_gradients, forward_head  # noqa: E402
from fdcam.maps import to_input_size, weighted_sum  # noqa: E402
from fdcam.methods.base import Explanation, preserved_model_state, resolve_targets  # noqa: E402
from fdcam.split import split_model  # noqa: E402
from fdcam.factorise import max_group_size  # noqa: E402
from fdcam.switch import switch_logits, switch_masks, switch_scores  # noqa: E402
from fdcam.tail import TorchTail  # noqa: E402
from fdcam.weights import combine_weights  # noqa: E402

MODEL_NAMES = ("tiny", "vgg16", "efficientnet_lite0", "resnet50")
DEFAULT_MODELS = "vgg16,efficientnet_lite0,resnet50"
REFERENCE = "pgc-gradcam"
AUTHORS_CHUNK = 128
IMAGE = Path(fdcam.__file__).parent / "data" / "afghan_hound.jpg"


# ----------------------------------------------------------------------------------------------
# Models


class TinyNet(nn.Module):
    """A VGG-shaped toy (convs, adaptive pool, MLP) on 3×32×32 inputs, for smoke tests."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4))
        self.classifier = nn.Sequential(nn.Linear(32 * 16, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@dataclass
class BenchModel:
    name: str
    model: nn.Module
    layer: str
    x: torch.Tensor  # [1,3,H,W] on the device
    weights: str


def load_model(name: str, device: torch.device) -> BenchModel:
    """The model, its target layer and one input image; random seeded weights except for lite0."""
    torch.manual_seed(0)
    if name == "tiny":
        model = TinyNet().eval().to(device)
        return BenchModel(name, model, "features.5", torch.randn(1, 3, 32, 32, device=device), "random")
    weights = "imagenet" if name == "efficientnet_lite0" else None
    model = models.load(name, weights=weights, device=device)
    spec = models.spec_of(model)
    try:
        from fdcam.images import load_image, preprocess

        x = preprocess(load_image(IMAGE), spec)
    except Exception:  # the image is only a realistic input; noise does as well for timing
        x = torch.randn(1, 3, *spec.input_size)
    return BenchModel(name, model, spec.default_layer, x.to(device), weights or "random")


# ----------------------------------------------------------------------------------------------
# Rows


@dataclass
class Row:
    key: str
    library: str  # "fdcam", "pytorch-grad-cam" or "authors' loop"
    label: str
    build: Callable[[BenchModel], "Runner"]
    backend: str = "torch"
    precision: str = "fp32"
    slow: bool = False
    devices: tuple[str, ...] = ("cpu", "cuda")
    needs: str | None = None  # "pgc" or "ort"


@dataclass
class Runner:
    """A built row: `explain(x)` is timed; `before`/`after` run untimed around each call; `close` at the end."""

    explain: Callable[[torch.Tensor], object]
    before: Callable[[], None] = lambda: None
    after: Callable[[], None] = lambda: None
    close: Callable[[], None] = lambda: None


def _fdcam_row(cls_name: str, **options):
    def build(bm: BenchModel) -> Runner:
        cam = getattr(fdcam, cls_name)(bm.model, bm.layer, **options)
        return Runner(lambda x: cam(x))

    return build


def _pgc_row(cls_name: str):
    """pytorch-grad-cam with its defaults. Its hooks live only around its own calls (between calls they
    would run on, and copy activations from, every other row's forward of the same model)."""

    def build(bm: BenchModel) -> Runner:
        import pytorch_grad_cam
        from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients

        layer = bm.model.get_submodule(bm.layer)
        cam = getattr(pytorch_grad_cam, cls_name)(model=bm.model, target_layers=[layer])
        cam.activations_and_grads.release()

        def before():
            cam.activations_and_grads = ActivationsAndGradients(bm.model, [layer], cam.reshape_transform, cam.detach)

        def after():
            cam.activations_and_grads.release()
            bm.model.zero_grad(set_to_none=True)  # pgc's backward leaves parameter gradients behind
            _put_back(bm.model, bm.layer, layer)  # pgc's AblationCAM swaps the layer and, on error, leaves it swapped

        return Runner(lambda x: cam(input_tensor=x, targets=None), before, after, after)

    return build


def _explainer_row(method: str):
    """The exported explainer graph (image → logits, targets, saliency) in an ONNX Runtime session."""

    def build(bm: BenchModel) -> Runner:
        import tempfile

        import onnxruntime as ort

        from fdcam.export import export_explainer

        directory = tempfile.TemporaryDirectory(prefix="fdcam-bench-explainer-")
        device = bm.x.device
        model = bm.model if device.type == "cpu" else _cpu_copy(bm.model)
        path = export_explainer(model, Path(directory.name) / "explainer.onnx", bm.layer, method, input_size=tuple(bm.x.shape[-2:]))
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=providers)
        if providers[0] not in session.get_providers():
            directory.cleanup()
            raise RuntimeError(f"ONNX Runtime has no {providers[0]} here")

        def explain(x: torch.Tensor):
            return session.run(["saliency"], {"image": x.detach().cpu().numpy()})[0]

        return Runner(explain, close=directory.cleanup)

    return build


def _cpu_copy(model: nn.Module) -> nn.Module:
    import copy

    copied = copy.deepcopy(model).cpu()
    setattr(copied, "fdcam_spec", models.spec_of(model))
    return copied


def _put_back(model: nn.Module, name: str, layer: nn.Module) -> None:
    if model.get_submodule(name) is not layer:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


class AuthorsFDCAM:
    """The FD-CAM authors' loop, as a baseline: one class at a time, the 2K switch passes of that
    class through the full (unfactorised) torch tail in chunks of 128 masks."""

    def __init__(self, model: nn.Module, layer: str, chunk: int = AUTHORS_CHUNK, theta: float = 0.95, bias: float = 0.5):
        self.model, self.layer, self.chunk, self.theta, self.bias = model, layer, chunk, theta, bias
        self._cache: dict[tuple, tuple] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with preserved_model_state(self.model):
            key = (tuple(x.shape[1:]), x.device)
            if key not in self._cache:
                split = split_model(self.model, self.layer, x[:1].detach())
                self._cache[key] = (split, TorchTail(split.tail, batch_size=self.chunk, factorise=False))
            split, tail = self._cache[key]
            head = forward_head(split, x)
            maps = []  # [N] of [1,T,H,W]
            for i in range(x.shape[0]):
                class_maps = []
                extras = tuple(extra[i : i + 1] for extra in head.extras)
                one = HeadOutput(head.activations[i : i + 1], extras, head.logits[i : i + 1])
                for c in head.logits[i].argmax(0, keepdim=True):  # top-1; the loop is per class
                    gradients = class_gradients(split, one, c.view(1, 1))
                    alpha = gradients.mean(dim=(-2, -1))[0]  # [1,K]
                    masks = switch_masks(channel_groups(head.activations[i], self.theta))
                    logits = switch_logits(tail, one.activations, masks, extras, c.view(1, 1))[0]
                    scores = switch_scores(logits, head.logits[i], c.view(1))
                    weights = combine_weights(alpha, scores, self.bias)
                    cam = weighted_sum(one.activations, weights[None])
                    class_maps.append(to_input_size(cam, tuple(x.shape[-2:])))
                maps.append(torch.cat(class_maps, dim=1))
            return torch.cat(maps)


def _authors_row(bm: BenchModel) -> Runner:
    cam = AuthorsFDCAM(bm.model, bm.layer)
    return Runner(lambda x: cam(x))


ROWS: list[Row] = [
    Row("fdcam", "fdcam", "FD-CAM", _fdcam_row("FDCAM")),
    Row("fdcam-tf32", "fdcam", "FD-CAM", _fdcam_row("FDCAM", precision="tf32"), precision="tf32", devices=("cuda",)),
    Row("fdcam-bf16", "fdcam", "FD-CAM", _fdcam_row("FDCAM", precision="bf16"), precision="bf16", devices=("cuda",)),
    Row("fdcam-graph", "fdcam", "FD-CAM (CUDA graph)", _fdcam_row("FDCAM", cuda_graph=True), devices=("cuda",)),
    Row("fdcam-graph-tf32", "fdcam", "FD-CAM (CUDA graph)", _fdcam_row("FDCAM", precision="tf32", cuda_graph=True),
        precision="tf32", devices=("cuda",)),
    Row("fdcam-ort-fp32", "fdcam", "FD-CAM", _fdcam_row("FDCAM", backend="onnxruntime", precision="fp32"),
        backend="onnxruntime", needs="ort"),
    Row("fdcam-ort-tf32", "fdcam", "FD-CAM", _fdcam_row("FDCAM", backend="onnxruntime", precision="tf32"),
        backend="onnxruntime", precision="tf32", devices=("cuda",), needs="ort"),
    Row("fdcam-ort-fp16", "fdcam", "FD-CAM", _fdcam_row("FDCAM", backend="onnxruntime", precision="fp16"),
        backend="onnxruntime", precision="fp16", devices=("cuda",), needs="ort"),
    Row("gradcam", "fdcam", "Grad-CAM", _fdcam_row("GradCAM")),
    Row("ablationcam", "fdcam", "Ablation-CAM", _fdcam_row("AblationCAM")),
    Row("scorecam", "fdcam", "Score-CAM", _fdcam_row("ScoreCAM"), slow=True),
    Row("groupcam", "fdcam", "Group-CAM", _fdcam_row("GroupCAM")),
    Row("pgc-gradcam", "pytorch-grad-cam", "GradCAM", _pgc_row("GradCAM"), needs="pgc"),
    Row("pgc-ablationcam", "pytorch-grad-cam", "AblationCAM", _pgc_row("AblationCAM"), slow=True, needs="pgc"),
    Row("pgc-scorecam", "pytorch-grad-cam", "ScoreCAM", _pgc_row("ScoreCAM"), slow=True, needs="pgc"),
    Row("explainer-fdcam", "fdcam", "FD-CAM (one ONNX graph)", _explainer_row("fdcam"), backend="onnxruntime", needs="ort"),
    Row("explainer-gradcam", "fdcam", "Grad-CAM (one ONNX graph)", _explainer_row("gradcam"), backend="onnxruntime", needs="ort"),
    Row("authors-fdcam", "authors' loop", "FD-CAM", _authors_row),
]
ROW_KEYS = [row.key for row in ROWS]


def select_rows(spec: str | None) -> list[Row]:
    """Rows named in a comma list (exact keys or key prefixes such as `pgc`), in table order; all if None."""
    if not spec:
        return list(ROWS)
    chosen: set[str] = set()
    for wanted in (w.strip().lower() for w in spec.split(",") if w.strip()):
        matches = [wanted] if wanted in ROW_KEYS else [key for key in ROW_KEYS if key.startswith(wanted)]
        if not matches:
            raise SystemExit(f"unknown --methods entry {wanted!r}; rows: {', '.join(ROW_KEYS)}")
        chosen.update(matches)
    return [row for row in ROWS if row.key in chosen]


def _unavailable(row: Row, device: torch.device) -> str | None:
    if device.type not in row.devices:
        return f"{row.key} runs on CUDA only"
    if row.needs == "pgc":
        try:
            import pytorch_grad_cam  # noqa: F401
        except Exception as error:
            return f"pytorch-grad-cam not importable ({_one_line(error)})"
        _quiet_pgc()
    if row.needs == "ort":
        try:
            import fdcam.runtime  # noqa: F401
        except Exception as error:
            return f"fdcam.runtime not importable ({_one_line(error)})"
    return None


def _quiet_pgc() -> None:
    """Turn off the progress bars pytorch-grad-cam's Ablation-CAM and Score-CAM print per batch."""
    import functools
    import types

    import tqdm

    for module_name in ("pytorch_grad_cam.ablation_cam", "pytorch_grad_cam.score_cam"):
        module = sys.modules.get(module_name)
        if module is not None and isinstance(getattr(module, "tqdm", None), types.ModuleType):
            module.tqdm = types.SimpleNamespace(tqdm=functools.partial(tqdm.tqdm, disable=True))


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:160]}" if text else type(error).__name__


# ----------------------------------------------------------------------------------------------
# Clocks and memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


# ----------------------------------------------------------------------------------------------
# One row


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
        result = Result(bm.name, row.key, row.library, row.label, row.backend, row.precision, device.type, batch=args.batch)
        results.append(result)
        reason = _unavailable(row, device)
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
        print(f"  {bm.name:<20} {row.key:<16} {'ready' if result.status == 'ok' else 'skipped: ' + str(result.reason)}", flush=True)

    for round_index in range(max([a.result.repeats for a in active], default=0)):
        for entry in [a for a in active if round_index < a.result.repeats]:
            try:
                with PeakMemory(device) as memory:
                    entry.times.append(_call(entry.runner, bm.x, device))
                entry.result.peak_mem_mb = max(entry.result.peak_mem_mb or 0.0, memory.peak_mb)
                entry.result.peak_delta_mb = max(entry.result.peak_delta_mb or 0.0, memory.delta_mb or 0.0)
                entry.result.memory_kind = memory.kind
            except Exception as error:
                _drop(entry, entry.result, error)
                active.remove(entry)

    if args.batch > 1:
        batched = [a for a in active if not (a.row.slow and args.quick)]
        for entry in active:
            if entry not in batched:
                entry.result.notes.append("--quick: no batch run for a slow row")
        xb = _batch_of(bm.x, args.batch)
        for round_index in range(1 + max(1, min(args.repeat, 3))):  # round 0 warms up the batch size
            for entry in list(batched):
                try:
                    seconds = _call(entry.runner, xb, device)
                    if round_index:
                        entry.batch_times.append(seconds)
                except Exception as error:
                    entry.result.notes.append(f"batch run failed: {_one_line(error)}")
                    batched.remove(entry)

    for entry in active:
        result = entry.result
        if entry.times:
            result.median_ms = statistics.median(entry.times) * 1e3
            result.min_ms = min(entry.times) * 1e3
            result.throughput_ips = (
                args.batch / statistics.median(entry.batch_times) if entry.batch_times
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
        _sync(device)
        start = time.perf_counter()
        runner.explain(x)
        _sync(device)
        return time.perf_counter() - start
    finally:
        runner.after()


def _drop(entry: "_Active | None", result: Result, error: BaseException) -> None:
    result.status, result.reason = "skipped", _one_line(error)
    result.median_ms = result.min_ms = result.throughput_ips = None
    if entry is not None:
        _close(entry.runner)


def _close(runner: Runner) -> None:
    try:
        runner.close()
    except Exception:
        pass


def _batch_of(x: torch.Tensor, n: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(1)
    noise = torch.randn(n, *x.shape[1:], generator=generator).to(x.device)
    return x.expand(n, *x.shape[1:]) + 0.05 * noise


# ----------------------------------------------------------------------------------------------
# FD-CAM phase profile


def profile_fdcam(bm: BenchModel, device: torch.device, repeat: int, batch: int = 1, precision: str = "fp32") -> dict[str, float]:
    """Median ms of FD-CAM's phases on a batch of images: head, gradients, grouping, switch passes, map."""
    cam = fdcam.FDCAM(bm.model, bm.layer, precision=precision)
    x = _batch_of(bm.x, batch) if batch > 1 else bm.x
    cam(x)  # warm-up: split, tail, factorised contributions
    phases: dict[str, list[float]] = {}

    def clock(name: str, fn: Callable[[], object]):
        _sync(device)
        start = time.perf_counter()
        value = fn()
        _sync(device)
        phases.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
        return value

    factorised = None
    for _ in range(max(1, repeat)):
        with preserved_model_state(bm.model):
            split = cam.split_for(x)

            def head_phase():
                head = forward_head(split, x)
                return Explanation(x, split, head, resolve_targets(None, head.logits))

            explanation = clock("head forward", head_phase)
            clock("gradients (tail backward)", lambda: explanation.gradients)
            masks = clock("grouping + masks", lambda: switch_masks(cam.groups(explanation.activations), cam.switch))
            tail = cam.tail_for(explanation)

            def switch_phase():
                sparsity = max_group_size(explanation.activations.shape[1], cam.theta) if cam.grouping else 1
                logits = switch_logits(tail, explanation.activations, masks, explanation.head.extras, explanation.targets, sparsity)
                return switch_scores(logits, explanation.head.logits, explanation.targets, cam.switch)

            scores = clock("switch passes", switch_phase)
            if isinstance(tail, TorchTail):
                factorised = tail.shortcut_for(explanation.activations[:1], explanation.head.extras)
                if factorised is not None:
                    with torch.no_grad():
                        clock(f"  of which {factorised.kind} shortcut set-up", lambda: factorised.prepare(explanation.activations))

            def map_phase():
                alpha = explanation.gradients.mean(dim=(-2, -1))
                weights = combine_weights(alpha, scores, cam.bias, cam.combine)
                return cam.saliency(explanation, weights)

            clock("weights + map + upsampling", map_phase)
    profile = {name: statistics.median(values) for name, values in phases.items()}
    profile["total (sum of phases)"] = sum(v for k, v in profile.items() if not k.startswith("  "))
    profile["factorised tail"] = float(factorised is not None)
    return profile


# ----------------------------------------------------------------------------------------------
# Machine, table, main


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


def format_profile(name: str, profile: dict[str, float], batch: int = 1, precision: str = "fp32") -> str:
    total = profile["total (sum of phases)"]
    lines = [f"FD-CAM phases on {name}, batch {batch} (torch backend {precision}, factorised tail: "
             f"{'yes' if profile['factorised tail'] else 'no'}):"]
    for phase, ms in profile.items():
        if phase == "factorised tail":
            continue
        share = "" if phase.startswith("total") else f"  {100 * ms / total:5.1f}%"
        lines.append(f"  {phase:<30} {ms:9.1f} ms{share}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma list of {', '.join(MODEL_NAMES)}")
    parser.add_argument("--methods", default=None, help=f"comma list of rows or prefixes: {', '.join(ROW_KEYS)}")
    parser.add_argument("--batch", type=int, default=1, help="images per batch for the throughput column")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per row (median and min reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per row before timing")
    parser.add_argument("--quick", action="store_true", help="slow rows (Score-CAMs, pgc AblationCAM): 1 run, no warm-up")
    parser.add_argument("--profile", action="store_true", help="print FD-CAM's phase breakdown per model")
    parser.add_argument("--profile-precision", default="fp32", choices=("fp32", "tf32", "bf16", "fp16"),
                        help="precision of the profiled FD-CAM (its batch is --batch)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch < 1 or args.repeat < 1 or args.warmup < 0:
        raise SystemExit("--batch and --repeat must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    names = [n.strip().lower().replace("-", "_") for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODEL_NAMES]
    if unknown:
        raise SystemExit(f"unknown --models {', '.join(unknown)}; known: {', '.join(MODEL_NAMES)}")
    rows = select_rows(args.methods)
    if REFERENCE not in [row.key for row in rows]:
        rows.insert(0, next(row for row in ROWS if row.key == REFERENCE))  # the ratio's reference
    info = machine_info(device)
    print(format_machine(info), flush=True)
    results: list[Result] = []
    profiles: dict[str, dict[str, float]] = {}
    for name in names:
        try:
            bm = load_model(name, device)
        except Exception as error:
            print(f"{name}: skipped ({_one_line(error)})", flush=True)
            results.append(Result(name, "*", "-", "-", "-", "-", device.type, status="skipped", reason=_one_line(error)))
            continue
        model_results = run_model(rows, bm, device, args)
        reference = next((r for r in model_results if r.method == REFERENCE and r.status == "ok"), None)
        for r in model_results:
            if reference is not None and r.status == "ok":
                r.ratio_to_pgc_gradcam = r.median_ms / reference.median_ms
        results.extend(model_results)
        if args.profile:
            try:
                profiles[name] = profile_fdcam(bm, device, args.repeat, args.batch, args.profile_precision)
            except Exception as error:
                print(f"profile of {name} failed: {_one_line(error)}")
        del bm
        gc.collect()
    print()
    print(format_table(results, args.batch))
    for name, profile in profiles.items():
        print()
        print(format_profile(name, profile, args.batch, args.profile_precision))
    if args.json:
        payload = {
            "machine": info,
            "config": {
                "device": device.type, "models": names, "rows": [row.key for row in rows], "batch": args.batch,
                "repeat": args.repeat, "warmup": args.warmup, "quick": args.quick,
                "command": "python -m benchmarks.latency " + " ".join(argv if argv is not None else sys.argv[1:]),
            },
            "results": [r.__dict__ for r in results],
            "profile": profiles,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
