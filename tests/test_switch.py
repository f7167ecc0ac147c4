"""fdcam.switch against the paper's Eq. 6-8 written as loops, one tail pass per image, group and switch:
s⁺_k = f_c(tail(A ⊙ 1_G(k))), s⁻_k = f_c(X) − f_c(tail(A ⊙ (1 − 1_G(k)))), s_k = (s⁺_k + s⁻_k)/2.

(The refusal of switches other than "on_off" and "off" is in test_options.py with the other choices.)"""

import pytest
import torch

from fdcam.groups import GroupMembers, channel_groups
from fdcam.switch import switch_logits, switch_masks, switch_scores
from fdcam.tail import TorchTail
from nets import Mlp, Residual, split_at
from reference import assert_same_up_to_rounding


def random_groups(k: int, seed: int) -> torch.Tensor:
    """Boolean [K,K] groups with an empty row and a full row besides random ones."""
    groups = torch.rand(k, k, generator=torch.Generator().manual_seed(seed)) > 0.6
    groups[0], groups[-1] = False, True
    return groups


def plain_masks(groups: torch.Tensor, switch: str) -> torch.Tensor:
    """The mask rows one channel at a time: 1_G(k) for every k (switch-on), then 1 − 1_G(k) (switch-off)."""
    k = groups.shape[0]
    on = [[1.0 if bool(groups[c, j]) else 0.0 for j in range(k)] for c in range(k)]
    off = [[1.0 - value for value in row] for row in on]
    return torch.tensor(off if switch == "off" else on + off)


