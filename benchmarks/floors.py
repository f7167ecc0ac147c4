"""The floors of FD-CAM's cost over a Grad-CAM: the primitives the exact method cannot skip, timed alone.

    python -m benchmarks.floors [--models resnet50,vgg16] [--repeat 9] [--graph-gradcam resnet50=45.3] [--json F]

What FD-CAM adds to a Grad-CAM holds one step per model that no reordering removes:

- ResNet-50 `layer4` (2048 maps of 7×7): the groups need each row's two order statistics at the 0.95 quantile
  of the 2048×2048 cosine matrix, a per-row selection of its top values (`fdcam.groups`: torch.topk on the
  float32 bits as int32, the fastest exact selection torch has on CPUs; the explainer graph runs ONNX
  Runtime's TopK), after the float32 product U·Uᵀ of the unit maps. Both are timed over whole rows and from
  the blocks of four with the largest maxima (two selections over a quarter of the row each, as the library
  selects); the floor takes the faster.
- VGG16 `features.30`: the second Linear (4096×4096) on every switch row (2K = 1024), one GEMM, after the
  first Linear's per-channel contributions.

Each primitive is timed on the model's own activations (random seeded weights, the benchmark's image) in torch
and in ONNX Runtime (a one-node graph), and set against the library's Grad-CAM timed in the same process. The
floor ratio (Grad-CAM + primitives) / Grad-CAM is the least FD-CAM / Grad-CAM any exact engine reaches on this
machine; the graph's needs its Grad-CAM time from benchmarks.latency (`explainer-gradcam`), given with
`--graph-gradcam`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

import fdcam
from fdcam.groups import _select_top  # the library's row selection, timed as it runs

from .latency.models import load_model
from .latency.report import format_machine, machine_info
from .latency.timing import timed

__all__ = ["main", "model_floors"]

_QUANTILE = 0.95
_CHECK_EXTRA = 16  # the values below the order statistic that fdcam.groups also selects, to check in float64
_SWITCH_ROWS_PER_CHANNEL = 2  # FD-CAM's switch-on and switch-off row of each channel's group


def _median_ms(function: Callable[[], object], repeat: int) -> float:
    function()  # warm-up: allocations, ONNX Runtime's first-run plans
    return statistics.median(timed(function, torch.device("cpu"), repeat)[1]) * 1e3


def _ort_session(node: onnx.NodeProto, inputs, outputs, initializers=()) -> ort.InferenceSession:
    graph = helper.make_graph([node], "floor", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _tensor(name: str, dtype: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def block_selection_session(k: int, count: int) -> ort.InferenceSession:
    """ONNX Runtime's form of `fdcam.groups._select_top`: each row's `count` largest values [K,count] (unordered) of
    a [K,K] float matrix, taken from the `count` blocks of four with the largest maxima (MaxPool, TopK, Gather, TopK).
    """
    blocks = k // 4
    initializers = [
        numpy_helper.from_array(np.array([count], dtype=np.int64), "count"),
        numpy_helper.from_array(np.array([1, k, k], dtype=np.int64), "as_pool_input"),
        numpy_helper.from_array(np.array([k, blocks], dtype=np.int64), "as_maxima"),
        numpy_helper.from_array(np.array([k * blocks, 4], dtype=np.int64), "as_blocks"),
        numpy_helper.from_array(np.array([k, 4 * count], dtype=np.int64), "as_candidates"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"),
        numpy_helper.from_array((np.arange(k, dtype=np.int64) * blocks)[:, None], "first_block"),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "as_pool_input"], ["pool_input"]),
        helper.make_node("MaxPool", ["pool_input"], ["pooled"], kernel_shape=[4], strides=[4]),
        helper.make_node("Reshape", ["pooled", "as_maxima"], ["maxima"]),
        helper.make_node("TopK", ["maxima", "count"], ["_", "chosen"], axis=-1, largest=1, sorted=0),
        helper.make_node("Add", ["chosen", "first_block"], ["chosen_rows"]),
        helper.make_node("Reshape", ["chosen_rows", "flat"], ["chosen_flat"]),
        helper.make_node("Reshape", ["x", "as_blocks"], ["block_rows"]),
        helper.make_node("Gather", ["block_rows", "chosen_flat"], ["gathered"], axis=0),
        helper.make_node("Reshape", ["gathered", "as_candidates"], ["candidates"]),
        helper.make_node("TopK", ["candidates", "count"], ["values", "position"], axis=-1, largest=1, sorted=0),
    ]
    graph = helper.make_graph(
        nodes,
        "block_selection",
        [_tensor("x", TensorProto.FLOAT, [k, k])],
        [_tensor("values", TensorProto.FLOAT, None)],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def grouping_primitives(activations: torch.Tensor, repeat: int) -> dict[str, float]:
    """Median ms of the cosine product and of the per-row top selection of one image's activations [K,h,w], the
    selection over whole rows and, where rows hold four times as many blocks of four as values selected, from the
    blocks with the largest maxima (the library's, `fdcam.groups._select_top`)."""
    k = activations.shape[0]
    flat = activations.flatten(-2).float()
    unit = flat / flat.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    similarity = unit @ unit.T
    count = min(k, k - int(_QUANTILE * (k - 1)) + _CHECK_EXTRA)
    bits = similarity.view(torch.int32)  # non-negative maps (after a ReLU): their bits order as the values
    selection = _ort_session(
        helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=-1, largest=1, sorted=0),
        [_tensor("x", TensorProto.FLOAT, [k, k]), _tensor("k", TensorProto.INT64, [1])],
        [_tensor("values", TensorProto.FLOAT, None), _tensor("indices", TensorProto.INT64, None)],
    )
    product = _ort_session(
        helper.make_node("MatMul", ["u", "ut"], ["s"]),
        [_tensor("u", TensorProto.FLOAT, list(unit.shape)), _tensor("ut", TensorProto.FLOAT, [unit.shape[1], k])],
        [_tensor("s", TensorProto.FLOAT, None)],
    )
    feeds = {"x": similarity.numpy(), "k": np.array([count], dtype=np.int64)}
    pair = {"u": unit.numpy(), "ut": np.ascontiguousarray(unit.T.numpy())}
    times = {
        "cosine product, torch": _median_ms(lambda: unit @ unit.T, repeat),
        "cosine product, onnxruntime": _median_ms(lambda: product.run(None, pair), repeat),
        f"top {count} of each row, torch (int32 bits)": _median_ms(
            lambda: bits.topk(count, dim=-1, sorted=False), repeat
        ),
        f"top {count} of each row, onnxruntime TopK": _median_ms(lambda: selection.run(None, feeds), repeat),
    }
    if k % 4 == 0 and k // 4 >= 4 * count:
        blocks = block_selection_session(k, count)
        times[f"top {count} of each row from blocks, torch (int32 bits)"] = _median_ms(
            lambda: _select_top(bits, count, float_bits=True), repeat
        )
        times[f"top {count} of each row from blocks, onnxruntime"] = _median_ms(
            lambda: blocks.run(None, {"x": feeds["x"]}), repeat
        )
    return times


