"""The rows of the latency table: what each runs.

fdcam methods, pytorch-grad-cam, the explainer graph, the authors' loop.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import fdcam
from fdcam import models
from fdcam.errors import first_line

from .authors import AuthorsFDCAM
from .models import BenchModel

__all__ = ["REFERENCE", "ROWS", "ROW_KEYS", "Row", "Runner", "one_line", "select_rows", "unavailable"]

REFERENCE = "pgc-gradcam"


@dataclass
class Row:
    key: str
    library: str  # "fdcam", "pytorch-grad-cam" or "authors' loop"
    label: str
    build: Callable[[BenchModel], Runner]
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
        return Runner(lambda x: cam(x, targets=bm.targets(x)))

    return build


def _pgc_row(cls_name: str):
    """pytorch-grad-cam with its defaults. Its hooks live only around its own calls (between calls they
    would run on, and copy activations from, every other row's forward of the same model)."""

    def build(bm: BenchModel) -> Runner:
        import pytorch_grad_cam
        from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients

        layer = bm.model.get_submodule(bm.layer)
        model = bm.pgc_model if bm.pgc_model is not None else bm.model
        options = {"ablation_layer": _keyword_tolerant_ablation_layer()} if cls_name == "AblationCAM" else {}
        cam = getattr(pytorch_grad_cam, cls_name)(model=model, target_layers=[layer], **options)
        cam.activations_and_grads.release()

        def before():
            cam.activations_and_grads = ActivationsAndGradients(model, [layer], cam.reshape_transform, cam.detach)

        def after():
            cam.activations_and_grads.release()
            bm.model.zero_grad(set_to_none=True)  # pgc's backward leaves parameter gradients behind
            _put_back(bm.model, bm.layer, layer)  # pgc's AblationCAM swaps the layer and, on error, leaves it swapped

        return Runner(lambda x: cam(input_tensor=x, targets=bm.pgc_targets(x)), before, after, after)

    return build


def _keyword_tolerant_ablation_layer() -> nn.Module:
    """pgc's AblationLayer, callable with the keyword arguments some blocks get from their parent.

    EfficientNet-Lite0 calls its blocks as `block(x, drop_connect_rate=r)`; pgc's layer takes only x. The
    rate does nothing in eval mode, so dropping it leaves pgc's computation unchanged (pgc takes a
    custom `ablation_layer` for such architectures).
    """
    from pytorch_grad_cam.ablation_layer import AblationLayer

    class KeywordTolerantAblationLayer(AblationLayer):
        def __call__(self, x, *args, **kwargs):
            return super().__call__(x)

    return KeywordTolerantAblationLayer()


def _explainer_row(method: str):
    """The exported explainer graph (image → logits, targets, saliency) in an ONNX Runtime session."""

    def build(bm: BenchModel) -> Runner:
        import tempfile

        import onnxruntime as ort

        from fdcam.export import export_explainer

        directory = tempfile.TemporaryDirectory(prefix="fdcam-bench-explainer-")
        device = bm.x.device
        model = bm.model if device.type == "cpu" else _cpu_copy(bm.model)
        path = export_explainer(
            model, Path(directory.name) / "explainer.onnx", bm.layer, method, input_size=tuple(bm.x.shape[-2:])
        )
        providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # The rows run interleaved: a session whose threads spin after its run takes the cores from the next row
        # (alternating ResNet-50's two graphs with spinning measured 117/87 ms against 85/53 ms each alone).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
    copied.fdcam_spec = models.spec_of(model)
    return copied


def _put_back(model: nn.Module, name: str, layer: nn.Module) -> None:
    if model.get_submodule(name) is not layer:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def _authors_row(bm: BenchModel) -> Runner:
    cam = AuthorsFDCAM(bm.model, bm.layer)
    return Runner(lambda x: cam(x))


def _ort_row(precision: str, devices: tuple[str, ...] = ("cpu", "cuda")) -> Row:
    """FD-CAM with its switch passes on the ONNX Runtime tail at `precision`."""
    options = {"backend": "onnxruntime", "precision": precision}
    build = _fdcam_row("FDCAM", **options)
    return Row(f"fdcam-ort-{precision}", "fdcam", "FD-CAM", build, **options, devices=devices, needs="ort")


ROWS: list[Row] = [
    Row("fdcam", "fdcam", "FD-CAM", _fdcam_row("FDCAM")),
    Row("fdcam-tf32", "fdcam", "FD-CAM", _fdcam_row("FDCAM", precision="tf32"), precision="tf32", devices=("cuda",)),
    Row("fdcam-bf16", "fdcam", "FD-CAM", _fdcam_row("FDCAM", precision="bf16"), precision="bf16", devices=("cuda",)),
    Row("fdcam-graph", "fdcam", "FD-CAM (CUDA graph)", _fdcam_row("FDCAM", cuda_graph=True), devices=("cuda",)),
    Row(
        "fdcam-graph-tf32",
        "fdcam",
        "FD-CAM (CUDA graph)",
        _fdcam_row("FDCAM", precision="tf32", cuda_graph=True),
        precision="tf32",
        devices=("cuda",),
    ),
    _ort_row("fp32"),
    _ort_row("tf32", devices=("cuda",)),
    _ort_row("fp16", devices=("cuda",)),
    Row("gradcam", "fdcam", "Grad-CAM", _fdcam_row("GradCAM")),
    Row("ablationcam", "fdcam", "Ablation-CAM", _fdcam_row("AblationCAM")),
    Row("scorecam", "fdcam", "Score-CAM", _fdcam_row("ScoreCAM"), slow=True),
    Row("groupcam", "fdcam", "Group-CAM", _fdcam_row("GroupCAM")),
    Row("pgc-gradcam", "pytorch-grad-cam", "GradCAM", _pgc_row("GradCAM"), needs="pgc"),
    Row("pgc-ablationcam", "pytorch-grad-cam", "AblationCAM", _pgc_row("AblationCAM"), slow=True, needs="pgc"),
    Row("pgc-scorecam", "pytorch-grad-cam", "ScoreCAM", _pgc_row("ScoreCAM"), slow=True, needs="pgc"),
    Row(
        "explainer-fdcam",
        "fdcam",
        "FD-CAM (one ONNX graph)",
        _explainer_row("fdcam"),
        backend="onnxruntime",
        needs="ort",
    ),
    Row(
        "explainer-gradcam",
        "fdcam",
        "Grad-CAM (one ONNX graph)",
        _explainer_row("gradcam"),
        backend="onnxruntime",
        needs="ort",
    ),
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


def unavailable(row: Row, device: torch.device) -> str | None:
    if device.type not in row.devices:
        return f"{row.key} runs on CUDA only"
    if row.needs == "pgc":
        try:
            import pytorch_grad_cam  # noqa: F401
        except Exception as error:
            return f"pytorch-grad-cam not importable ({one_line(error)})"
        _quiet_pgc()
    if row.needs == "ort":
        try:
            import fdcam.runtime  # noqa: F401
        except Exception as error:
            return f"fdcam.runtime not importable ({one_line(error)})"
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


def one_line(error: BaseException) -> str:
    """The error's type and the first line of its message, for a skipped row."""
    return f"{type(error).__name__}: {first_line(error, 160)}" if str(error).strip() else type(error).__name__
