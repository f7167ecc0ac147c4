"""Tests for fdcam.engine.plan: each form the planner chooses, chosen for the tail it fits and executed by the torch
engine as exactly as the plain masked tail (a slow loop over images and masks written here); the ONNX Runtime
tail's graph form and the traced graph's choice come from the same plan."""

import dataclasses

import pytest
import torch
from torch import nn

import fdcam.engine.plan as plan_module
from fdcam.engine import FORMS, PassPlan, TailForm, plan_passes, sparse_side
from fdcam.factorise import tail_shortcut
from fdcam.switch import switch_masks
from fdcam.tail import TorchTail
from nets import ConvStart, Mlp, Residual, split_at
from reference import assert_same_up_to_rounding


def plain_passes(tail, features, masks, extras=()):
    """Logits [N,M,C] of the tail on each masked copy, one image and one mask at a time (no batching, no shortcut)."""
    rows = []
    with torch.no_grad():
        for i in range(features.shape[0]):
            image = [
                tail(features[i : i + 1] * mask[None, :, None, None], *(e[i : i + 1] for e in extras))[0]
                for mask in masks[i]
            ]
            rows.append(torch.stack(image))
    return torch.stack(rows)


class PoolLinear(nn.Module):
    """A stem, then pooling and one Linear: the tail's first op is its last Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.fc = nn.Linear(12, 7)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.stem(x), 1), 1))


def _tail(model, layer="stem"):
    torch.manual_seed(0)
    return split_at(model.eval(), layer, torch.randn(2, 3, 8, 8))


def _sparse_masks(n, m, k, ones, seed=0):
    """0/1 masks [n,m,k], each row with `ones` ones, and the switch-off rows (`ones` zeros) after them."""
    generator = torch.Generator().manual_seed(seed)
    on = torch.zeros(n, m, k)
    for i in range(n):
        for j in range(m):
            on[i, j, torch.randperm(k, generator=generator)[:ones]] = 1
    return torch.cat([on, 1 - on], 1)


def _chosen(monkeypatch):
    """The plans the torch engine gets from the planner, recorded as it asks."""
    plans = []

    def recording(*args, **kwargs):
        plans.append(plan_passes(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr("fdcam.tail.plan_passes", recording)
    return plans


def _check_form(monkeypatch, split, features, extras, masks, form, *, sparsity=None, precision="fp32", classes=None):
    """plan_passes picks `form` for these passes, the torch engine executes it, and its logits are the plain tail's."""
    shortcut = TorchTail(split.tail).shortcut_for(features, extras)
    plan = plan_passes(
        shortcut,
        features,
        num_rows=masks.shape[1],
        classes=classes is not None,
        masks=masks,
        sparsity=sparsity,
        precision=precision,
    )
    assert plan.form == form
    plans = _chosen(monkeypatch)
    tail = TorchTail(split.tail, precision=precision)
    got = tail.run(features, masks, extras, classes, sparsity=sparsity)
    assert [p.form for p in plans] == [form]
    expected = plain_passes(split.tail, features, masks, extras)
    if classes is not None:
        expected = expected.gather(2, classes[:, None].expand(-1, masks.shape[1], -1))
    assert_same_up_to_rounding(got, expected)
    return plan, tail


def test_an_unrecognised_tail_is_planned_plain(monkeypatch):
    split, features, extras = _tail(ConvStart(plain=True))
    assert tail_shortcut(split.tail, features, extras) is None
    masks = _sparse_masks(2, 5, 16, 2)
    plan, _ = _check_form(
        monkeypatch, split, features, extras, masks, "plain", sparsity=2, classes=torch.tensor([[1], [4]])
    )
    assert plan.bound is None and not plan.classes  # the plain tail computes every class


def test_real_valued_masks_take_the_dense_product_of_a_first_convolution(monkeypatch):
    split, features, extras = _tail(ConvStart(kernel=3, padding=1))
    masks = torch.rand(2, 6, 16, generator=torch.Generator().manual_seed(1))
    assert sparse_side(masks) is None
    plan, tail = _check_form(monkeypatch, split, features, extras, masks, "shortcut-dense", sparsity=2)
    assert plan.bound is None and tail.sparse_calls == 0


def test_rows_denser_than_a_quarter_of_the_channels_take_the_dense_product(monkeypatch):
    split, features, extras = _tail(ConvStart(kernel=1))
    masks = _sparse_masks(2, 3, 16, 5)  # 5 > 16/4 ones or zeros per row
    _check_form(monkeypatch, split, features, extras, masks, "shortcut-dense")


