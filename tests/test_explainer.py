"""fdcam.export.explainer: the whole explanation as one ONNX graph, checked against the library's own maps."""

import copy
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import fdcam
from fdcam.export import ExportError, export_explainer, export_explainer_full, read_metadata, run_explainer
from fdcam.export import explainer as explainer_module

# Maps live in [0,1]; float32 graphs of a few hundred ops differ from torch by ~1e-6 here, and the
# bound leaves two orders of magnitude for another CPU's summation order.
SALIENCY_ATOL = 1e-4
LOGITS_RTOL = 1e-4


def dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def assert_matches_library(graph, model, layer, method, images, classes=None, ill_conditioned=False, **options):
    """The graph's outputs (a path, or the export's own validation session) equal the library's. With
    `ill_conditioned` (random-weight models whose maps float32 cannot pin down to 1e-4), the bound grows by how far
    the library itself strays from float64."""
    graph = graph if isinstance(graph, ort.InferenceSession) else session(graph)
    logits, targets, saliency = run_explainer(graph, images.numpy(), None if classes is None else classes.numpy())
    with torch.no_grad():
        expected_logits = model(images)
    expected_targets = classes if classes is not None else expected_logits.argmax(1, keepdim=True)
    expected = fdcam.METHODS[method](model, layer, **options)(images, expected_targets)
    np.testing.assert_array_equal(targets, expected_targets.numpy())
    assert saliency.shape == tuple(expected.shape)
    assert saliency.min() >= 0.0 and saliency.max() <= 1.0
    error = np.abs(saliency - expected.numpy()).max()
    if ill_conditioned and error > SALIENCY_ATOL:
        # Then float32 must be what moves the maps: the library's own batched and per-image paths stray from
        # exact (float64) arithmetic by more than 1e-4, and the graph must stay within the export's bound.
        in_float64 = fdcam.METHODS[method](copy.deepcopy(model).double(), layer, **options)
        exact = in_float64(images.double(), expected_targets).double()
        cams = [fdcam.METHODS[method](model, layer, **options) for _ in images]  # a new explainer per image
        singles = torch.cat([cam(images[i : i + 1], expected_targets[i : i + 1]) for i, cam in enumerate(cams)])
        floor = max(float((expected.double() - exact).abs().max()), float((singles.double() - exact).abs().max()))
        assert floor > SALIENCY_ATOL / 2
        assert np.abs(saliency - exact.numpy()).max() <= SALIENCY_ATOL + explainer_module.ILL_CONDITIONED_FACTOR * floor
    else:
        assert error <= SALIENCY_ATOL
    assert np.abs(logits - expected_logits.numpy()).max() <= LOGITS_RTOL * float(expected_logits.abs().max())
    return saliency


@pytest.mark.slow  # reads a whole-graph export of Lite0
def test_graph_io_is_image_to_logits_targets_saliency_with_a_symbolic_batch(lite0_fdcam, lite0_fdcam_classes):
    proto = onnx.load(str(lite0_fdcam))
    assert [value.name for value in proto.graph.input] == ["image"]
    image = proto.graph.input[0]
    assert image.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    batch = dims(image)[0]
    assert isinstance(batch, str) and dims(image)[1:] == [3, 224, 224]
    outputs = {value.name: value for value in proto.graph.output}
    assert list(outputs) == ["logits", "targets", "saliency"]
    assert dims(outputs["logits"]) == [batch, 1000]
    assert outputs["targets"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert dims(outputs["saliency"])[0] == batch and dims(outputs["saliency"])[2:] == [224, 224]

    with_classes = onnx.load(str(lite0_fdcam_classes))
    classes = with_classes.graph.input[1]
    assert classes.name == "classes" and classes.type.tensor_type.elem_type == onnx.TensorProto.INT64
    n, t = dims(classes)
    assert isinstance(n, str) and isinstance(t, str) and n != t
    assert dims(with_classes.graph.output[2])[:2] == [n, t]


@pytest.mark.slow  # reads a whole-graph export of Lite0
def test_graph_uses_only_standard_operators_and_carries_its_weights(lite0_fdcam, lite0):
    proto = onnx.load(str(lite0_fdcam))
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}
    assert [entry.domain for entry in proto.opset_import] in ([""], ["ai.onnx"])
    assert not (lite0_fdcam.parent / (lite0_fdcam.name + ".data")).exists()
    weights = sum(int(np.prod(tensor.dims)) for tensor in proto.graph.initializer)
    model_parameters = sum(p.numel() for p in lite0.parameters())
    assert weights >= 0.9 * model_parameters  # the weights are inside the file


