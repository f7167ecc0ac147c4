"""The baselines against pytorch-grad-cam 1.5.7 (post-ReLU layer) and Group-CAM against a plain reference."""

import gc

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
import torch.nn.functional as F
import torchvision
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import fdcam
from fdcam.forward import ForwardPass
from fdcam.methods.base import BatchContext, NonFiniteError
from fdcam.split import split_model
from nets import assert_state_equal, small_images, small_net, state_of
from reference import agreement, assert_same_up_to_rounding


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(10)
    return torchvision.models.resnet18().eval()


@pytest.fixture(scope="module")
def image():
    return torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(11))


PAIRS = [
    (fdcam.GradCAM, pgc.GradCAM),
    (fdcam.GradCAMPlusPlus, pgc.GradCAMPlusPlus),
    (fdcam.XGradCAM, pgc.XGradCAM),
    (fdcam.LayerCAM, pgc.LayerCAM),
    (fdcam.ScoreCAM, pgc.ScoreCAM),
    (fdcam.AblationCAM, pgc.AblationCAM),
]


# Score-CAM runs 512 forwards of the whole model per image (on each side here), and pytorch-grad-cam's
# Ablation-CAM 512 passes: in the slow tier.
SCORE_CAM_SLOW = pytest.mark.slow
SLOW_PAIRS = (fdcam.ScoreCAM, fdcam.AblationCAM)


@pytest.mark.parametrize(
    "ours, theirs",
    [pytest.param(*pair, id=pair[0].__name__, marks=SCORE_CAM_SLOW if pair[0] in SLOW_PAIRS else ()) for pair in PAIRS],
)
def test_baseline_matches_pytorch_grad_cam(resnet18, image, ours, theirs):
    cls = 17
    mine = ours(resnet18, "layer4")(image, targets=cls)[0, 0].numpy()
    with theirs(resnet18, [resnet18.layer4]) as reference:
        if hasattr(reference, "batch_size"):
            reference.batch_size = 64
        expected = reference(image, targets=[ClassifierOutputTarget(cls)])[0]
    corr, diff = agreement(mine, expected)
    assert corr >= 0.999 and diff <= 0.02, (corr, diff)


def test_methods_registry_names_every_class():
    assert set(fdcam.METHODS) == {
        "gradcam",
        "gradcam++",
        "xgradcam",
        "layercam",
        "scorecam",
        "ablationcam",
        "groupcam",
        "fdcam",
    }
    for cls in fdcam.METHODS.values():
        assert issubclass(cls, fdcam.BaseCAM)


def _blur_reference(x):
    # torchvision's own Gaussian blur (reflect padding), independent of fdcam's separable conv.
    return torchvision.transforms.functional.gaussian_blur(x, kernel_size=[51, 51], sigma=[50.0, 50.0])


def groupcam_reference(model, layer, x, cls, groups=32):
    """Group-CAM as its authors' loop: one masked forward per group, numpy percentile threshold."""
    store = {}

    def keep(module, inputs, output):
        output.retain_grad()
        store["a"] = output

    handle = layer.register_forward_hook(keep)
    logits = model(x)
    handle.remove()
    logits[0, cls].backward()
    model.zero_grad(set_to_none=True)
    activations, gradients = store["a"].detach(), store["a"].grad
    alpha = gradients.mean(dim=(2, 3), keepdim=True)
    weighted = alpha * activations
    h, w = x.shape[-2:]
    saliency = torch.zeros(1, 1, h, w)
    with torch.no_grad():
        blurred = _blur_reference(x)
        baseline = F.softmax(model(blurred), -1)[0, cls]
        for chunk in weighted.chunk(groups, 1):
            group_map = F.relu(chunk.sum(1, keepdim=True))
            threshold = np.percentile(group_map.numpy(), 70)
            group_map = torch.where(group_map > threshold, group_map, torch.zeros_like(group_map))
            group_map = F.interpolate(group_map, size=(h, w), mode="bilinear", align_corners=False)
            if group_map.max() == group_map.min():
                continue
            norm = (group_map - group_map.min()) / (group_map.max() - group_map.min())
            score = F.softmax(model(x * norm + blurred * (1 - norm)), -1)[0, cls] - baseline
            saliency += score * norm
    saliency = F.relu(saliency)[0, 0]
    return (saliency - saliency.min()) / (saliency.max() - saliency.min())


