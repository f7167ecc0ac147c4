"""benchmarks.floors: the timed primitives compute what FD-CAM needs, and the report says the floor ratios."""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives at the root
from benchmarks import floors  # noqa: E402


def test_the_onnxruntime_selection_is_the_torch_selection_of_each_rows_top_values():
    torch.manual_seed(0)
    activations = torch.rand(64, 7, 7)
    flat = activations.flatten(-2)
    unit = flat / flat.norm(dim=-1, keepdim=True)
    similarity = unit @ unit.T
    session = floors._ort_session(
        floors.helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=-1, largest=1, sorted=1),
        [floors._tensor("x", floors.TensorProto.FLOAT, [64, 64]), floors._tensor("k", floors.TensorProto.INT64, [1])],
        [
            floors._tensor("values", floors.TensorProto.FLOAT, None),
            floors._tensor("indices", floors.TensorProto.INT64, None),
        ],
    )
    values, _ = session.run(None, {"x": similarity.numpy(), "k": np.array([20], dtype=np.int64)})
    by_bits = similarity.view(torch.int32).topk(20, dim=-1).values.view(torch.float32)
    assert torch.equal(torch.from_numpy(values), by_bits)
    assert torch.equal(by_bits, similarity.topk(20, dim=-1).values)


def test_the_onnxruntime_block_selection_selects_each_rows_top_values():
    torch.manual_seed(0)
    flat = torch.rand(512, 49)
    unit = flat / flat.norm(dim=-1, keepdim=True)
    similarity = unit @ unit.T
    count = 32  # 128 blocks of four a row: four times as many
    (values,) = floors.block_selection_session(512, count).run(None, {"x": similarity.numpy()})
    expected = similarity.topk(count, dim=-1).values
    assert torch.equal(torch.from_numpy(values).sort(-1, descending=True).values, expected)


def test_grouping_and_linear_primitives_are_timed_in_both_engines():
    torch.manual_seed(0)
    grouping = floors.grouping_primitives(torch.rand(64, 7, 7), repeat=1)
    linear = floors.linear_primitives(torch.nn.Linear(32, 16), rows=8, repeat=1)
    # 64 channels: the 0.95 quantile lies between the 5th and 4th largest (position 59.85 of 63), plus 16 to check
    assert set(grouping) == {
        "cosine product, torch",
        "cosine product, onnxruntime",
        "top 21 of each row, torch (int32 bits)",
        "top 21 of each row, onnxruntime TopK",
    }
    assert set(linear) == {"Linear [8,32]×[32,16], torch", "Linear [8,32]×[32,16], onnxruntime"}
    assert all(ms > 0 for ms in [*grouping.values(), *linear.values()])
    # 1536 channels: 384 blocks of four a row, at least four times the 94 values selected (78 from position 1458.25
    # of 1535 up, plus 16); the library's selection then takes the blocks, and both engines are timed so.
    blocks = floors.grouping_primitives(torch.rand(1536, 7, 7), repeat=1)
    assert {"top 94 of each row from blocks, torch (int32 bits)", "top 94 of each row from blocks, onnxruntime"} < set(
        blocks
    )


def test_the_report_adds_each_engines_primitives_to_its_gradcam():
    floor = {
        "model": "resnet50",
        "layer": "layer4",
        "gradcam_torch_ms": 80.0,
        "primitives_ms": {
            "cosine product, torch": 4.0,
            "top 120 of each row, torch (int32 bits)": 12.0,
            "cosine product, onnxruntime": 3.0,
            "top 120 of each row, onnxruntime TopK": 21.0,
        },
    }
    text = floors.format_floors([floor], {"resnet50": 40.0})
    assert "floor, torch: (80.0 + 16.0) / 80.0 = 1.20x" in text
    assert "floor, onnxruntime: (40.0 + 24.0) / 40.0 = 1.60x" in text
    # Of two forms of the selection, the floor takes the faster.
    floor["primitives_ms"]["top 120 of each row from blocks, onnxruntime"] = 15.0
    assert "floor, onnxruntime: (40.0 + 18.0) / 40.0 = 1.45x" in floors.format_floors([floor], {"resnet50": 40.0})
    assert "--graph-gradcam resnet50=MS" in floors.format_floors([floor], {})


def test_an_unknown_model_is_refused_in_one_line(capsys):
    assert floors.main(["--models", "lite0"]) == 2
    assert capsys.readouterr().err.strip() == "error: no floor is defined for lite0; models: resnet50, vgg16"