@pytest.mark.slow  # reads a whole-graph export of Lite0
def test_metadata_in_the_graph_and_the_json(lite0_fdcam):
    meta = read_metadata(lite0_fdcam)
    assert meta["model"] == "efficientnet_lite0" and meta["target_layer"] == "_blocks.15"
    assert meta["method"] == "fdcam" and meta["input_size"] == "224x224"
    assert json.loads(meta["method_options"]) == {
        "theta": 0.95,
        "bias": 0.5,
        "combine": "exp",
        "switch": "on_off",
        "grouping": True,
    }
    assert meta["opset"] == str(onnx.load(str(lite0_fdcam), load_external_data=False).opset_import[0].version)
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    names = json.loads(meta["class_names"])
    assert len(names) == 1000 and names[340] == "zebra"
    for key in ("torch_version", "onnx_version", "onnxruntime_version", "fdcam_version"):
        assert meta[key]
    description = json.loads(lite0_fdcam.with_suffix(".json").read_text())
    assert description["method"] == "fdcam" and description["method_options"]["theta"] == 0.95
    # Typed JSON values, not the strings ONNX's metadata_props must hold.
    assert description["classes_input"] is False and meta["classes_input"] == "false"
    assert description["num_classes"] == 1000 and type(description["num_classes"]) is int
    assert description["opset"] == int(meta["opset"]) and description["input_size"] == "224x224"
    assert [i["name"] for i in description["inputs"]] == ["image"]
    assert [o["name"] for o in description["outputs"]] == ["logits", "targets", "saliency"]
    assert description["validation"]["saliency_max_abs_diff"] <= SALIENCY_ATOL


@pytest.mark.slow  # reads a whole-graph export of Lite0
def test_lite0_fdcam_graph_equals_the_library_on_unseen_images(lite0, lite0_fdcam, zebra_input):
    noise = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    images = torch.cat([zebra_input, noise])
    saliency = assert_matches_library(lite0_fdcam, lite0, "_blocks.15", "fdcam", images)
    assert saliency.shape == (2, 1, 224, 224)


@pytest.mark.slow  # reads a whole-graph export of Lite0
def test_classes_input_explains_the_classes_asked_for(lite0, lite0_fdcam_classes, zebra_input):
    images = torch.cat([zebra_input, zebra_input.flip(-1)])
    classes = torch.tensor([[340, 1, 999], [0, 340, 500]])
    saliency = assert_matches_library(lite0_fdcam_classes, lite0, "_blocks.15", "fdcam", images, classes)
    assert saliency.shape == (2, 3, 224, 224)


@pytest.mark.slow  # reads a whole-graph export of Lite0
def test_a_nan_or_infinite_image_gets_a_nan_map_and_no_target(lite0, lite0_fdcam, zebra_input):
    # Plain ONNX Runtime, as a C++/JS/Triton user runs the graph: no fdcam in front of it to check.
    nan, inf = zebra_input.clone(), zebra_input.clone()
    nan[0, 1, 100, 100] = float("nan")
    inf[0, 0, 3, 7] = float("inf")
    logits, targets, saliency = run_explainer(session(lite0_fdcam), torch.cat([zebra_input, nan, inf]).numpy())
    assert np.isnan(saliency[1:]).all() and np.isnan(logits[1:]).all()
    np.testing.assert_array_equal(targets[1:], [[-1], [-1]])
    with pytest.raises(ValueError, match="NaN or infinite"):  # what the library does with the same images
        fdcam.FDCAM(lite0, "_blocks.15")(nan)
    # The finite image in the same batch is explained as if alone.
    expected = fdcam.FDCAM(lite0, "_blocks.15")(zebra_input)
    assert targets[0, 0] == 340 and np.abs(saliency[:1] - expected.numpy()).max() <= SALIENCY_ATOL