def test_groupcam_matches_plain_reference(resnet18, image):
    mine = fdcam.GroupCAM(resnet18, "layer4")(image, targets=17)[0, 0]
    expected = groupcam_reference(resnet18, resnet18.layer4, image, 17)
    corr, diff = agreement(mine, expected)
    assert corr >= 0.999 and diff <= 0.02, (corr, diff)


@pytest.mark.parametrize(
    "name",
    [
        "gradcam",
        "gradcam++",
        "xgradcam",
        "layercam",
        pytest.param("scorecam", marks=SCORE_CAM_SLOW),
        "ablationcam",
        "groupcam",
        "fdcam",
    ],
)
def test_every_method_handles_batches_and_several_classes(resnet18, name):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(12))
    cam = fdcam.METHODS[name](resnet18, "layer4")
    both = cam(x, targets=[[1, 2], [3, 1]])
    assert both.shape == (2, 2, 64, 64) and both.dtype == torch.float32
    assert torch.isfinite(both).all() and both.min() >= 0 and both.max() <= 1
    assert_same_up_to_rounding(both[1, 0], cam(x[1:], targets=3)[0, 0])


@pytest.mark.parametrize("name, forwards", [pytest.param("scorecam", 512, marks=SCORE_CAM_SLOW), ("groupcam", 1 + 32)])
def test_perturbation_cams_run_their_forwards_on_a_scorer_with_the_same_maps(resnet18, image, name, forwards):
    from fdcam.scoring import OrtScorer

    ort_scorer, scored = OrtScorer(resnet18), []

    def counting(inputs):
        scored.append(inputs.shape[0])
        return ort_scorer(inputs)

    expected = fdcam.METHODS[name](resnet18, "layer4")(image, targets=17)
    on_ort = fdcam.METHODS[name](resnet18, "layer4", scorer=counting, forward_batch_size=50)(image, targets=17)
    assert sum(scored) == forwards and max(scored) == min(forwards, 50)
    assert_same_up_to_rounding(on_ort, expected)
    small_batches = fdcam.METHODS[name](resnet18, "layer4", forward_batch_size=7)(image, targets=17)
    assert_same_up_to_rounding(small_batches, expected)