def tail_of(split, extras):
    """The split's tail for image n on one masked copy a [K,h,w]: logits [C], with image n's extras."""

    def tail(n: int, a: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return split.tail(a[None], *[extra[n : n + 1] for extra in extras])[0]

    return tail


@pytest.mark.parametrize("switch", ["on_off", "off"])
def test_switch_masks_are_the_group_indicators_then_their_complements(switch):
    groups = torch.stack([random_groups(6, seed) for seed in range(3)])
    batched = switch_masks(groups, switch)
    assert batched.dtype == torch.float32 and batched.shape == (3, 12 if switch == "on_off" else 6, 6)
    for image, masks in zip(groups, batched, strict=True):
        assert torch.equal(masks, plain_masks(image, switch))
        assert torch.equal(switch_masks(image, switch), masks)


@pytest.fixture(scope="module", params=["residual", "mlp"])
def net(request):
    """A split with a skip tensor crossing the cut (Residual), or a factorisable pooled MLP tail (Mlp)."""
    torch.manual_seed(0)
    model, layer = (Residual(), "conv1") if request.param == "residual" else (Mlp(), "features.1")
    model.eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    split, activations, extras = split_at(model, layer, x)
    with torch.no_grad():
        full = model(x)
    return split, activations, extras, full


def test_switch_logits_are_the_tail_on_each_masked_copy(net):
    split, activations, extras, _ = net
    k = activations.shape[1]
    masks = switch_masks(torch.stack([random_groups(k, seed) for seed in (2, 3)]))  # [2,2K,K]
    got = switch_logits(TorchTail(split.tail), activations, masks, extras)
    tail = tail_of(split, extras)
    expected = torch.stack(
        [torch.stack([tail(n, activations[n] * row[:, None, None]) for row in masks[n]]) for n in range(2)]
    )
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert_same_up_to_rounding(got, expected)


def test_switch_logits_of_some_classes_with_shared_masks_are_those_columns_of_all_logits(net):
    split, activations, extras, _ = net
    k = activations.shape[1]
    groups = channel_groups(activations[0], theta=0.6)
    shared = switch_masks(groups)  # [2K,K] for both images
    all_logits = switch_logits(TorchTail(split.tail), activations, switch_masks(torch.stack([groups, groups])), extras)
    classes = torch.tensor([[3, 0], [1, 1]])
    sparsity = max(int(groups.sum(1).max()), 1)  # no row has more ones (switch-on) or zeros (switch-off)
    got = switch_logits(TorchTail(split.tail), activations, shared, extras, classes, sparsity=sparsity)
    assert got.shape == (2, 2 * k, 2)
    assert_same_up_to_rounding(got, all_logits.gather(2, classes[:, None, :].expand(-1, 2 * k, -1)))


def plain_scores(logits: torch.Tensor, full: torch.Tensor, classes: list[int], switch: str) -> torch.Tensor:
    """Eq. 6-8 for one image, one class and one channel at a time; logits [M,C] of the mask rows, full [C]."""
    k = logits.shape[0] if switch == "off" else logits.shape[0] // 2
    scores = torch.zeros(len(classes), k)
    for t, c in enumerate(classes):
        for channel in range(k):
            switch_off = full[c] - logits[channel if switch == "off" else k + channel, c]  # s⁻
            scores[t, channel] = switch_off if switch == "off" else (logits[channel, c] + switch_off) / 2
    return scores


@pytest.mark.parametrize("switch", ["on_off", "off"])
def test_switch_scores_follow_the_papers_equations_and_a_batch_equals_single_images(switch):
    generator = torch.Generator().manual_seed(9)
    k, c = 4, 5
    logits = torch.randn(2, 2 * k if switch == "on_off" else k, c, generator=generator)
    full = torch.randn(2, c, generator=generator)
    classes = torch.tensor([[1, 3], [4, 0]])
    of_classes = logits.gather(2, classes[:, None, :].expand(-1, logits.shape[1], -1))  # what switch_logits gives
    batched = switch_scores(of_classes, full, classes, switch)
    assert batched.shape == (2, 2, k)
    for i in range(2):
        # the same float32 operations, in the same order: equal, not only close
        assert torch.equal(batched[i], plain_scores(logits[i], full[i], classes[i].tolist(), switch))
        assert torch.equal(switch_scores(of_classes[i], full[i], classes[i], switch), batched[i])


@pytest.mark.parametrize("switch", ["on_off", "off"])
def test_scores_from_one_batched_tail_call_equal_one_tail_pass_per_group_and_switch(net, switch):
    split, activations, extras, full = net
    groups = channel_groups(activations, theta=0.6)  # [2,K,K], groups of a few channels
    classes = full.topk(2, dim=1).indices
    logits = switch_logits(TorchTail(split.tail), activations, switch_masks(groups, switch), extras, classes)
    got = switch_scores(logits, full, classes, switch)
    tail = tail_of(split, extras)
    expected = torch.zeros_like(got)
    for n in range(2):
        for t, c in enumerate(classes[n].tolist()):
            for k, group in enumerate(groups[n]):
                on = group.float()[:, None, None]
                switch_off = full[n, c] - tail(n, activations[n] * (1 - on))[c]
                both = (tail(n, activations[n] * on)[c] + switch_off) / 2
                expected[n, t, k] = switch_off if switch == "off" else both
    assert_same_up_to_rounding(got, expected)


class PooledLinear(torch.nn.Module):
    """Conv features, global average pool and one Linear: a tail whose first op is its last Linear."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 12, 3, padding=1), torch.nn.ReLU())
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(12, 7)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@pytest.mark.parametrize("switch", ["on_off", "off"])
@pytest.mark.parametrize("model_class, layer", [(PooledLinear, "features.1"), (Mlp, "features.1")])
def test_group_switch_logits_are_the_tail_on_each_masked_copy(model_class, layer, switch):
    from fdcam.switch import group_switch_logits
    from fdcam.targets import BatchTargets

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    split, activations, extras = split_at(model_class().eval(), layer, x)
    k = activations.shape[1]
    groups = torch.stack([random_groups(k, seed) for seed in (4, 5)])
    classes = torch.tensor([[3, 0], [1, 1]])
    tail = tail_of(split, extras)
    expected = torch.stack(
        [
            torch.stack(
                [tail(n, activations[n] * row[:, None, None])[classes[n]] for row in plain_masks(groups[n], switch)]
            )
            for n in range(2)
        ]
    )  # [N,M,T], one pass per mask row
    torch_tail = TorchTail(split.tail)
    direct = torch_tail.group_passes(activations, groups, extras, classes)
    assert (direct is not None) == (model_class is PooledLinear)  # only a first op that is the last Linear
    for targets in (classes, BatchTargets.from_classes(classes, (7 if model_class is PooledLinear else 4,))):
        got = group_switch_logits(torch_tail, activations, groups, switch, extras, targets)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert_same_up_to_rounding(got, expected)
    # The groups as rows of candidates (fdcam.groups.GroupMembers): each row's members, then non-members.
    index = groups.float().topk(min(k, int(groups.sum(-1).max()) + 1), dim=-1).indices
    members = GroupMembers(index, groups.gather(-1, index))
    got = group_switch_logits(torch_tail, activations, groups, switch, extras, classes, members=members)
    assert_same_up_to_rounding(got, expected)
    all_classes = group_switch_logits(torch_tail, activations, groups, switch, extras)  # no classes: the masks' run
    assert_same_up_to_rounding(all_classes.gather(2, classes[:, None, :].expand(-1, expected.shape[1], -1)), expected)