@pytest.mark.slow  # reads a whole-graph export of Lite0
def test_classes_outside_the_model_get_nan_maps_instead_of_wrapping(lite0, lite0_fdcam_classes, zebra_input):
    images = torch.cat([zebra_input, zebra_input.flip(-1)])
    classes = np.array([[340, -1, 1000], [-1000, 9, 999]], dtype=np.int64)
    logits, targets, saliency = run_explainer(session(lite0_fdcam_classes), images.numpy(), classes)
    np.testing.assert_array_equal(targets, classes)  # echoed as asked, so the caller sees which were refused
    refused = (classes < 0) | (classes >= 1000)
    assert np.isnan(saliency[refused]).all() and np.isfinite(saliency[~refused]).all()
    with pytest.raises(ValueError, match="class index -1 is out of range"):
        fdcam.FDCAM(lite0, "_blocks.15")(images, torch.tensor([[340, -1], [9, 999]]))
    expected = fdcam.FDCAM(lite0, "_blocks.15")(images, torch.tensor([[340, 340], [9, 999]]))
    assert np.abs(saliency[0, 0] - expected[0, 0].numpy()).max() <= SALIENCY_ATOL
    assert np.abs(saliency[1, 1:] - expected[1].numpy()).max() <= SALIENCY_ATOL
    with torch.no_grad():
        assert np.abs(logits - lite0(images).numpy()).max() <= LOGITS_RTOL * float(np.abs(logits).max())


def test_scorecam_and_groupcam_are_refused_in_one_line(lite0, tmp_path):
    for method in ("scorecam", "groupcam"):
        with pytest.raises(ExportError) as raised:
            export_explainer(lite0, tmp_path / "x.onnx", method=method)
        assert method in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(ExportError, match="unknown method"):
        export_explainer(lite0, tmp_path / "x.onnx", method="nosuchcam")
    assert not list(tmp_path.iterdir())


def test_a_graph_that_fails_validation_is_not_written(tmp_path, monkeypatch):
    from nets import small_net

    monkeypatch.setattr(explainer_module, "SALIENCY_TOLERANCE", -1.0)  # any difference, even 0, fails
    with pytest.raises(ExportError) as raised:
        export_explainer(small_net(), tmp_path / "explainer.onnx", "conv3", "gradcam", input_size=(32, 32))
    assert "saliency max |Δ|" in str(raised.value) and "nothing was saved" in str(raised.value)
    assert "\n" not in str(raised.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # a whole-graph export
def test_the_users_model_is_left_as_it_was_and_a_smaller_input_size_works(tmp_path):
    torch.manual_seed(0)
    model = fdcam.models.load("efficientnet_lite0", weights=None).train()
    model._blocks[0].requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_explainer(model, tmp_path / "e.onnx", method="gradcam", input_size=(96, 128))
    assert [p.requires_grad for p in model.parameters()] == flags and [m.training for m in model.modules()] == modes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    model.eval()
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(3))
    assert assert_matches_library(path, model, "_blocks.15", "gradcam", images).shape == (2, 1, 96, 128)


# --- Triton repository and CLI ------------------------------------------------------------------


def parse_triton_config(text: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())  # a misspelt field raises ParseError


@pytest.mark.slow  # reads a whole-graph export of Lite0
def test_triton_config_parses_as_triton_model_config(lite0_fdcam, lite0_fdcam_classes):
    from tritonclient.grpc import model_config_pb2

    from fdcam.export.triton import triton_config

    config = parse_triton_config(triton_config(lite0_fdcam, "fdcam_efficientnet_lite0_fdcam", max_batch=16))
    assert config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime" and config.max_batch_size == 16
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("image", model_config_pb2.TYPE_FP32, [3, 224, 224])
    ]
    outputs = [(o.name, o.data_type, list(o.dims)) for o in config.output]
    assert outputs == [
        ("logits", model_config_pb2.TYPE_FP32, [1000]),
        ("targets", model_config_pb2.TYPE_INT64, [1]),
        ("saliency", model_config_pb2.TYPE_FP32, [1, 224, 224]),
    ]
    assert config.HasField("dynamic_batching") and config.instance_group[0].count == 1
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator
    assert config.parameters["fdcam_method"].string_value == "fdcam"

    with_classes = parse_triton_config(triton_config(lite0_fdcam_classes, "m", tensorrt="fp16"))
    assert [(i.name, list(i.dims)) for i in with_classes.input] == [("image", [3, 224, 224]), ("classes", [-1])]
    assert with_classes.input[1].data_type == model_config_pb2.TYPE_INT64
    assert list(with_classes.output[2].dims) == [-1, 224, 224]
    (accelerator,) = with_classes.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert accelerator.parameters["precision_mode"] == "FP16"
    assert accelerator.parameters["trt_engine_cache_enable"] == "1"
    assert with_classes.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU


