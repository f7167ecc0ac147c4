"""fdcam.export.graph_tail: the explainer graph's switch passes, checked against the plain masked tail."""

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import fdcam
from fdcam.export import export_explainer
from fdcam.export.graph_tail import GraphTail, per_image
from fdcam.factorise import max_group_size
from fdcam.groups import channel_groups
from fdcam.split import split_model
from fdcam.switch import switch_masks
from fdcam.tail import MaskedTail
from nets import ConvStart

# Logits of a few hundred float32 products: the gathered and shared-sum orders differ from the plain
# pass by rounding only, a few ulps of the largest logit each.
RTOL = 1e-5


@pytest.fixture(scope="module")
def resnet50_random():
    torch.manual_seed(0)
    return fdcam.models.load("resnet50", weights=None)


def plain_logits(split, features, extras, masks, classes):
    """The reference: every masked copy through the unmodified tail, then the classes' logits."""
    logits = MaskedTail(split.tail)(features, masks, *extras)
    return logits.gather(2, classes[:, None, :].expand(-1, masks.shape[1], -1))


def check_passes(model, layer, size, theta=0.95, grouping=True, **engine_options):
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    split = split_model(model, layer, images[:1])
    classes = torch.tensor([[3, 5], [7, 1]])
    with torch.no_grad():
        features, *extras = split.head(images)
        engine = GraphTail(split.tail, features, extras, **engine_options)
        k = features.shape[1]
        groups = channel_groups(features, theta) if grouping else torch.eye(k, dtype=torch.bool).expand(2, k, k)
        sparsity = max_group_size(k, theta) if grouping else 1
        for switch in ("on_off", "off"):
            masks = switch_masks(groups, switch)
            expected = plain_logits(split, features, extras, masks, classes)
            scale = float(expected.abs().max())
            for i in range(2):
                rows = [e[i : i + 1] for e in extras]
                dense = engine.image_passes(features[i : i + 1], masks[i : i + 1], rows, classes[i : i + 1], sparsity)
                one = (features[i : i + 1], groups[i : i + 1], rows, classes[i : i + 1], sparsity, switch)
                shared = engine.image_group_passes(*one)
                assert dense.shape == shared.shape == (1, masks.shape[1], 2)
                assert (dense[0] - expected[i]).abs().max() <= RTOL * scale
                assert (shared[0] - expected[i]).abs().max() <= RTOL * scale
    return engine


def test_a_pointwise_convolution_tail_in_cache_sized_chunks_equals_the_masked_tail(lite0):
    engine = check_passes(lite0, "_blocks.15", 224)
    assert engine.shortcut.kind == "conv" and engine.gather_rows < 320  # several chunks per image


def test_a_pool_and_linear_tail_equals_the_masked_tail(resnet50_random):
    engine = check_passes(resnet50_random, "layer4", 96)
    assert engine.shortcut.kind == "linear" and engine.shortcut.first_is_final


def test_a_pointwise_convolution_whose_activation_runs_in_place_equals_the_masked_tail(tmp_path):
    # The graph's channel sets take each switch-off row from the product before the body runs on the switch-on
    # rows: a first activation that runs in place must not reach them, eager or exported (the export checks its
    # maps against the library's).
    torch.manual_seed(4)
    model = ConvStart(kernel=1, activation=torch.relu_, channels=(24, 16), classes=8).eval()
    engine = check_passes(model, "stem", 12)
    features = torch.zeros(1, 24, 12, 12)
    assert engine.plan(features, 24, max_group_size(24, 0.95), groups=True).form == "sets"
    export_explainer(model, tmp_path / "e.onnx", "stem", "fdcam", True, input_size=(12, 12))


class VggShaped(torch.nn.Module):
    """VGG's layout in small: convolutions, a pool, then Linear → in-place ReLU → Linear → in-place ReLU → Linear."""

    def __init__(self):
        super().__init__()
        relu = lambda: torch.nn.ReLU(inplace=True)  # noqa: E731
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1),
            relu(),
            torch.nn.Conv2d(16, 32, 3, padding=1),
            relu(),
            torch.nn.MaxPool2d(2),
        )
        self.avgpool = torch.nn.AdaptiveAvgPool2d(2)
        self.classifier = torch.nn.Sequential(
            torch.nn.Linear(32 * 4, 48),
            relu(),
            torch.nn.Dropout(),
            torch.nn.Linear(48, 40),
            relu(),
            torch.nn.Linear(40, 10),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@pytest.fixture(scope="module")
def vgg_shaped():
    torch.manual_seed(3)
    return VggShaped().eval()


def test_a_first_linear_with_a_body_in_several_chunks_equals_the_masked_tail(vgg_shaped):
    # A row costs 4·(48 + 32)·4 bytes: 20 rows per chunk, so each switch's 32 rows take two chunks.
    engine = check_passes(vgg_shaped, "features.4", 16, budget=20 * 4 * 80 * 4)
    assert engine.shortcut.kind == "linear" and not engine.shortcut.first_is_final and engine.rows == 20


def test_a_first_linear_with_a_body_exports_without_writing_its_rows_back(vgg_shaped, tmp_path):
    # The body's in-place ReLU on rows viewed from one block was exported as a ScatterElements over all the
    # rows (65 ms of VGG16's graph); the export's own validation checks the maps against the library's.
    path = export_explainer(vgg_shaped, tmp_path / "e.onnx", "features.4", "fdcam", True, input_size=(16, 16))

    def subgraphs(node):
        for attribute in node.attribute:
            yield from ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else []) + list(attribute.graphs)

    scans = [node for node in onnx.load(str(path)).graph.node if node.op_type == "Scan"]
    body = {node.op_type for scan in scans for graph in subgraphs(scan) for node in graph.node}
    assert len(scans) == 1 and {"Gemm", "Relu"} <= body and "ScatterElements" not in body