class HeadActivationApart(nn.Module):
    """EfficientNet-Lite0 (its own modules, shared) with the head's ReLU6 as a module of its own.

    Lite0 calls `_swish` in the stem and in the head; here the head's call is `head_activation`, a
    module target, so the node target `_swish_1` of the original has an independent counterpart.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.head_activation = nn.ReLU6()

    def forward(self, x):
        m = self.model
        x = m._swish(m._bn0(m._conv_stem(x)))
        for block in m._blocks:
            x = block(x)  # no drop connect in eval mode
        x = self.head_activation(m._bn1(m._conv_head(x)))
        return m._fc(m._dropout(m._avg_pooling(x).flatten(1)))


# Score-CAM's 1280 full forwards per map are too slow for the suite here: it has the small net below.
@pytest.mark.parametrize(
    "name",
    [  # the perturbation methods' many Lite0 forwards: in the slow tier
        pytest.param(name, marks=pytest.mark.slow) if name in ("ablationcam", "groupcam") else name
        for name in fdcam.METHODS
        if name != "scorecam"
    ],
)
def test_every_method_explains_lite0_at_its_head_activation_call_site(lite0, name):
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(12))
    apart = HeadActivationApart(lite0).eval()
    with torch.no_grad():
        assert_same_up_to_rounding(apart(x), lite0(x))
    ours = fdcam.METHODS[name](lite0, "_swish_1")(x, targets=[[3, 340]])
    reference = fdcam.METHODS[name](apart, "head_activation")(x, targets=[[3, 340]])
    assert ours.shape == (1, 2, 96, 96)
    assert float(ours.max()) > 0 or name == "groupcam"  # Group-CAM's 3x3 maps here are blank (so are the reference's)
    assert_same_up_to_rounding(ours, reference)


class SharedActivation(nn.Module):
    """A small CNN that calls one ReLU twice; with `apart`, the second call is a module of its own."""

    def __init__(self, apart: bool = False):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.relu = nn.ReLU()
        self.relu_apart = nn.ReLU() if apart else self.relu
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.relu_apart(self.conv2(self.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("name", list(fdcam.METHODS))
def test_every_method_explains_the_second_call_of_a_shared_module(name):
    torch.manual_seed(13)
    shared = SharedActivation().eval()
    apart = SharedActivation(apart=True).eval()
    apart.load_state_dict(shared.state_dict())
    x = torch.randn(2, 3, 56, 56)  # Group-CAM's blur needs more than 51 pixels
    ours = fdcam.METHODS[name](shared, "relu_1")(x, targets=[[1, 2], [3, 4]])
    assert_same_up_to_rounding(ours, fdcam.METHODS[name](apart, "relu_apart")(x, targets=[[1, 2], [3, 4]]))
    assert float(ours.max()) > 0


def test_gradcam_at_lite0_head_call_site_matches_a_hand_computation(lite0, zebra_input):
    name = "_swish_1"
    with torch.no_grad():
        features = create_feature_extractor(lite0, return_nodes=[name], suppress_diff_warning=True)(zebra_input)[name]
    activation = features.clone().requires_grad_()
    logits = lite0._fc(torch.flatten(lite0._avg_pooling(activation), 1))  # what follows the head ReLU6
    with torch.no_grad():
        assert_same_up_to_rounding(logits, lite0(zebra_input))
    (gradient,) = torch.autograd.grad(logits[0, 340], activation)
    cam = F.relu((gradient.mean((2, 3), keepdim=True) * activation).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=zebra_input.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = (cam - cam.min()) / (cam.max() - cam.min())
    assert_same_up_to_rounding(fdcam.GradCAM(lite0, name)(zebra_input, targets=340)[0, 0], cam)


def test_without_a_target_layer_the_last_spatial_layer_is_named_in_a_warning(resnet18, image):
    with pytest.warns(
        UserWarning, match=r"no target_layer given: explaining 'layer4' \(Sequential, output \[1, 512, 7, 7\]\)"
    ):
        cam = fdcam.GradCAM(resnet18)
    assert cam.target_layer == "layer4"
    assert torch.equal(cam(image, targets=5), fdcam.GradCAM(resnet18, "layer4")(image, targets=5))


def test_methods_repr_shows_their_options(resnet18):
    assert repr(fdcam.GradCAM(resnet18, "layer4")) == "GradCAM(target_layer='layer4')"
    assert repr(fdcam.FDCAM(resnet18, "layer4.1.relu_1", theta=0.9, backend="onnxruntime", tail_batch_size=64)) == (
        "FDCAM(target_layer='layer4.1.relu_1', theta=0.9, bias=0.5, combine='exp', switch='on_off', grouping=True,"
        " tail_batch_size=64, backend='onnxruntime')"
    )
    assert repr(fdcam.GroupCAM(resnet18, "layer4", groups=16, scorer=resnet18)) == (
        "GroupCAM(target_layer='layer4', scorer=<ResNet>, groups=16, percentile=70.0)"
    )


def test_a_new_split_never_gets_the_tail_of_an_earlier_one(resnet18, image):
    # Tails are kept per split object: a cache keyed by id() handed a new split the tail of a freed
    # one whenever Python reused the address.
    cam = fdcam.AblationCAM(resnet18, "layer4")
    for _ in range(3):
        split = split_model(resnet18, "layer4", image)
        context = BatchContext(image, ForwardPass.run(split, image), torch.tensor([[0]]))
        tail = cam.tail_for(context)
        assert tail.masked_tail.tail is split.tail and cam.tail_for(context) is tail
        del split, context, tail
        gc.collect()
    assert cam.tails == []  # a split that is gone takes its tail with it


@pytest.mark.parametrize("name", [name for name, method in fdcam.METHODS.items() if not method.uses_tail_engine])
@pytest.mark.parametrize(
    "option",
    [
        {"backend": "onnxruntime"},
        {"provider": "cpu"},
        {"precision": "fp16"},
        {"cuda_graph": True},
        {"memory_budget": 2**20},
        {"tail_batch_size": 8},
    ],
)
def test_engine_options_given_to_a_method_without_tail_passes_are_refused(resnet18, name, option):
    ((key, value),) = option.items()
    with pytest.raises(
        ValueError, match=rf"^{fdcam.METHODS[name].__name__} runs no masked tail passes: {key}="
    ) as raised:
        fdcam.METHODS[name](resnet18, "layer4", **option)
    assert "\n" not in str(raised.value)


def test_methods_declare_what_they_run(resnet18):
    tail = {name for name, method in fdcam.METHODS.items() if method.uses_tail_engine}
    forward = {name for name, method in fdcam.METHODS.items() if method.uses_forward_scorer}
    assert (tail, forward) == ({"fdcam", "ablationcam"}, {"scorecam", "groupcam"})
    with pytest.raises(ValueError, match="GradCAM runs no forwards of perturbed inputs: forward_batch_size"):
        fdcam.GradCAM(resnet18, "layer4", forward_batch_size=8)
    with pytest.raises(ValueError, match="FDCAM runs no forwards of perturbed inputs"):
        fdcam.FDCAM(resnet18, "layer4", forward_batch_size=8)
    with pytest.raises(ValueError, match="ScoreCAM runs no masked tail passes: tail_batch_size=8"):
        fdcam.ScoreCAM(resnet18, "layer4", tail_batch_size=8)


def test_batch_size_is_the_deprecated_name_of_the_batch_the_method_runs(resnet18):
    with pytest.warns(DeprecationWarning, match="give tail_batch_size"):
        cam = fdcam.FDCAM(resnet18, "layer4", batch_size=64)
    assert (cam.tail_batch_size, cam.forward_batch_size) == (64, None)
    with pytest.warns(DeprecationWarning, match="give forward_batch_size"):
        cam = fdcam.ScoreCAM(resnet18, "layer4", batch_size=16)
    assert (cam.tail_batch_size, cam.forward_batch_size) == (None, 16)
    assert repr(cam) == "ScoreCAM(target_layer='layer4', scorer=None, forward_batch_size=16)"
    with pytest.raises(ValueError, match="GradCAM runs no batched passes: batch_size does not apply"):
        fdcam.GradCAM(resnet18, "layer4", batch_size=16)
    with pytest.raises(ValueError, match="give tail_batch_size only"):
        fdcam.AblationCAM(resnet18, "layer4", batch_size=16, tail_batch_size=16)


@pytest.mark.parametrize(
    "name",
    [  # Score-CAM's and Group-CAM's many forwards: in the slow tier
        pytest.param(name, marks=pytest.mark.slow) if name in ("scorecam", "groupcam") else name
        for name in sorted(fdcam.METHODS)
    ],
)
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_every_method_works_inside_no_grad_and_inference_mode(resnet18, name, mode):
    # Serving code wraps calls in these; fdcam records the tail's gradients itself. The same ops run in the
    # same order, so the maps equal the plain call's (1e-6 allows a reduction split differently by threads).
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(13))
    # Score-CAM runs a forward per channel: layer1's 64 instead of layer4's 512 (the property holds at any layer)
    cam = fdcam.METHODS[name](resnet18, "layer1" if name == "scorecam" else "layer4")
    flags = [p.requires_grad for p in resnet18.parameters()]
    for targets in (None, [[1, 2], [3, 1]]):  # one class per image (the forward's own graph), and several
        expected = cam(x, targets)
        with mode():
            inside = cam(x.clone(), targets)
        torch.testing.assert_close(inside.clone(), expected, rtol=0, atol=1e-6)
    assert [p.requires_grad for p in resnet18.parameters()] == flags and not resnet18.training


def test_fdcam_on_onnxruntime_works_inside_inference_mode(resnet18):
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(14))
    cam = fdcam.FDCAM(resnet18, "layer4", backend="onnxruntime")
    expected = cam(x)
    with torch.inference_mode():
        inside = cam(x.clone())
    torch.testing.assert_close(inside.clone(), expected, rtol=0, atol=1e-6)


# --- lifecycle (close, `with`) and Explanation (maps, logits and targets of one forward) ---------------------


def _small_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


SMALL_INPUT = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("name", sorted(fdcam.METHODS))
def test_every_method_closes_at_the_end_of_a_with_block_and_refuses_use_afterwards(name):
    model = _small_net()
    with fdcam.METHODS[name](model, "3") as cam:
        maps = cam(SMALL_INPUT)
        assert len(cam.tails) == (1 if cam.uses_tail_engine else 0)
    assert cam.closed and cam.tails == []
    for use in (lambda: cam(SMALL_INPUT), lambda: cam.explanation(SMALL_INPUT), lambda: cam.__enter__()):
        with pytest.raises(fdcam.ClosedError, match=f"this {type(cam).__name__} was closed; make a new one"):
            use()
    cam.close()  # a second close does nothing
    assert not model.training and all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(fdcam.METHODS[name](model, "3")(SMALL_INPUT), maps, rtol=0, atol=0)


def test_a_with_block_left_by_an_error_closes_the_explainer_and_the_error_goes_on():
    with pytest.raises(ValueError, match="input must be a 4-D float tensor"):
        with fdcam.FDCAM(_small_net(), "3") as cam:
            cam(torch.zeros(3, 64, 64))
    assert cam.closed


@pytest.mark.parametrize("name", sorted(fdcam.METHODS))
def test_an_explanation_holds_the_maps_logits_and_classes_of_its_own_forward(name):
    model = _small_net()
    cam = fdcam.METHODS[name](model, "3")
    with torch.no_grad():
        logits = model(SMALL_INPUT)
    explanation = cam.explanation(SMALL_INPUT, fdcam.targets.TopK(2))
    torch.testing.assert_close(explanation.classes, logits.topk(2, dim=1).indices, rtol=0, atol=0)
    assert_same_up_to_rounding(explanation.logits, logits)
    assert not explanation.logits.requires_grad and explanation.targets.shape == (2, 2)
    torch.testing.assert_close(explanation.maps, cam(SMALL_INPUT, explanation.classes), rtol=0, atol=0)
    top1 = cam.explanation(SMALL_INPUT)  # None: each image's top-1 class, as explain() always did
    torch.testing.assert_close(top1.classes, logits.argmax(1, keepdim=True), rtol=0, atol=0)
    torch.testing.assert_close(top1.maps, cam(SMALL_INPUT), rtol=0, atol=0)


def test_an_explanation_of_targets_other_than_classes_has_no_classes():
    cam = fdcam.GradCAM(_small_net(), "3")
    explanation = cam.explanation(SMALL_INPUT, fdcam.targets.ClassProbability(1))
    assert explanation.classes is None and explanation.maps.shape == (2, 1, 64, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_close_frees_the_cuda_graphs_of_the_torch_tail():
    model, x = _small_net().cuda(), SMALL_INPUT.cuda()
    cam = fdcam.FDCAM(model, "3", cuda_graph=True)
    expected = cam(x)
    (tail,) = cam.tails
    assert tail.captured_graphs >= 1 and tail.graph_replays >= 1
    cam.close()
    assert tail.captured_graphs == 0 and cam.tails == []
    assert_same_up_to_rounding(fdcam.FDCAM(model, "3")(x), expected)  # eager passes: the same maps


# ---------------------------------------------------------------------------------------------
# NaN and infinite values, bad inputs: one-line errors, the model unchanged


def test_nan_weights_are_an_error_in_the_api():
    model, x = small_net(), small_images(1)
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    for name in ("fdcam", "gradcam", "ablationcam", "scorecam"):
        with pytest.raises(NonFiniteError, match="NaN or infinite") as raised:
            fdcam.METHODS[name](model, "conv3")(x, targets=1)
        assert isinstance(raised.value, ValueError) and "\n" not in str(raised.value)


def test_nan_maps_are_an_error_even_with_finite_logits():
    model, x = small_net(), small_images(1)
    cam = fdcam.GradCAM(model, "conv3")
    cam.channel_weights = lambda explanation: torch.full(explanation.activations.shape[:1] + (1, 16), float("inf"))
    with pytest.raises(NonFiniteError):
        cam(x, targets=1)


@pytest.mark.parametrize(
    "x, targets, message",
    [
        (small_images(1).double(), None, "float64"),
        (small_images(1).half(), None, "float16"),
        (torch.randn(1, 1, 32, 32), None, "1 channels"),
        (small_images(1), [[]], "no class"),
        (torch.randn(0, 3, 32, 32), None, "empty"),
        (small_images(1), torch.tensor([1.0]), "integer"),
        (small_images(1), "3", "string"),
        (small_images(1), [1.5], "integer"),
    ],
)
def test_bad_input_and_targets_are_one_line_value_errors(x, targets, message, capfd):
    model = small_net()
    state = state_of(model)
    with pytest.raises(ValueError, match=message) as raised:
        fdcam.FDCAM(model, "conv3")(x, targets=targets)
    assert "\n" not in str(raised.value)
    assert capfd.readouterr().err == ""  # no fx traceback on stderr
    assert_state_equal(model, state)


def test_an_input_too_small_for_the_model_is_a_one_line_value_error(capfd):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 5),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    cam = fdcam.GradCAM(model, "2")
    assert cam(torch.randn(1, 3, 16, 16), targets=1).shape == (1, 1, 16, 16)
    with pytest.raises(ValueError, match="cannot run on an input of shape") as raised:
        cam(torch.randn(1, 3, 4, 4), targets=1)
    assert "\n" not in str(raised.value) and capfd.readouterr().err == ""


def test_a_1x1_target_layer_warns_that_its_map_is_blank():
    model = small_net()
    with pytest.warns(UserWarning, match="1x1 .* blank"):
        maps = fdcam.GradCAM(model, "conv3")(torch.randn(1, 3, 2, 2), targets=1)
    assert torch.equal(maps, torch.zeros_like(maps))
