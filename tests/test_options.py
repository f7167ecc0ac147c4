"""fdcam.options: FD-CAM's option checks, shared by FDCAM, the evaluation rows and the export description."""

import inspect

import pytest
import torch
from torch import nn

from fdcam import FDCAM
from fdcam.evaluation import method_specs
from fdcam.export.describe import BIAS, THETA
from fdcam.options import FDCAM_DEFAULTS, FDCAM_OPTIONS, check_fdcam_options, invalid_choice
from fdcam.switch import switch_masks
from fdcam.weights import combine_weights


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
