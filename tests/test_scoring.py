"""fdcam.scoring: the ONNX Runtime whole-model scorer against torch, and how make_scorer chooses."""

import pytest
import torch
from torch import nn

from fdcam import scoring
from fdcam.scoring import OrtScorer, make_scorer, scorer_error, torch_scorer
from reference import assert_same_up_to_rounding


def small_cnn() -> nn.Module:
    torch.manual_seed(20)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


def test_ort_scorer_matches_torch_for_any_batch_size():
    model = small_cnn()
    x = torch.randn(7, 3, 20, 20, generator=torch.Generator().manual_seed(21))
    scorer = OrtScorer(model)
    with torch.no_grad():
        expected = model(x)
    for batch in (1, 3, 7):
        torch.testing.assert_close(scorer(x[:batch]), expected[:batch], rtol=0, atol=1e-4)
    assert scorer(x).dtype == torch.float32
    assert len({id(scorer.session_for(x[:batch])) for batch in (1, 3, 7)}) == 1  # one session for every batch size


def test_ort_scorer_matches_torch_on_lite0(lite0, zebra_input):
    x = torch.cat([zebra_input, torch.zeros_like(zebra_input), zebra_input.flip(-1)])
    with torch.no_grad():
        expected = lite0(x).softmax(1)
    got = OrtScorer(lite0)(x).softmax(1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_torch_scorer_is_a_frozen_channels_last_copy():
    model = small_cnn().train()
    scorer = torch_scorer(model)
    assert scorer is not model and not scorer.training and model.training
    assert all(not p.requires_grad for p in scorer.parameters()) and all(p.requires_grad for p in model.parameters())
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert_same_up_to_rounding(scorer(x), model.eval()(x))  # channels-last convolutions sum in another order


def test_make_scorer_auto_picks_onnxruntime_on_cpu_and_torch_when_asked():
    model, x = small_cnn(), torch.randn(2, 3, 16, 16)
    scorer, kind, note = make_scorer(model, "auto", x)
    assert isinstance(scorer, OrtScorer) and kind == "onnxruntime" and note is None
    assert scorer_error(scorer, model, x) <= 1e-4
    reference = torch_scorer(model)
    scorer, kind, note = make_scorer(model, "torch", x, reference=reference)
    assert scorer is reference and kind == "torch" and note is None


def test_make_scorer_falls_back_to_torch_when_onnxruntime_disagrees(monkeypatch):
    model, x = small_cnn(), torch.randn(2, 3, 16, 16)
    monkeypatch.setattr(scoring, "scorer_error", lambda *args: 0.5)
    scorer, kind, note = make_scorer(model, "auto", x)
    assert kind == "torch" and isinstance(scorer, nn.Module) and "5.00e-01" in note
    with pytest.raises(RuntimeError, match="differs from torch"):
        make_scorer(model, "onnxruntime", x)


def test_make_scorer_falls_back_when_export_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("cannot export")

    monkeypatch.setattr(torch.onnx, "export", broken)
    model, x = small_cnn(), torch.randn(1, 3, 16, 16)
    assert make_scorer(model, "auto", x)[1] == "torch"
    with pytest.raises(RuntimeError, match="cannot export"):
        make_scorer(model, "onnxruntime", x)
    with pytest.raises(ValueError, match="scorer must be one of"):
        make_scorer(model, "tensorrt", x)
