"""fdcam.export.tracing: torch.onnx.export's decomposition pass is skipped only where it would change nothing."""

from collections import Counter

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

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


def _export(model, layer, path, monkeypatch, skip: bool, method: str = "fdcam"):
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


def test_a_graph_without_mutations_skips_the_pass_and_exports_the_same_graph(tmp_path, monkeypatch):
    model = small_net()
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


def test_a_graph_with_a_mutation_still_gets_the_pass(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(inplace=True),  # an in-place op in the tail: the pass removes it
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()
    _, runs = _export(model, "1", tmp_path / "e.onnx", monkeypatch, skip=True, method="gradcam")
    assert runs == 1
