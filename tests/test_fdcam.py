"""FD-CAM against the slow reference in tests/reference.py, on three architectures and the ablation options."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

import fdcam
from reference import agreement, assert_same_up_to_rounding, fdcam_reference


def vgg_tail(model):
    return lambda a: model.classifier(torch.flatten(model.avgpool(a), 1))


@pytest.mark.slow  # FD-CAM and the reference on VGG16 at 224
def test_fdcam_vgg16_matches_reference(vgg16_random):
    torch.manual_seed(1)
    x = torch.randn(1, 3, 224, 224)
    cls = 7
    ours = fdcam.FDCAM(vgg16_random, "features.30")(x, targets=cls)[0, 0]
    ref = fdcam_reference(vgg16_random, vgg16_random.features[30], vgg_tail(vgg16_random), x, cls)
    corr, diff = agreement(ours, ref)
    assert corr >= 0.999 and diff <= 0.02, (corr, diff)


def test_fdcam_efficientnet_lite0_real_image_matches_reference(lite0, zebra_input):
    m = lite0

    def tail(a):
        h = m._swish(m._bn1(m._conv_head(a)))
        return m._fc(torch.flatten(m._avg_pooling(h), 1))

    ours = fdcam.FDCAM(m, "_blocks.15")(zebra_input)[0, 0]
    cls = int(m(zebra_input).argmax())
    assert cls == 340  # zebra
    ref = fdcam_reference(m, m._blocks[15], tail, zebra_input, cls)
    corr, diff = agreement(ours, ref)
    assert corr >= 0.999 and diff <= 0.02, (corr, diff)


def test_fdcam_lite0_head_activation_call_site_matches_reference(lite0, zebra_input):
    m = lite0

    def tail(a):
        return m._fc(torch.flatten(m._avg_pooling(a), 1))

    ours = fdcam.FDCAM(m, "_swish_1")(zebra_input, targets=340)[0, 0]  # the head's call of _swish
    # The reference's hook on _swish sees both calls; the last one, the head's, is the one it keeps.
    ref = fdcam_reference(m, m._swish, tail, zebra_input, 340)
    corr, diff = agreement(ours, ref)
    assert corr >= 0.999 and diff <= 0.02, (corr, diff)


@pytest.mark.slow  # ResNet-50 at 160 px against the plain reference
def test_fdcam_resnet_split_inside_residual_block_matches_reference(resnet50_random):
    model = resnet50_random
    block = model.layer4[2]
    torch.manual_seed(2)
    x = torch.randn(1, 3, 160, 160)
    store = {}
    handle = block.register_forward_pre_hook(lambda module, inputs: store.__setitem__("identity", inputs[0].detach()))
    model(x)
    handle.remove()

    def tail(a):
        out = F.relu(block.bn3(a) + store["identity"])
        return model.fc(torch.flatten(model.avgpool(out), 1))

    cam = fdcam.FDCAM(model, "layer4.2.conv3")
    assert cam.split_for(x).num_extras == 1  # the skip tensor crosses the split
    ours = cam(x, targets=1)[0, 0]  # a class whose map is not blank for these random weights
    ref = fdcam_reference(model, block.conv3, tail, x, 1)
    corr, diff = agreement(ours, ref)
    assert corr >= 0.999 and diff <= 0.02, (corr, diff)


@pytest.fixture(scope="module")
def small_resnet():
    torch.manual_seed(3)
    return torchvision.models.resnet18().eval()


@pytest.mark.parametrize(
    "options",
    [
        {"switch": "off"},
        {"grouping": False, "switch": "off"},
        {"grouping": False},
        {"combine": "linear", "bias": 0.0},
        {"bias": 0.0},
        {"theta": 0.9},
    ],
)
def test_ablation_options_match_reference_and_change_the_map(small_resnet, options):
    model = small_resnet
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))

    # A non-linear tail (a whole residual block follows): with a linear tail s⁺ and s⁻ coincide.
    def tail(a):
        return model.fc(torch.flatten(model.avgpool(model.layer4[1](a)), 1))

    full = fdcam.FDCAM(model, "layer4.0")(x, targets=5)[0, 0]
    ours = fdcam.FDCAM(model, "layer4.0", **options)(x, targets=5)[0, 0]
    ref = fdcam_reference(model, model.layer4[0], tail, x, 5, **options)
    corr, diff = agreement(ours, ref)
    assert corr >= 0.999 and diff <= 0.02, (options, corr, diff)
    assert (ours - full).abs().max() > 1e-3, "the option must change the result"


def test_multi_class_and_batch_equal_single_calls(small_resnet):
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    cam = fdcam.FDCAM(small_resnet, "layer4")
    together = cam(x, targets=[[1, 2], [3, 4]])
    assert together.shape == (2, 2, 128, 128)
    for i, classes in enumerate([[1, 2], [3, 4]]):
        for t, c in enumerate(classes):
            single = cam(x[i : i + 1], targets=c)[0, 0]
            assert_same_up_to_rounding(together[i, t], single)


def test_output_contract(small_resnet):
    x = torch.randn(3, 3, 96, 112, generator=torch.Generator().manual_seed(6))
    maps = fdcam.FDCAM(small_resnet, small_resnet.layer4)(x)
    assert maps.shape == (3, 1, 96, 112) and maps.dtype == torch.float32
    assert maps.min() >= 0 and maps.max() <= 1
    top1 = small_resnet(x).argmax(1)
    assert torch.equal(fdcam.FDCAM(small_resnet, "layer4")(x, targets=top1.tolist()), maps)


def test_switch_passes_run_in_one_tail_call_within_budget(small_resnet):
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(7))
    cam = fdcam.FDCAM(small_resnet, "layer4")
    cam(x)
    (tail,) = cam.tails
    assert tail.calls == 1
    chunked = fdcam.FDCAM(small_resnet, "layer4", tail_batch_size=100)
    assert_same_up_to_rounding(chunked(x), cam(x))
    assert chunked.tails[0].calls == 11  # ceil(1024 / 100)


def test_invalid_options_are_refused(small_resnet):
    for bad in ({"combine": "square"}, {"switch": "on"}, {"theta": 1.5}, {"backend": "tvm"}):
        with pytest.raises(ValueError):
            fdcam.FDCAM(small_resnet, "layer4", **bad)


@pytest.mark.parametrize("method", ["FDCAM", "AblationCAM"])
def test_a_batch_runs_its_switch_passes_in_one_tail_call(small_resnet, method):
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(10))
    cam = getattr(fdcam, method)(small_resnet, "layer4")
    together = cam(x)
    assert cam.tails[0].calls == 1
    for i in range(3):
        assert_same_up_to_rounding(together[i], cam(x[i : i + 1])[0])


def test_torch_precision_and_cuda_graph_options_are_checked(small_resnet):
    with pytest.raises(ValueError, match="precision"):
        fdcam.FDCAM(small_resnet, "layer4", precision="int8")
    with pytest.raises(ValueError, match="cuda_graph"):
        fdcam.FDCAM(small_resnet, "layer4", backend="onnxruntime", cuda_graph=True)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(11))
    exact = fdcam.FDCAM(small_resnet, "layer4")(x)
    assert torch.equal(fdcam.FDCAM(small_resnet, "layer4", precision="tf32")(x), exact)  # TF32 is CUDA-only math
    bf16 = fdcam.FDCAM(small_resnet, "layer4", precision="bf16")(x)
    assert agreement(bf16[0, 0], exact[0, 0])[0] > 0.99


@pytest.mark.gpu
def test_cuda_graph_maps_equal_eager_maps_on_vgg16(vgg16_random):
    model = copy.deepcopy(vgg16_random).cuda()  # a copy: the session's model stays on the CPU
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(12)).cuda()
    eager = fdcam.FDCAM(model, "features.30")
    graphed = fdcam.FDCAM(model, "features.30", cuda_graph=True)
    for scale in (1.0, 0.5):
        torch.testing.assert_close(graphed(x * scale), eager(x * scale), atol=1e-5, rtol=1e-5)
    assert graphed.tails[0].graph_replays == 2
