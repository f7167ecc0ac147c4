"""fdcam.options: FD-CAM's option checks (shared by FDCAM, the evaluation rows and the export description) and
EngineOptions."""

import dataclasses
import inspect
import warnings

import pytest
import torch
from torch import nn

import fdcam
from fdcam import FDCAM, BaseCAM, EngineOptions, GradCAM
from fdcam.evaluation import method_specs
from fdcam.export.describe import BIAS, THETA
from fdcam.options import FDCAM_DEFAULTS, FDCAM_OPTIONS, check_fdcam_options, engine_changes, invalid_choice
from fdcam.switch import switch_masks
from fdcam.weights import combine_weights
from nets import small_images, small_net


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


def test_defaults_are_the_papers_and_the_ones_fdcam_and_the_export_description_use():
    assert FDCAM_DEFAULTS == {"theta": 0.95, "bias": 0.5, "combine": "exp", "switch": "on_off", "grouping": True}
    parameters = inspect.signature(FDCAM.__init__).parameters
    assert {name: parameters[name].default for name in FDCAM_OPTIONS} == FDCAM_DEFAULTS
    assert (THETA, BIAS) == (0.95, 0.5)


def test_checked_options_fill_defaults_and_normalise_types():
    assert check_fdcam_options() == FDCAM_DEFAULTS
    checked = check_fdcam_options(theta=1, bias=None, grouping=0, switch="off")
    assert checked == {**FDCAM_DEFAULTS, "theta": 1.0, "grouping": False, "switch": "off"}
    assert isinstance(checked["theta"], float) and list(checked) == list(FDCAM_OPTIONS)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"gamma": 1}, "unknown FD-CAM option"),
        ({"combine": "sum"}, "combine must be 'exp' or 'linear', not 'sum'"),
        ({"switch": "on"}, "switch must be 'on_off' or 'off', not 'on'"),
        ({"theta": 1.5}, r"theta must lie in \[0, 1\]"),
        ({"theta": float("nan")}, r"theta must lie in \[0, 1\]"),
        ({"bias": "half"}, "bias must be a number"),
    ],
)
def test_bad_options_are_one_line_value_errors_everywhere(options, message):
    with pytest.raises(ValueError, match=message):
        check_fdcam_options(**options)
    if "gamma" not in options:
        with pytest.raises(ValueError, match=message):
            FDCAM(_net(), "1", **options)
        with pytest.raises(ValueError, match=message):
            method_specs("fdcam", options)


def test_the_low_level_functions_name_the_same_choices():
    with pytest.raises(ValueError, match=str(invalid_choice("switch", "on", ("on_off", "off")))):
        switch_masks(torch.ones(2, 2, dtype=torch.bool), "on")
    with pytest.raises(ValueError, match=str(invalid_choice("combine", "sum", ("exp", "linear")))):
        combine_weights(torch.ones(1, 2), torch.ones(1, 2), 0.5, "sum")


def test_engine_options_defaults_are_the_methods_defaults():
    parameters = inspect.signature(BaseCAM.__init__).parameters
    fields = dataclasses.fields(EngineOptions)
    defaults = {field.name: field.default for field in fields}
    assert defaults == {field.name: parameters[field.name].default for field in fields}
    assert FDCAM(_net(), "1").engine == EngineOptions() and EngineOptions().changed() == {}
    assert engine_changes({"backend": "torch", "precision": "tf32", "cuda_graph": False}) == {"precision": "tf32"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        EngineOptions().backend = "onnxruntime"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"backend": "tensorflow"}, "^backend must be 'torch' or 'onnxruntime', not 'tensorflow'$"),
        ({"precision": "int8"}, "^precision must be one of fp32, tf32, bf16, fp16 for the torch backend, not 'int8'$"),
        (
            {"backend": "onnxruntime", "precision": "bf16"},
            "^precision must be one of fp32, tf32, fp16 for the onnxruntime backend, not 'bf16'$",
        ),
        ({"backend": "onnxruntime", "cuda_graph": True}, "^cuda_graph applies to the torch backend"),
        ({"provider": "cpu"}, "^provider='cpu' applies to the onnxruntime backend"),
        (
            {"backend": "onnxruntime", "provider": "npu"},
            "^provider must be one of auto, cpu, cuda, tensorrt, not 'npu'$",
        ),
        ({"tail_batch_size": 0}, r"^tail_batch_size must be a positive integer or None, not 0$"),
        ({"tail_batch_size": 2.5}, r"^tail_batch_size must be a positive integer or None, not 2.5$"),
        ({"tail_batch_size": True}, r"^tail_batch_size must be a positive integer or None, not True$"),
        ({"memory_budget": -5}, r"^memory_budget must be a positive integer or None, not -5$"),
    ],
)
def test_each_bad_engine_option_is_one_line_value_error_made_and_given_to_a_method(options, message):
    with pytest.raises(ValueError, match=message) as made:
        EngineOptions(**options)
    with pytest.raises(ValueError, match=message) as given:
        FDCAM(_net(), "1", **options)
    assert str(made.value) == str(given.value) and "\n" not in str(made.value)


