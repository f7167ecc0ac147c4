"""Small test networks and the split helper the test files share."""

import torch
import torch.nn.functional as F
from torch import nn

from fdcam.split import split_model


def split_at(model: nn.Module, layer: str, x: torch.Tensor):
    """The model split at `layer` for x, and the head's outputs for x: (split, activations, extras)."""
    split = split_model(model, layer, x)
    with torch.no_grad():
        activations, *extras = split.head(x)
    return split, activations, tuple(extras)


class Residual(nn.Module):
    """A residual block, so a split inside it has an extra (the skip tensor) crossing the cut."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        skip = torch.relu(self.stem(x))
        y = torch.relu(self.conv1(skip))
        y = self.conv2(y) + skip
        return self.fc(torch.flatten(self.pool(torch.relu(y)), 1))


class Mlp(nn.Module):
    """Conv features then adaptive pool, flatten and an MLP: the factorisable pattern."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 4))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class TinySegmentation(nn.Module):
    """A small segmentation network returning {"out": [N,C,H,W]} at the input size, as torchvision's do."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.features = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.classifier = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 1))

    def forward(self, x):
        y = self.classifier(self.features(self.stem(x)))
        return {"out": F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)}


class ConvStart(nn.Module):
    """A stem, then a tail that fdcam.factorise shortens: a k×k convolution (stride, padding, dilation as given),
    a batch norm with random statistics or none, an activation, a global average pool and an MLP (`hidden=None`: one
    Linear). `plain=True` puts a ReLU before the convolution and ends in a global max: nothing left to shorten."""

    def __init__(
        self,
        kernel=1,
        stride=1,
        padding=0,
        dilation=1,
        norm=True,
        bias=True,
        functional=False,
        *,
        channels=(16, 12),
        stem_stride=1,
        hidden=8,
        classes=5,
        activation=F.relu,
        plain=False,
    ):
        super().__init__()
        width, out = channels
        self.stem = nn.Conv2d(3, width, 3, stem_stride, padding=1)
        self.conv = nn.Conv2d(width, out, kernel, stride, padding, dilation, bias=bias)
        self.norm = nn.BatchNorm2d(out) if norm else nn.Identity()
        self.functional, self.activation, self.plain = functional, activation, plain
        if hidden:
            self.fc = nn.Sequential(nn.Linear(out, hidden), nn.ReLU(), nn.Linear(hidden, classes))
        else:
            self.fc = nn.Linear(out, classes)
        with torch.no_grad():  # non-trivial running statistics
            if norm:
                self.norm.running_mean.uniform_(-1, 1)
                self.norm.running_var.uniform_(0.5, 2)
                self.norm.weight.uniform_(0.5, 1.5)
                self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        a = self.stem(x)
        a = torch.relu(a) if self.plain else a
        c = self.conv
        z = F.conv2d(a, c.weight, c.bias, c.stride, c.padding, c.dilation) if self.functional else c(a)
        y = self.activation(self.norm(z))
        return y.amax((2, 3)) if self.plain else self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class SmallNet(nn.Module):
    """A small CNN with batch norm (its running statistics must never move) and a non-linear tail."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def small_net(seed=0):
    """SmallNet with seeded weights and non-trivial batch-norm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = SmallNet()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def small_images(n=2, seed=1):
    """n random 32×32 images for SmallNet."""
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def state_of(model):
    """What fdcam must leave as it was: weights and statistics, train/eval modes, requires_grad flags."""
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )


def assert_state_equal(model, state):
    """The model is as `state_of` saw it, and no fx tensor constant was left on it."""
    tensors, modes, grads = state
    now = model.state_dict()
    assert set(now) == set(tensors)
    assert all(torch.equal(now[k], v) for k, v in tensors.items()), "weights or batch-norm statistics changed"
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == grads
    assert not [name for name in dir(model) if name.startswith("_tensor_constant")]