@pytest.mark.slow  # a whole-graph export
def test_cli_writes_the_graph_its_json_and_a_triton_repository(tmp_path, capsys, lite0):
    from fdcam.cli import main

    out, repo = tmp_path / "out", tmp_path / "repo"
    code = main(
        [
            "export",
            "--explainer",
            "--model",
            "efficientnet_lite0",
            "--method",
            "fdcam",
            "--theta",
            "0.9",
            "--switch",
            "off",
            "--input-size",
            "96x96",
            "--classes-input",
            "--out",
            str(out),
            "--triton",
            str(repo),
            "--max-batch",
            "8",
            "--tensorrt",
            "fp32",
        ]
    )
    assert code == 0
    assert (out / "explainer.onnx").is_file() and (out / "explainer.json").is_file()
    described = json.loads((out / "explainer.json").read_text())
    assert described["method_options"]["theta"] == 0.9 and described["method_options"]["switch"] == "off"
    model_dir = repo / "fdcam_efficientnet_lite0_fdcam"
    assert (model_dir / "1" / "model.onnx").read_bytes() == (out / "explainer.onnx").read_bytes()
    config = parse_triton_config((model_dir / "config.pbtxt").read_text())
    assert config.name == "fdcam_efficientnet_lite0_fdcam" and config.max_batch_size == 8
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accelerator.parameters["precision_mode"] == "FP32"
    assert list(config.input[0].dims) == [3, 96, 96]
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(5))
    assert_matches_library(
        out / "explainer.onnx",
        lite0,
        "_blocks.15",
        "fdcam",
        images,
        torch.tensor([[1, 2], [3, 4]]),
        theta=0.9,
        switch="off",
    )
    assert "explainer.onnx" in capsys.readouterr().out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--method", "gradcam", "--theta", "0.9"], "FD-CAM option"),
        (["--method", "scorecam"], "scorecam is not exported"),
        (["--input-size", "big"], "--input-size"),
    ],
)
def test_cli_refuses_in_one_line(tmp_path, capsys, arguments, message):
    from fdcam.cli import main

    code = main(["export", "--explainer", "--model", "efficientnet_lite0", "--out", str(tmp_path / "o"), *arguments])
    error = capsys.readouterr().err
    assert code == 2 and message in error and error.count("\n") == 1
    assert not (tmp_path / "o" / "explainer.onnx").exists()