def test_sparse_rows_of_a_first_convolution_are_gathered_sums_off_the_cpu_fp32_path(monkeypatch):
    split, features, extras = _tail(ConvStart(kernel=3, padding=1))
    masks = _sparse_masks(2, 4, 16, 3)
    classes = torch.tensor([[0, 4], [2, 2]])
    # tf32 on a CPU is fp32 math, but only fp32 runs per channel set: these rows are gathered one by one
    plan, tail = _check_form(
        monkeypatch, split, features, extras, masks, "gathered", sparsity=4, precision="tf32", classes=classes
    )
    assert plan.bound == 4 and plan.classes and tail.sparse_calls == 1
    _check_form(monkeypatch, split, features, extras, masks, "gathered", precision="tf32")  # measured bound: 3


@pytest.mark.parametrize("model", ["conv", "linear"])
def test_sparse_rows_on_the_cpu_in_fp32_are_summed_per_channel_set(monkeypatch, model):
    if model == "conv":
        split, features, extras = _tail(ConvStart(kernel=1))
        masks, k = _sparse_masks(2, 4, 16, 2), 16
    else:  # a first Linear then more Linears: any 0/1 density per set, up to half of the channels
        split, features, extras = _tail(Mlp(), "features.1")
        masks, k = _sparse_masks(2, 3, 6, 3), 6
    plan, tail = _check_form(monkeypatch, split, features, extras, masks, "sets", sparsity=k // 4 or 1)
    # the promised bound when every row keeps it (conv: 2 ≤ 4), else the measured one (linear: 3 > 1)
    assert plan.bound == (4 if model == "conv" else 3) and tail.sparse_calls == 1


def test_a_first_linear_with_real_valued_masks_is_one_dense_product(monkeypatch):
    split, features, extras = _tail(Mlp(), "features.1")
    masks = torch.rand(2, 5, 6, generator=torch.Generator().manual_seed(2))
    plan, _ = _check_form(
        monkeypatch, split, features, extras, masks, "shortcut-dense", classes=torch.tensor([[3], [0]])
    )
    assert plan.classes  # the last Linear's rows of the classes only


def test_groups_of_a_first_op_that_is_the_last_linear_are_group_sums_without_mask_rows(monkeypatch):
    split, features, extras = _tail(PoolLinear())
    k = features.shape[1]
    groups = _sparse_masks(2, k, k, 3)[:, :k].bool()
    classes = torch.tensor([[6, 1], [0, 0]])
    shortcut = TorchTail(split.tail).shortcut_for(features, extras)
    plan = plan_passes(shortcut, features, num_rows=2 * k, classes=True, groups=True)
    assert plan.form == "group-sums" and plan.classes
    plans = _chosen(monkeypatch)
    on, off = TorchTail(split.tail).group_passes(features, groups, extras, classes)
    assert [p.form for p in plans] == ["group-sums"]
    expected = plain_passes(split.tail, features, switch_masks(groups, "on_off"), extras)
    expected = expected.gather(2, classes[:, None].expand(-1, 2 * k, -1))
    assert_same_up_to_rounding(torch.cat([on, off], 1), expected)
    # without classes, or with mask rows asked in chunks (batch_size), the groups become mask rows
    assert plan_passes(shortcut, features, num_rows=2 * k, groups=True).form != "group-sums"
    assert TorchTail(split.tail, batch_size=5).group_passes(features, groups, extras, classes) is None


def test_every_form_is_named_and_plans_are_values():
    assert set(FORMS) == {"plain", "shortcut-dense", "gathered", "sets", "group-sums"}
    plan = PassPlan("gathered", bound=3, rows=8)
    assert plan.gathers and plan.shortcut and hash(plan) == hash(dataclasses.replace(plan))
    assert TailForm.of(plan) == TailForm(bound=3) and TailForm.of(PassPlan("sets", bound=3)) == TailForm(bound=3)
    assert TailForm.of(PassPlan("shortcut-dense", classes=True)) == TailForm(classes=True)
    with pytest.raises(ValueError, match="engine"):
        plan_passes(None, torch.zeros(1, 4, 2, 2), num_rows=1, engine="tensorflow")


def test_the_onnxruntime_tail_and_the_graph_tail_take_their_form_from_the_same_plan(monkeypatch):
    from fdcam.export.graph_tail import GraphTail
    from fdcam.runtime.session import OrtTail

    split, features, extras = _tail(ConvStart(kernel=1))
    shortcut = tail_shortcut(split.tail, features, extras)
    ort_tail = OrtTail(lambda form: pytest.fail("no session is opened to plan"), "cpu", shortcut=shortcut)
    graph_tail = GraphTail(split.tail, features, extras)
    masks = _sparse_masks(2, 4, 16, 3)
    classes = torch.tensor([[0], [1]])

    def forms(sparsity):
        ort = TailForm.of(ort_tail.plan(features, masks, classes, sparsity))
        graph = graph_tail.plan(features, masks.shape[1], sparsity)
        return ort, TailForm(classes=True, bound=graph.bound if graph.gathers else None)

    ort, graph = forms(4)
    assert ort == graph == TailForm(classes=True, bound=4)
    ort, graph = forms(8)  # over a quarter of 16 channels: both take the dense graph
    assert ort == graph == TailForm(classes=True)
    monkeypatch.setattr(plan_module, "CONV_SPARSE_SHARE", 0.5)  # the one threshold moves: both follow
    ort, graph = forms(8)
    assert ort == graph == TailForm(classes=True, bound=8)
    # the ONNX Runtime tail checks the bound on the masks, the graph (traced masks) trusts it
    assert TailForm.of(ort_tail.plan(features, masks, classes, 2)).bound is None
    assert graph_tail.plan(features, masks.shape[1], 2).bound == 2


@pytest.mark.parametrize("batch_size", [None, 3])
def test_the_graph_engine_executes_its_plans_as_the_plain_tail(batch_size):
    from fdcam.export.graph_tail import GraphTail

    for model, layer, group_form in ((ConvStart(kernel=1), "stem", "sets"), (Mlp(), "features.1", "group-sums")):
        split, features, extras = _tail(model, layer)
        k = features.shape[1]
        graph = GraphTail(split.tail, features, extras, batch_size=batch_size)
        assert batch_size is None or graph.rows == graph.gather_rows == batch_size  # tail_batch_size: rows a chunk
        groups = _sparse_masks(2, k, k, 1)[:, :k].bool()
        masks = switch_masks(groups, "on_off")
        classes = torch.tensor([[1, 0], [2, 2]])
        expected = plain_passes(split.tail, features, masks, extras).gather(2, classes[:, None].expand(-1, 2 * k, -1))
        sparsity = max(1, k // 4)
        assert graph.plan(features, 2 * k, sparsity, groups=True).form == group_form
        with torch.no_grad():
            rows = [
                graph.image_passes(features[i : i + 1], masks[i : i + 1], (), classes[i : i + 1], sparsity)
                for i in range(2)
            ]
            sums = [
                graph.image_group_passes(
                    features[i : i + 1], groups[i : i + 1], (), classes[i : i + 1], sparsity, "on_off"
                )
                for i in range(2)
            ]
        assert_same_up_to_rounding(torch.cat(rows), expected)
        assert_same_up_to_rounding(torch.cat(sums), expected)


def test_a_tail_only_ending_in_a_linear_runs_dense_with_the_class_rows(monkeypatch):
    from fdcam.export.graph_tail import GraphTail

    split, features, extras = _tail(Residual(), "conv1")  # the skip tensor crosses the split
    shortcut = tail_shortcut(split.tail, features, extras)
    assert shortcut is not None and shortcut.kind == "plain"
    masks = _sparse_masks(2, 3, 8, 1)
    plan, _ = _check_form(
        monkeypatch, split, features, extras, masks, "shortcut-dense", sparsity=1, classes=torch.tensor([[4], [0]])
    )
    assert plan.classes
    graph = GraphTail(split.tail, features, extras)  # no group sums: its groups become mask rows
    assert graph.plan(features, 16, 2, groups=True).form == "shortcut-dense"


def test_plain_passes_on_a_cpu_run_in_chunks_the_allocator_reuses():
    # Masked copies and segmentation maps per pass: the default budget would hold 1 GB of them in one chunk, faulted
    # in anew at every call; on a CPU a chunk holds CPU_CHUNK_BYTES of rows (counted as chunk_size counts them), a
    # given batch_size wins.
    features = torch.zeros(2, 960, 2, 2)
    output_numel = 21 * 32 * 32
    per_row = (4 * features[0].numel() + 2 * output_numel) * features.element_size()
    plan = plan_passes(None, features, num_rows=1920, output_numel=output_numel)
    assert plan.form == "plain" and plan.rows == plan_module.CPU_CHUNK_BYTES // per_row
    assert plan_passes(None, features, num_rows=1920, output_numel=output_numel, batch_size=500).rows == 500
    logits_only = plan_passes(None, features, num_rows=1920)  # masked copies alone, chunked the same way
    assert logits_only.rows == plan_module.CPU_CHUNK_BYTES // (4 * features[0].numel() * features.element_size())
    small = plan_passes(None, features, num_rows=1920, output_numel=output_numel, memory_budget=per_row * 3)
    assert small.rows == 3  # a budget below the chunk still bounds it