def linear_primitives(linear: torch.nn.Linear, rows: int, repeat: int) -> dict[str, float]:
    """Median ms of one Linear on `rows` rows in torch and in ONNX Runtime (Gemm)."""
    x = torch.randn(rows, linear.in_features)
    weight = linear.weight.detach().float()
    gemm = _ort_session(
        helper.make_node("Gemm", ["x", "w"], ["y"], transB=1),
        [_tensor("x", TensorProto.FLOAT, list(x.shape))],
        [_tensor("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight.numpy(), "w")],
    )
    shape = f"[{rows},{linear.in_features}]×[{linear.in_features},{linear.out_features}]"
    feeds = {"x": x.numpy()}
    return {
        f"Linear {shape}, torch": _median_ms(lambda: torch.mm(x, weight.T), repeat),
        f"Linear {shape}, onnxruntime": _median_ms(lambda: gemm.run(None, feeds), repeat),
    }


def model_floors(name: str, repeat: int) -> dict[str, object]:
    """The model's primitives and its library Grad-CAM (median ms) and the torch floor ratio."""
    bm = load_model(name, torch.device("cpu"))
    cam = fdcam.GradCAM(bm.model, bm.layer)
    gradcam_ms = _median_ms(lambda: cam(bm.x), repeat)
    with torch.no_grad():
        activations = cam.split_for(bm.x).head(bm.x)[0][0]
    if name == "vgg16":
        # The first Linear is factorised into per-channel sums; the second runs on every switch row.
        primitives = linear_primitives(bm.model.classifier[3], _SWITCH_ROWS_PER_CHANNEL * activations.shape[0], repeat)
    else:
        primitives = grouping_primitives(activations, repeat)
    cam.close()
    return {"model": name, "layer": bm.layer, "gradcam_torch_ms": gradcam_ms, "primitives_ms": primitives}


def _engine_primitives(primitives: dict[str, float], engine: str) -> dict[str, float]:
    return {key: ms for key, ms in primitives.items() if f", {engine}" in key}


def _added_ms(primitives: dict[str, float]) -> float:
    """What an engine's primitives add: each step once, the fastest of its forms (a row selection over whole rows
    or from blocks)."""
    selections = [ms for key, ms in primitives.items() if " of each row" in key]
    others = [ms for key, ms in primitives.items() if " of each row" not in key]
    return sum(others) + (min(selections) if selections else 0.0)


def format_floors(floors: list[dict[str, object]], graph_gradcam: dict[str, float]) -> str:
    """The primitives, then per model and engine the floor of FD-CAM / Grad-CAM."""
    lines = []
    for floor in floors:
        lines.append(
            f"{floor['model']} `{floor['layer']}`: library Grad-CAM (torch) {floor['gradcam_torch_ms']:.1f} ms"
        )
        for key, ms in floor["primitives_ms"].items():
            lines.append(f"  {key:<58} {ms:8.1f} ms")
        for engine, gradcam_ms in (
            ("torch", floor["gradcam_torch_ms"]),
            ("onnxruntime", graph_gradcam.get(floor["model"])),
        ):
            added = _added_ms(_engine_primitives(floor["primitives_ms"], engine))
            if gradcam_ms is None:
                lines.append(
                    f"  floor, {engine}: + {added:.1f} ms (give --graph-gradcam {floor['model']}=MS for the ratio)"
                )
                continue
            ratio = (gradcam_ms + added) / gradcam_ms
            lines.append(f"  floor, {engine}: ({gradcam_ms:.1f} + {added:.1f}) / {gradcam_ms:.1f} = {ratio:.2f}x")
    return "\n".join(lines)


def _parse_times(text: str) -> dict[str, float]:
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    try:
        return {name.strip(): float(ms) for name, ms in pairs}
    except ValueError:
        raise SystemExit(f"error: --graph-gradcam takes model=ms pairs separated by commas, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floors", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet50,vgg16", help="comma-separated: resnet50, vgg16")
    parser.add_argument("--repeat", type=int, default=9, help="timed calls per primitive (median)")
    parser.add_argument(
        "--graph-gradcam", default="", help="the explainer graph's Grad-CAM ms per model, e.g. resnet50=45.3"
    )
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = sorted(set(names) - {"resnet50", "vgg16"})
    if unknown:
        print(f"error: no floor is defined for {', '.join(unknown)}; models: resnet50, vgg16", file=sys.stderr)
        return 2
    graph_gradcam = _parse_times(args.graph_gradcam)
    print(format_machine(machine_info(torch.device("cpu"))))
    floors = [model_floors(name, max(1, args.repeat)) for name in names]
    print(format_floors(floors, graph_gradcam))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"machine": machine_info(torch.device("cpu")), "floors": floors, "graph_gradcam_ms": graph_gradcam},
                handle,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
