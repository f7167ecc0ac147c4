"""Tests for fdcam.factorise: every shortcut of a tail (factorised first Linear, convolution start, target rows)
equals the masked tail."""

import dataclasses
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fdcam import FDCAM
from fdcam.factorise import ShortcutGraph, TailShortcut, max_group_size, sparse_rows, tail_shortcut
from fdcam.tail import MaskedTail, TorchTail
from nets import ConvStart, split_at


def _relative_error(got, expected):
    return float((got - expected).abs().max() / expected.abs().max())


def _masks(k, n=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    binary = (torch.rand(n, k, generator=generator) > 0.5).float()
    weights = torch.rand(4, k, generator=generator)
    return torch.cat([torch.ones(1, k), torch.zeros(1, k), binary, weights])


@pytest.fixture(scope="module")
def vgg16(vgg16_random):
    model = vgg16_random
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return model, x, *split_at(model, "features.30", x)


def test_vgg16_features30_factorised_equals_masked_tail(vgg16):
    _, _, split, activations, extras = vgg16
    factorised = tail_shortcut(split.tail, activations, extras)
    assert isinstance(factorised, TailShortcut) and factorised.kind == "linear"
    assert (factorised.num_channels, factorised.block, factorised.out_features) == (512, 49, 4096)
    masks = _masks(512)
    with torch.no_grad():
        expected = MaskedTail(split.tail)(activations, masks[None])[0]
        got = factorised(activations, masks[None])[0]
    assert got.shape == expected.shape == (masks.shape[0], 1000)
    assert _relative_error(got, expected) < 1e-5


def test_factorised_tail_shares_the_model_weights(vgg16):
    model, _, split, activations, extras = vgg16
    factorised = tail_shortcut(split.tail, activations, extras)
    assert factorised.linear.weight is model.classifier[0].weight
    parameters = {id(p) for p in model.parameters()}
    assert all(id(p) in parameters for p in factorised.parameters())


def test_resnet50_layer4_is_factorised_too(resnet50_random):
    # layer4 is followed by AdaptiveAvgPool2d → flatten → fc: the pattern applies (block of 1 per channel).
    torch.manual_seed(0)
    split, activations, extras = split_at(resnet50_random, "layer4", torch.randn(1, 3, 224, 224))
    factorised = tail_shortcut(split.tail, activations, extras)
    assert factorised.kind == "linear" and factorised.block == 1 and factorised.first_is_final
    masks = _masks(2048, n=16)
    with torch.no_grad():
        assert (
            _relative_error(factorised(activations, masks[None]), MaskedTail(split.tail)(activations, masks[None]))
            < 1e-5
        )


class _Functional(nn.Module):
    """view(size, -1), F.dropout (eval), F.linear on a parameter, and a batch-size use after the Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(5, 6 * 4 * 4) * 0.1)
        self.bias = nn.Parameter(torch.randn(5))
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        a = F.avg_pool2d(F.relu(self.conv(x)), 2)
        a = a.view(a.size(0), -1)
        a = F.dropout(a, 0.5, training=False)
        z = F.relu(F.linear(a, self.weight, self.bias))
        return self.out(z.reshape(z.shape[0], -1))


def test_a_relu_between_the_target_and_the_linear_stops_the_pattern():
    torch.manual_seed(0)
    model = _Functional().eval()
    split, activations, extras = split_at(model, "conv", torch.randn(1, 3, 8, 8))
    # The target is the conv; the relu after it is not linear: only the last Linear's rows can be chosen.
    assert tail_shortcut(split.tail, activations, extras).kind == "plain"


class _Pooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.weight = nn.Parameter(torch.randn(5, 6 * 4 * 4) * 0.1)
        self.bias = nn.Parameter(torch.randn(5))
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        a = F.avg_pool2d(self.conv(x), 2)
        a = a.view(a.size(0), -1)
        a = F.dropout(a, 0.5, training=False)
        z = F.relu(F.linear(a, self.weight, self.bias))
        return self.out(z.reshape(z.shape[0], -1))


def test_functional_linear_view_and_batch_size_in_the_rest():
    torch.manual_seed(0)
    model = _Pooled().eval()
    split, activations, extras = split_at(model, "conv", torch.randn(1, 3, 8, 8))
    factorised = tail_shortcut(split.tail, activations, extras)
    assert factorised.kind == "linear" and factorised.block == 16
    masks = _masks(6, n=10)
    with torch.no_grad():
        assert (
            _relative_error(factorised(activations, masks[None]), MaskedTail(split.tail)(activations, masks[None]))
            < 1e-5
        )


@pytest.mark.parametrize(
    ("prefix", "matches"),
    [
        (lambda a: a.mean((2, 3)), True),
        (lambda a: torch.mean(a, dim=(-1, -2)), True),
        (lambda a: F.adaptive_avg_pool2d(a, 1).squeeze(-1).squeeze(-1), True),
        (lambda a: F.adaptive_avg_pool2d(a, 1).flatten(1), True),
        (lambda a: a.mean(1).flatten(1)[:, :6], False),  # mixes channels
        (lambda a: F.avg_pool2d(a, 2).reshape(a.shape[0], -1)[:, :6], False),  # slicing is not recognised
    ],
    ids=["mean", "torch.mean", "squeeze", "flatten", "channel-mean", "slice"],
)
def test_global_pooling_prefixes(prefix, matches):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            return self.fc(prefix(self.conv(x)))

    torch.manual_seed(0)
    model = Net().eval()
    split, activations, extras = split_at(model, "conv", torch.randn(1, 3, 8, 8))
    factorised = tail_shortcut(split.tail, activations, extras)
    assert (factorised.kind == "linear") == matches
    if matches:
        masks = _masks(6, n=10)
        with torch.no_grad():
            assert (
                _relative_error(factorised(activations, masks[None]), MaskedTail(split.tail)(activations, masks[None]))
                < 1e-5
            )


def test_nonlinear_or_channel_mixing_prefixes_are_not_factorised():
    class MaxPooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 4 * 4, 2)

        def forward(self, x):
            return self.fc(torch.flatten(F.max_pool2d(self.conv(x), 2), 1))

    class Permuted(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, 2)

        def forward(self, x):
            return self.fc(torch.flatten(self.conv(x).permute(0, 2, 3, 1), 1))

    for model in (MaxPooled().eval(), Permuted().eval()):
        split, activations, extras = split_at(model, "conv", torch.randn(1, 3, 8, 8))
        assert tail_shortcut(split.tail, activations, extras).kind == "plain"


def test_chunked_runs_equal_one_batch(vgg16):
    _, _, split, activations, extras = vgg16
    masks = _masks(512, n=40)
    one = TorchTail(split.tail)
    chunked = TorchTail(split.tail, batch_size=7)
    assert one.shortcut_for(activations, extras).kind == "linear"
    whole = one.run(activations, masks, extras)
    pieces = chunked.run(activations, masks, extras)
    assert one.calls == 1 and chunked.calls == -(-masks.shape[0] // 7)
    assert _relative_error(pieces, whole) < 1e-5
    with torch.no_grad():
        assert _relative_error(whole, MaskedTail(split.tail)(activations, masks[None])) < 1e-5


def test_torch_tail_factorise_off_runs_the_masked_tail(vgg16):
    _, _, split, activations, extras = vgg16
    tail = TorchTail(split.tail, factorise=False)
    assert tail.shortcut_for(activations, extras) is None
    masks = _masks(512, n=4)
    on = TorchTail(split.tail).run(activations, masks, extras)
    assert _relative_error(tail.run(activations, masks, extras), on) < 1e-5


@pytest.mark.slow  # FD-CAM on VGG16 at 224, twice
def test_fdcam_maps_equal_with_factorise_on_and_off(vgg16, monkeypatch):
    model, x, *_ = vgg16
    on = FDCAM(model, "features.30")
    maps_on = on(x)
    assert any(t.shortcut_for(on.split_for(x).head(x)[0]) is not None for t in on.tails)
    monkeypatch.setattr("fdcam.methods.base.TorchTail", functools.partial(TorchTail, factorise=False))
    off = FDCAM(model, "features.30")
    maps_off = off(x)
    assert all(not t.factorise for t in off.tails)
    torch.testing.assert_close(maps_on, maps_off, atol=1e-4, rtol=0)


def test_factorised_tail_leaves_the_shared_dropout_in_eval_after_export(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d((2, 2)),
        nn.Flatten(),
        nn.Dropout(),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    ).eval()
    split, activations, extras = split_at(model, "1", torch.randn(1, 3, 8, 8))
    factorised = tail_shortcut(split.tail, activations, extras)
    assert factorised is not None and not factorised.training
    masks = _masks(8, n=6)
    path = tmp_path / "factorised.onnx"
    torch.onnx.export(
        factorised,
        (activations, masks[None]),
        str(path),
        input_names=["features", "masks"],
        output_names=["logits"],
        dynamic_axes={"masks": {1: "batch"}, "logits": {1: "batch"}},
        dynamo=False,
    )
    assert not model[4].training  # the exporter's train-mode "restore" did not reach the user's dropout
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    more = torch.cat([masks, masks[:3]])
    (got,) = session.run(None, {"features": activations.numpy(), "masks": more[None].numpy()})
    with torch.no_grad():
        expected = MaskedTail(split.tail)(activations, more[None]).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # an ONNX export
def test_factorised_tail_exports_with_the_dynamo_exporter(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d((2, 2)),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    ).eval()
    split, activations, extras = split_at(model, "1", torch.randn(1, 3, 8, 8))
    factorised = tail_shortcut(split.tail, activations, extras)
    masks = _masks(8, n=6)
    path = tmp_path / "factorised.onnx"
    torch.onnx.export(
        factorised,
        (activations, masks[None]),
        str(path),
        input_names=["features", "masks"],
        output_names=["logits"],
        dynamic_shapes=({}, {1: torch.export.Dim("batch")}),
        dynamo=True,
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    more = torch.cat([masks, masks[:3]])
    (got,) = session.run(None, {"features": activations.numpy(), "masks": more[None].numpy()})
    with torch.no_grad():
        expected = MaskedTail(split.tail)(activations, more[None]).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


# --- tails that start with a convolution; target rows; the plain path --------------------------


def _group_masks(activations, theta=0.95):
    from fdcam.groups import channel_groups
    from fdcam.switch import switch_masks

    return switch_masks(channel_groups(activations, theta))  # [N,2K,K]: few ones, then few zeros


def _plain(split, activations, masks, extras):
    """One tail forward per image and mask: the reference every shortcut must equal."""
    with torch.no_grad():
        return torch.stack(
            [
                torch.cat(
                    [
                        split.tail(activations[i : i + 1] * mask[None, :, None, None], *(e[i : i + 1] for e in extras))
                        for mask in masks[i]
                    ]
                )
                for i in range(activations.shape[0])
            ]
        )


def _check_all_paths(split, activations, extras, masks, sparsity, kind):
    """Dense, gathered (where it applies), all classes and a subset, one call for all images: all equal the plain
    tail."""
    from reference import assert_same_up_to_rounding

    expected = _plain(split, activations, masks, extras)
    tail = TorchTail(split.tail)
    assert tail.shortcut_for(activations, extras).kind == kind
    classes = torch.tensor([[expected.shape[-1] - 1, 0, 3]] * activations.shape[0])
    subset = expected.gather(2, classes[:, None, :].expand(-1, expected.shape[1], -1))
    assert_same_up_to_rounding(tail.run(activations, masks, extras), expected, rel=1e-5)
    assert_same_up_to_rounding(tail.run(activations, masks, extras, classes, sparsity=sparsity), subset, rel=1e-5)
    with torch.no_grad():
        assert_same_up_to_rounding(
            tail.shortcut_for(activations, extras)(activations, masks, *extras), expected, rel=1e-5
        )
    return tail


@pytest.mark.slow  # every path on Lite0 at 224
def test_lite0_blocks15_conv_shortcut_equals_the_plain_tail(lite0):
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))  # small images: 3×3 maps
    split, activations, extras = split_at(lite0, "_blocks.15", x)
    shortcut = tail_shortcut(split.tail, activations, extras)
    assert shortcut.kind == "conv" and shortcut.norm is lite0._bn1 and shortcut.final is lite0._fc
    masks = _group_masks(activations)[:, ::8]  # 40 of the 320 switch-on and 40 of the switch-off rows
    tail = _check_all_paths(split, activations, extras, masks, max_group_size(320, 0.95), "conv")
    assert tail.sparse_calls == 2  # with and without the promised bound, the group masks took the gathered sums
    ablation = (1 - torch.eye(320))[None, ::16].expand(2, -1, -1)  # all but one channel: a gathered sum of 1
    _check_all_paths(split, activations, extras, ablation, 1, "conv")


@pytest.mark.parametrize(
    "options",
    [
        dict(kernel=1),
        dict(kernel=1, padding=1),
        dict(kernel=3, padding=1),
        dict(kernel=3, stride=2, padding=2, dilation=2, bias=False),
        dict(kernel=3, padding="same", norm=False),
        dict(kernel=1, functional=True),
        dict(kernel=3, padding=1, functional=True, norm=False),
    ],
    ids=["1x1", "1x1-padded", "3x3", "3x3-strided-dilated", "same-no-norm", "functional-1x1", "functional-3x3"],
)
def test_conv_shortcut_with_padding_kernels_and_batch_norm_equals_the_plain_tail(options):
    torch.manual_seed(0)
    model = ConvStart(**options).eval()
    split, activations, extras = split_at(model, "stem", torch.randn(2, 3, 9, 9))
    shortcut = tail_shortcut(split.tail, activations, extras)
    assert shortcut.kind == "conv" and (shortcut.norm is not None) == options.get("norm", True)
    few = torch.zeros(2, 6, 16)
    few[:, :3, :2] = 1  # rows with two ones
    few[:, 3:] = 1
    few[:, 3:, 5:8] = 0  # rows with three zeros
    _check_all_paths(split, activations, extras, few, 3, "conv")


def test_masks_that_are_not_sparse_take_the_dense_product():
    torch.manual_seed(0)
    split, activations, extras = split_at(ConvStart(kernel=1).eval(), "stem", torch.randn(1, 3, 9, 9))
    masks = torch.cat([_masks(16, n=6), torch.rand(1, 2, 16)[0]])[None]  # half on, and real-valued weights
    tail = _check_all_paths(split, activations, extras, masks, None, "conv")
    assert tail.sparse_calls == 0
    # A promised bound that the masks break is not trusted.
    ones = torch.ones(1, 2, 16)
    ones[0, 1, :8] = 0
    from reference import assert_same_up_to_rounding

    assert_same_up_to_rounding(
        tail.run(activations, ones, extras, sparsity=1), _plain(split, activations, ones, extras), rel=1e-5
    )


def test_sparse_rows_describe_each_row_by_its_smaller_side():
    masks = torch.tensor([[[1.0, 0, 0, 1, 0], [1, 1, 0, 1, 1]]])
    index, weight, complement = sparse_rows(masks, 2)
    assert complement[0, :, 0].tolist() == [False, True]
    assert sorted(index[0, 0][weight[0, 0] > 0].tolist()) == [0, 3]
    assert index[0, 1][weight[0, 1] > 0].tolist() == [2]
    assert max_group_size(320, 0.95) == 16 and max_group_size(512, 0.95) == 26 and max_group_size(2, 1.0) == 1


def test_group_sizes_never_exceed_the_static_bound():
    from fdcam.groups import channel_groups

    generator = torch.Generator().manual_seed(3)
    for k, theta in ((7, 0.5), (40, 0.9), (320, 0.95), (33, 0.0)):
        groups = channel_groups(torch.rand(2, k, 3, 3, generator=generator), theta)
        assert int(groups.sum(-1).max()) <= max_group_size(k, theta)


def test_resnet50_split_inside_the_last_block_stays_on_the_plain_path_and_exact(resnet50_random):
    # layer4.2.conv3: the tail starts bn3 → add(skip) → relu, not linear in the masks with a skip added.
    torch.manual_seed(0)
    split, activations, extras = split_at(resnet50_random, "layer4.2.conv3", torch.randn(2, 3, 64, 64))
    assert len(extras) == 1
    masks = _group_masks(activations)[:, ::64]  # a few rows of each kind keep this cheap
    _check_all_paths(split, activations, extras, masks, max_group_size(2048, 0.95), "plain")


def test_resnet50_layer4_first_linear_is_the_last_and_gives_class_rows_only(resnet50_random):
    torch.manual_seed(0)
    split, activations, extras = split_at(resnet50_random, "layer4", torch.randn(2, 3, 64, 64))
    masks = _group_masks(activations)[:, ::32]
    _check_all_paths(split, activations, extras, masks, max_group_size(2048, 0.95), "linear")


@pytest.mark.slow  # every path on VGG16 at 224
def test_vgg16_target_rows_and_sparse_first_linear_equal_the_plain_tail(vgg16):
    _, _, split, activations, extras = vgg16
    masks = _group_masks(activations)[:, ::16]
    _check_all_paths(split, activations, extras, masks, max_group_size(512, 0.95), "linear")
    ablation = (1 - torch.eye(512))[None, ::32]  # one zero per row: gathered
    tail = _check_all_paths(split, activations, extras, ablation, 1, "linear")
    assert tail.sparse_calls == 2  # with and without the bound


class _NonLinearStart(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 1)
        self.head = head

    def forward(self, x):
        return self.head(torch.sigmoid(self.conv2(torch.tanh(self.conv(x)))))


@pytest.mark.parametrize("ends_in_linear", [True, False])
def test_an_unrecognised_tail_takes_the_plain_path(ends_in_linear):
    torch.manual_seed(0)
    last = nn.Linear(16, 3) if ends_in_linear else nn.Softmax(1)
    final = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), last)
    model = _NonLinearStart(final).eval()
    split, activations, extras = split_at(model, "conv", torch.randn(2, 3, 6, 6))
    shortcut = tail_shortcut(split.tail, activations, extras)  # tanh first: not linear in the masks
    assert (shortcut is None) != ends_in_linear and (shortcut is None or shortcut.kind == "plain")
    masks = _masks(6, n=5)[None].expand(2, -1, -1)
    expected = _plain(split, activations, masks, extras)
    from reference import assert_same_up_to_rounding

    classes = torch.tensor([[2], [0]])
    tail = TorchTail(split.tail)
    assert_same_up_to_rounding(tail.run(activations, masks, extras), expected, rel=1e-5)
    assert_same_up_to_rounding(
        tail.run(activations, masks, extras, classes),
        expected.gather(2, classes[:, None].expand(-1, masks.shape[1], -1)),
        rel=1e-5,
    )


@pytest.mark.parametrize("options", [dict(kernel=1), dict(kernel=3, padding=1)], ids=["1x1", "3x3"])
def test_conv_passes_per_channel_set_equal_the_plain_tail_and_the_row_passes(options, monkeypatch):
    # FD-CAM's switch-on and switch-off rows of a group share one gathered sum; rows in any order,
    # repeated, or with no partner, and chunks of a few rows give the same logits.
    from reference import assert_same_up_to_rounding

    torch.manual_seed(0)
    split, activations, extras = split_at(ConvStart(**options).eval(), "stem", torch.randn(2, 3, 9, 9))
    paired = _group_masks(activations, theta=0.8)  # [2,32,16]: groups of at most 3 channels
    order = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    mixed = torch.cat([paired[:, order], paired[:, :3], 1 - paired[:, 20:22]], dim=1)
    bound = max_group_size(16, 0.8)
    classes = torch.tensor([[4, 0], [1, 2]])
    for masks in (paired, mixed):
        expected = _plain(split, activations, masks, extras)
        for batch_size in (None, 3):
            tail = TorchTail(split.tail, batch_size=batch_size)
            got = tail.run(activations, masks, extras, sparsity=bound)
            assert tail.sparse_calls == 1 and tail.calls >= (1 if batch_size is None else 2 * 32 // 3)
            assert_same_up_to_rounding(got, expected, rel=1e-5)
            subset = tail.run(activations, masks, extras, classes, sparsity=bound)
            assert_same_up_to_rounding(
                subset, expected.gather(2, classes[:, None].expand(-1, masks.shape[1], -1)), rel=1e-5
            )
        rows = TorchTail(split.tail)
        # the same plan, its gathered sums run per row instead of per channel set
        monkeypatch.setattr(rows, "plan", functools.partial(_rows_not_sets, rows.plan))
        assert_same_up_to_rounding(rows.run(activations, masks, extras, sparsity=bound), got, rel=1e-5)


def _rows_not_sets(plan, *args, **kwargs):
    chosen = plan(*args, **kwargs)
    assert chosen.form == "sets"
    return dataclasses.replace(chosen, form="gathered")


@pytest.mark.parametrize(
    "options",
    [dict(kernel=1), dict(kernel=1, functional=True), dict(kernel=3, padding=1)],
    ids=["1x1", "functional-1x1", "3x3"],
)
def test_shortcut_graph_with_classes_and_a_bound_equals_the_plain_tail(options):
    from reference import assert_same_up_to_rounding

    torch.manual_seed(0)
    model = ConvStart(**options).eval()
    split, activations, extras = split_at(model, "stem", torch.randn(2, 3, 9, 9))
    shortcut = tail_shortcut(split.tail, activations, extras)
    few = torch.zeros(2, 6, 16)
    few[:, :3, :2] = 1  # rows with two ones
    few[:, 3:] = 1
    few[:, 3:, 5:8] = 0  # rows with three zeros
    few[1, 0, 9] = 1
    classes = torch.tensor([[4, 0], [1, 1]])
    with torch.no_grad():
        expected = MaskedTail(split.tail)(activations, few, *extras)
        gathered = ShortcutGraph(shortcut, classes=True, bound=3)(activations, few, classes, *extras)
        dense = ShortcutGraph(shortcut)(activations, few, *extras)
    assert_same_up_to_rounding(gathered, expected.gather(2, classes[:, None].expand(-1, 6, -1)))
    assert_same_up_to_rounding(dense, expected)


class _LinearStart(nn.Module):
    """Convolution, 2×2 average pooling and a flattening into a Linear-ReLU-Linear head (VGG-shaped)."""

    def __init__(self, channels: int = 40):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Sequential(nn.Linear(channels * 4, 24), nn.ReLU(), nn.Linear(24, 5))

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.stem(x)), 1))


@pytest.mark.parametrize("theta", [0.92, 0.6], ids=["gathered-sums", "product-sums"])
def test_linear_passes_per_channel_set_equal_the_plain_tail(theta):
    # A first Linear's switch-on and switch-off rows share one sum per channel set, gathered for small
    # sets (at most GATHER_SHARE of the channels) and one product of 0/1 set rows for larger ones;
    # rows in any order, repeated or without partner, and chunks of a few rows give the same logits.
    from fdcam.factorise import GATHER_SHARE
    from reference import assert_same_up_to_rounding

    torch.manual_seed(0)
    split, activations, extras = split_at(_LinearStart().eval(), "stem", torch.randn(2, 3, 8, 8))
    paired = _group_masks(activations, theta=theta)  # [2,80,40]
    sizes = paired[:, :40].sum(-1)
    assert bool((sizes <= GATHER_SHARE * 40).all()) == (theta > 0.9)  # the branch the id names
    order = torch.randperm(80, generator=torch.Generator().manual_seed(1))
    mixed = torch.cat([paired[:, order], paired[:, :3], 1 - paired[:, 50:52]], dim=1)
    classes = torch.tensor([[4, 0], [1, 2]])
    for masks in (paired, mixed):
        expected = _plain(split, activations, masks, extras)
        for batch_size in (None, 7):
            tail = TorchTail(split.tail, batch_size=batch_size)
            assert tail.shortcut_for(activations, extras).kind == "linear"
            got = tail.run(activations, masks, extras)
            assert tail.sparse_calls == 1 and tail.calls >= (2 if batch_size is None else masks.shape[1] // 7)
            assert_same_up_to_rounding(got, expected, rel=1e-5)
            subset = tail.run(activations, masks, extras, classes)
            assert_same_up_to_rounding(
                subset, expected.gather(2, classes[:, None].expand(-1, masks.shape[1], -1)), rel=1e-5
            )


class _ActivationFirst(nn.Module):
    """A body whose start rows go through `activation` first (a module or a function), then a pool."""

    def __init__(self, activation, reads_start_again=False):
        super().__init__()
        self.activation = activation if isinstance(activation, nn.Module) else None
        self.function = None if isinstance(activation, nn.Module) else activation
        self.reads_start_again = reads_start_again

    def forward(self, start):
        hidden = self.activation(start) if self.activation is not None else self.function(start)
        pooled = hidden.mean((-2, -1)).view(start.size(0), -1)
        return pooled + start.sum((-2, -1)) if self.reads_start_again else pooled


@pytest.mark.parametrize(
    "activation",
    [nn.ReLU6(), nn.ReLU(), nn.Hardtanh(-1.0, 2.0), nn.Hardswish(), nn.SiLU(), nn.LeakyReLU(0.2), F.relu, torch.relu],
    ids=["ReLU6", "ReLU", "Hardtanh", "Hardswish", "SiLU", "LeakyReLU", "F.relu", "torch.relu"],
)
def test_an_owned_start_body_runs_its_first_activation_in_place_with_the_same_values(activation):
    from fdcam.factorise.in_place import owned_start_body

    body = torch.fx.symbolic_trace(_ActivationFirst(activation))
    owned = owned_start_body(body)
    assert owned is not body
    start = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(2)) * 4
    expected_activation = activation(start.clone())
    kept = start.clone()
    # The same element-wise function in place: equal up to a rounding or two of a vectorised exp (SiLU, Hardswish).
    close = functools.partial(torch.testing.assert_close, rtol=4 * 2.0**-24, atol=4 * 2.0**-24 * 16)
    close(owned(kept.clone()), body(start))
    assert torch.equal(start, kept)  # the plain body leaves its input alone
    owned(kept)
    close(kept, expected_activation)  # the owned body wrote the activation over its start rows
    # the user's module is not switched to in place
    assert all(getattr(module, "inplace", False) is False for module in body.modules())


def test_a_body_that_reads_its_start_rows_again_is_not_made_in_place():
    from fdcam.factorise.in_place import owned_start_body

    body = torch.fx.symbolic_trace(_ActivationFirst(nn.ReLU(), reads_start_again=True))
    assert owned_start_body(body) is body
    body = torch.fx.symbolic_trace(_ActivationFirst(torch.tanh))  # no in-place form known: left as it is
    assert owned_start_body(body) is body