def test_engine_options_object_and_keywords_give_the_same_map():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 12, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5)
    ).eval()
    x = torch.randn(2, 3, 12, 12)
    by_object = FDCAM(model, "1", engine=EngineOptions(tail_batch_size=7))
    by_keyword = FDCAM(model, "1", tail_batch_size=7)
    assert by_object.engine == by_keyword.engine and by_object.tail_batch_size == 7
    assert repr(by_object) == repr(by_keyword) and repr(by_object).endswith("grouping=True, tail_batch_size=7)")
    assert torch.equal(by_object(x, targets=[1, 3]), by_keyword(x, targets=[1, 3]))  # the same computation
    assert by_object.tails[0].calls == by_keyword.tails[0].calls > 1  # 7 mask rows per pass: several passes


def test_engine_and_a_conflicting_keyword_are_refused_in_one_line():
    engine = EngineOptions(tail_batch_size=7, precision="tf32")
    message = (
        "give each engine option once, in engine= or as a keyword: tail_batch_size=7 in engine= but 8 as a keyword"
    )
    with pytest.raises(ValueError, match=f"^{message}$"):
        FDCAM(_net(), "1", engine=engine, tail_batch_size=8)
    assert FDCAM(_net(), "1", engine=engine, precision="tf32").engine is engine  # agreeing keywords are fine
    with pytest.raises(ValueError, match="^engine must be a fdcam.EngineOptions, not dict$"):
        FDCAM(_net(), "1", engine={"tail_batch_size": 7})


@pytest.mark.parametrize(
    "options", [{"backend": "onnxruntime"}, {"precision": "fp16"}, {"tail_batch_size": 8}, {"memory_budget": 2**20}]
)
def test_grad_cam_refuses_engine_options_as_an_object_as_it_does_as_keywords(options):
    with pytest.raises(ValueError, match="^GradCAM runs no masked tail passes: ") as as_object:
        GradCAM(_net(), "1", engine=EngineOptions(**options))
    with pytest.raises(ValueError) as as_keywords:
        GradCAM(_net(), "1", **options)
    assert str(as_object.value) == str(as_keywords.value)
    assert GradCAM(_net(), "1", engine=EngineOptions()).engine == EngineOptions()  # nothing set: nothing to refuse


# ---------------------------------------------------------------------------------------------
# engine options given to a method


def test_bad_engine_options_are_refused():
    model = small_net()
    for bad in (
        {"tail_batch_size": 0},
        {"tail_batch_size": -1},
        {"memory_budget": 0},
        {"memory_budget": -5},
        {"tail_batch_size": 2.5},
    ):
        with pytest.raises(ValueError, match="positive integer"):
            fdcam.FDCAM(model, "conv3", **bad)
    with pytest.raises(ValueError, match="GradCAM runs no masked tail passes: backend='onnxruntime', precision='fp16'"):
        fdcam.GradCAM(model, "conv3", backend="onnxruntime", precision="fp16")
    cam = fdcam.FDCAM(model, "conv3", cuda_graph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cam(small_images(1))
        cam(small_images(1))
    assert [str(w.message) for w in caught if "cuda_graph" in str(w.message)] == [
        "cuda_graph applies to CUDA inputs only; these switch passes run eagerly"
    ]