def test_single_channel_groups_and_a_tail_without_shortcut_equal_the_masked_tail(lite0, resnet50_random):
    check_passes(lite0, "_blocks.15", 96, grouping=False)
    engine = check_passes(resnet50_random, "layer4.2.conv3", 64)  # the skip tensor crosses the split
    assert engine.shortcut is None or engine.shortcut.kind != "linear"


def test_per_image_exports_to_an_onnx_scan_over_any_batch(tmp_path):
    # The scan traces (make_fx, as the explainer does) and exports with a symbolic batch to one Scan node.
    from torch.fx.experimental.proxy_tensor import make_fx

    weight = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))

    def image(features, masks, weight):  # features [1,8,5], masks [1,6,8] -> [1,6]
        return (masks @ (features.sum(-1)[..., None] * weight)).relu().sum(-1)

    def batch(weight, features, masks):
        return per_image(lambda f, m: image(f, m, weight), [features, masks])

    class Traced(torch.nn.Module):
        def __init__(self, graph):
            super().__init__()
            self.graph = graph
            self.register_buffer("weight", weight)

        def forward(self, features, masks):
            return self.graph(self.weight, features, masks)

    features, masks = torch.randn(2, 8, 5), torch.rand(2, 6, 8)
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (
        DimDynamic,
        ShapeEnv,
        StatelessSymbolicContext,
    )

    mode = FakeTensorMode(shape_env=ShapeEnv())

    def fake(tensor, batched=True):
        sizes = [DimDynamic.DYNAMIC if batched and d == 0 else DimDynamic.STATIC for d in range(tensor.dim())]
        return mode.from_tensor(tensor, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))

    traced = make_fx(batch, tracing_mode="symbolic")(fake(weight, False), fake(features), fake(masks))
    path = tmp_path / "scan.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch_dim = torch.export.Dim("N", min=1)
        program = torch.onnx.export(
            Traced(traced),
            (features, masks),
            input_names=["features", "masks"],
            output_names=["out"],
            dynamo=True,
            dynamic_shapes=({0: batch_dim}, {0: batch_dim}),
            opset_version=18,
            verbose=False,
        )
    program.save(str(path))
    assert "Scan" in {node.op_type for node in onnx.load(str(path)).graph.node}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        f = torch.randn(n, 8, 5, generator=torch.Generator().manual_seed(n))
        m = torch.rand(n, 6, 8, generator=torch.Generator().manual_seed(n))
        expected = torch.cat([image(f[i : i + 1], m[i : i + 1], weight) for i in range(n)])
        (got,) = session.run(None, {"features": f.numpy(), "masks": m.numpy()})
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)


_GROWTH = textwrap.dedent(
    """
    import sys
    import numpy as np, onnxruntime as ort
    status = lambda key: int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
    path, batch = sys.argv[1], int(sys.argv[2])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    before = status("VmRSS")  # resident now, after the session's setup
    # The peak (VmHWM) restarts here. Not ru_maxrss: a child's starts at its parent's resident size (the
    # test process's gigabytes), which it keeps through exec.
    open("/proc/self/clear_refs", "w").write("5")
    session.run(["saliency"], {"image": image})
    print(status("VmHWM") - before)  # the run's peak above it
    """
)


@pytest.mark.slow
def test_lite0_graph_at_batch_8_grows_the_process_by_less_than_2_gb(lite0_fdcam):
    # Before the Scan the graph held every image's masked rows at once: +4.1 GB at batch 8. The graph is the
    # session's Lite0 FD-CAM export (conftest), the same default options this test exported before.
    run = subprocess.run(
        [sys.executable, "-c", _GROWTH, str(lite0_fdcam), "8"], check=True, capture_output=True, text=True
    )
    grown = int(run.stdout)
    assert grown < 2 * 1024**3


def test_unused_initializers_are_dropped_from_subgraphs_and_used_ones_kept():
    from onnx import TensorProto, helper

    from fdcam.export.graph_tail import drop_unused_initializers

    def constant(name):
        return helper.make_tensor(name, TensorProto.FLOAT, [1], [1.0])

    def branch(name, used):
        return helper.make_graph(
            [helper.make_node("Add", ["x", used], [f"{name}_out"])],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1])],
            initializer=[constant(used), constant(f"{name}_unused")],
        )

    node = helper.make_node("If", ["flag"], ["y"], then_branch=branch("then", "a"), else_branch=branch("else", "b"))
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, t, [1]) for n, t in (("flag", TensorProto.BOOL), ("x", TensorProto.FLOAT))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=[constant("outer_unused")],
    )
    drop_unused_initializers(graph)
    assert [t.name for t in graph.initializer] == []
    branches = {a.name: [t.name for t in a.g.initializer] for a in graph.node[0].attribute}
    assert branches == {"then_branch": ["a"], "else_branch": ["b"]}
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([2.0], dtype=np.float32)
    assert session.run(None, {"flag": np.array([True]), "x": x})[0][0] == 3.0
