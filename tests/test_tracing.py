"""fdcam.export.tracing: torch.onnx.export's decomposition pass is skipped only where it would change nothing."""

from collections import Counter

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import fdcam.export.tracing as tracing
from fdcam.export import export_explainer, run_explainer
from nets import small_images, small_net


def _op_counts(graph: onnx.GraphProto) -> Counter:
    counts = Counter(node.op_type for node in graph.node)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:  # the chunks' Scan body
                counts += _op_counts(attribute.g)
    return counts


def _export(model, layer, path, monkeypatch, skip: bool, method: str = "gradcam"):
    """The export's graph and how often the decomposition pass itself ran."""
    from torch.onnx._internal.exporter import _fx_passes

    runs = []
    original = _fx_passes.decompose_with_registry

    def counted(program, registry):
        runs.append(program)
        return original(program, registry)

    with monkeypatch.context() as patch:
        patch.setattr(_fx_passes, "decompose_with_registry", counted)
        patch.setattr(tracing, "SKIP_IDLE_DECOMPOSITION", skip)
        exported = export_explainer(model, path, layer, method, True, input_size=(32, 32))
    return exported, len(runs)


@pytest.mark.slow  # two whole-graph exports
def test_a_graph_without_mutations_skips_the_pass_and_exports_the_same_graph(tmp_path, monkeypatch):
    model = small_net()
    # Grad-CAM's graph: FD-CAM's (with the chunks' Scan) skips the pass in every Lite0 export, validated there.
    skipped, runs_skipped = _export(model, "conv3", tmp_path / "skipped.onnx", monkeypatch, skip=True)
    full, runs_full = _export(model, "conv3", tmp_path / "full.onnx", monkeypatch, skip=False)
    assert (runs_skipped, runs_full) == (0, 1)
    graphs = onnx.load(skipped).graph, onnx.load(full).graph
    assert _op_counts(graphs[0]) == _op_counts(graphs[1])
    constants = [sorted(onnx.numpy_helper.to_array(t).tobytes() for t in graph.initializer) for graph in graphs]
    assert constants[0] == constants[1]
    images, classes = small_images().numpy(), torch.tensor([[1, 2], [3, 4]]).numpy()
    (logits_a, targets_a, maps_a), (logits_b, targets_b, maps_b) = (
        run_explainer(ort.InferenceSession(str(path)), images, classes) for path in (skipped, full)
    )
    # The same operators on the same constants, in another order at most: float32 rounding apart.
    assert (targets_a == targets_b).all()
    assert logits_a == pytest.approx(logits_b, rel=1e-5, abs=1e-6) and maps_a == pytest.approx(maps_b, abs=1e-5)


def _with_in_place_ops() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=4, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.Hardswish(inplace=True),  # decomposed into x.copy_(f(x)): f reads x before the mutation
        nn.ReLU(inplace=True),  # a mutation of a fresh tensor, seen by nothing else
        nn.AdaptiveAvgPool2d(3),  # 4 → 3 pixels: `_adaptive_avg_pool2d`, which the ONNX registry lacks
        nn.Flatten(),
        nn.Linear(72, 5),
    ).eval()


def test_in_place_ops_nothing_else_sees_are_rewritten_and_the_pass_is_skipped(tmp_path, monkeypatch):
    # FD-CAM's graph: the gradient's ops at the top level, the switch passes in the chunks' scan body. The export
    # validates its graph against the library: the rewritten graph computes the model's maps.
    _, runs = _export(_with_in_place_ops(), "1", tmp_path / "e.onnx", monkeypatch, skip=True, method="fdcam")
    assert runs == 0


def _in_place_targets(function, *inputs) -> list[str]:
    """The in-place ops left in make_fx's graph of `function` after `_out_of_place`."""
    graph = make_fx(function)(*inputs)
    tracing._out_of_place(graph)
    table = {}
    return [str(node.target) for node in graph.graph.nodes if tracing._changed_by_decomposition(node, table)]


def _fresh_then_relu(x):
    y = x * 2
    y.relu_()
    return y + 1


def _read_before_relu(x):
    y = x * 2
    before = y.sum()
    y.relu_()  # `before` was read first: it holds the value before the mutation in either form
    return y + before


def _view_before_relu(x):
    y = x * 2
    view = y[:1]
    y.relu_()  # the view sees the mutation: the pass, not the rewrite, handles it
    return y + view.sum()


def _relu_through_a_view(x):
    y = x * 2
    y[:1].relu_()  # changes y through the view
    return y + 1


def _relu_of_a_private_view(x):
    y = (x * 2).view(-1)  # nothing but the view holds the fresh product
    y.relu_()
    return y + 1


def _relu_of_a_shared_view(x):
    y = x * 2
    flat = y.view(-1)
    flat.relu_()  # changes y, which is read below
    return y + flat.sum()


def _relu_of_the_input(x):
    return x.relu_() + 1


def test_only_in_place_ops_on_fresh_tensors_read_by_nothing_after_become_out_of_place():
    x = torch.randn(3, 4)
    assert _in_place_targets(_fresh_then_relu, x) == []
    assert _in_place_targets(_read_before_relu, x) == []
    assert _in_place_targets(_view_before_relu, x) == ["aten.relu_.default"]
    assert _in_place_targets(_relu_through_a_view, x) == ["aten.relu_.default"]
    assert _in_place_targets(_relu_of_a_private_view, x) == []
    assert _in_place_targets(_relu_of_a_shared_view, x) == ["aten.relu_.default"]
    assert _in_place_targets(_relu_of_the_input, x.clone()) == ["aten.relu_.default"]
    functions = (_fresh_then_relu, _read_before_relu, _view_before_relu, _relu_through_a_view)
    for function in (*functions, _relu_of_a_private_view, _relu_of_a_shared_view):
        graph = make_fx(function)(x)
        tracing._out_of_place(graph)
        assert torch.equal(graph(x.clone()), function(x.clone()))