# --- a consumer outside Python: Node.js with onnxruntime-node -------------------------------------

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def node_with_onnxruntime() -> str:
    """The machine's Node.js, with onnxruntime-node installed into examples/ from npm if it is missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "Node.js and npm are needed for the JavaScript example test"
    if not (EXAMPLES / "node_modules" / "onnxruntime-node").is_dir():
        subprocess.run(
            [npm, "install", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=EXAMPLES, check=True, timeout=600
        )
    return node


@pytest.mark.slow
def test_javascript_example_explains_like_python(lite0_fdcam_classes, lite0, zebra_input, tmp_path):
    node = node_with_onnxruntime()
    images = torch.cat([zebra_input, torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(11))])
    (tmp_path / "images.f32").write_bytes(images.numpy().astype("<f4").tobytes())
    result = subprocess.run(
        [
            node,
            str(EXAMPLES / "explain.js"),
            str(lite0_fdcam_classes),
            str(tmp_path / "images.f32"),
            str(tmp_path / "out"),
            "--classes",
            "340,9",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    from_node = np.fromfile(tmp_path / "out.saliency.f32", dtype="<f4").reshape(2, 2, 224, 224)
    classes = torch.tensor([[340, 9], [340, 9]])
    _, _, from_python = run_explainer(session(lite0_fdcam_classes), images.numpy(), classes.numpy())
    assert np.abs(from_node - from_python).max() <= SALIENCY_ATOL
    expected = fdcam.FDCAM(lite0, "_blocks.15")(images, classes)
    assert np.abs(from_node - expected.numpy()).max() <= SALIENCY_ATOL
    summary = json.loads((tmp_path / "out.json").read_text())
    assert [image["targets"] for image in summary["images"]] == [[340, 9], [340, 9]]
    with torch.no_grad():
        assert [image["top1"] for image in summary["images"]] == lite0(images).argmax(1).tolist()
    assert (tmp_path / "out.0.1.pgm").read_bytes().startswith(b"P5\n224 224\n255\n")


# --- methods and models -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, options",
    [
        ("gradcam++", {}),
        ("xgradcam", {}),
        ("layercam", {}),
        ("ablationcam", {}),
        ("fdcam", {"grouping": False, "combine": "linear", "bias": 0.25}),
    ],
)
def test_every_method_exports_and_equals_the_library(lite0, tmp_path, method, options):
    path = export_explainer(lite0, tmp_path / "e.onnx", method=method, input_size=(96, 96), **options)
    assert read_metadata(path)["method"] == method
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(21))
    # XGrad-CAM divides by each channel's activation sum, which is near 0 for some channels of this
    # (BN-output, signed) layer: float32 alone then moves its maps by more than 1e-4.
    assert_matches_library(path, lite0, "_blocks.15", method, images, ill_conditioned=method == "xgradcam", **options)


@pytest.mark.slow
@pytest.mark.parametrize(
    "layer, method, classes",
    # layer4.2.conv3: the skip tensor crosses the split, into the gradient and into every masked pass.
    [
        ("layer4", "fdcam", torch.tensor([[3, 7], [5, 3]])),
        ("layer4.2.conv3", "ablationcam", torch.tensor([[3, 7], [5, 3]])),
    ],
)
def test_resnet50_at_layer4_and_across_a_skip_connection(resnet50_random, tmp_path, layer, method, classes):
    path = export_explainer(
        resnet50_random, tmp_path / "e.onnx", layer, method, classes is not None, input_size=(96, 96)
    )
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(31))
    assert_matches_library(path, resnet50_random, layer, method, images, classes, ill_conditioned=True)


@pytest.mark.slow
def test_vgg16_features30_with_the_factorised_switch_passes(vgg16_random, tmp_path):
    # The export's own session runs the check: a second one would load VGG16's 550 MB of weights again.
    exported = export_explainer_full(
        vgg16_random, tmp_path / "e.onnx", "features.30", "fdcam", True, input_size=(64, 64)
    )
    assert exported.session is not None and exported.path.exists()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(41))
    assert_matches_library(
        exported.session,
        vgg16_random,
        "features.30",
        "fdcam",
        images,
        torch.tensor([[1, 2], [3, 4]]),
        ill_conditioned=True,
    )


# --- threads ------------------------------------------------------------------------------------


def test_export_while_another_thread_traces_the_model(tmp_path):
    # The export calls modules (split, head, trace) under the process-wide tracing lock for its whole build;
    # before, a trace by another thread (fdcam.layers, a new explainer's split) captured them: NameError. A small
    # model: the other thread traces it many times over while the export runs.
    import threading

    from nets import small_images, small_net

    model = small_net()
    done, errors, traced = threading.Event(), [], []
    x = small_images(1, seed=51)

    def trace_meanwhile():
        try:
            while not done.is_set():
                traced.append(len(fdcam.layers(model)))
                fdcam.GradCAM(model, "conv2")(x)  # a new explainer: its split traces the model
        except Exception as error:  # noqa: BLE001 — the test reports whatever the thread raised
            errors.append(error)

    thread = threading.Thread(target=trace_meanwhile)
    thread.start()
    try:
        path = export_explainer(model, tmp_path / "e.onnx", "conv3", "gradcam", input_size=(32, 32))
    finally:
        done.set()
        thread.join(timeout=300)
    assert not errors, errors
    assert traced and len(set(traced)) == 1  # it traced while the export ran, and always saw the same layers
    assert_matches_library(path, model, "conv3", "gradcam", small_images(2, seed=52))


def test_the_graph_engine_gets_the_tail_batch_size(tmp_path, monkeypatch):
    # tail_batch_size means mask rows per tail call in every engine: the explainer graph chunks by it too.
    from nets import ConvStart

    given = []

    class Stop(Exception):
        """Raised by the stand-in GraphTail: the export stops once the engine's batch size is recorded."""

    def recording(*args, **kwargs):
        given.append(kwargs.get("batch_size"))
        raise Stop

    monkeypatch.setattr(explainer_module, "GraphTail", recording)
    for options in ({"tail_batch_size": 5}, {}):
        with pytest.raises(Stop):
            export_explainer(ConvStart().eval(), tmp_path / "e.onnx", "stem", input_size=(16, 16), **options)
    assert given == [5, None]
