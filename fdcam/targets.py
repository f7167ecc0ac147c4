"""What an explanation explains: a differentiable score per image of the model's output.

A target turns the model's output for a batch of rows ([B,C] logits, [B,C,H,W] segmentation logits,
...) into one score per row [B]. `ClassLogit(c)` is what an int means; `ClassProbability(c)` the
softmax; `RegionLogit(c, mask)` the sum of class c's logits over a region of a segmentation output;
`Output(fn)` any traceable function of the batched output; `TopK(k)` stands for each image's k most likely
classes, chosen from the explainer's own forward pass (so the model runs once). pytorch-grad-cam's targets are taken as
they are (its `ClassifierOutputTarget` and `SemanticSegmentationTarget` become the fdcam equivalents;
any other callable is applied to each row's output, as pytorch-grad-cam does).

`resolve_targets` is the one place targets are normalised: it turns what the user gave into
`BatchTargets`, N images × T targets, checked against the forward pass's output. Models whose output
is a dict or tuple are explained on one of its entries (`select_output`).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import torch

from .gradients import graph_input

__all__ = [
    "Target",
    "ClassLogit",
    "ClassProbability",
    "RegionLogit",
    "Output",
    "TopK",
    "BatchTargets",
    "Targets",
    "OutputSelector",
    "as_target",
    "resolve_targets",
    "select_output",
]


class Target:
    """A score per row of the model's output: `score(output [B,...]) -> [B]`, differentiable in the output."""

    def score(self, output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check(self, output: torch.Tensor) -> None:
        """ValueError (one line) if the target cannot score an output shaped like `output` [B,...]."""


class ClassLogit(Target):
    """The logit of class `c`: output[:, c] for [B,C] logits; on a [B,C,H,W] output, its sum over the map
    (what pytorch-grad-cam's ClassifierOutputTarget differentiates there)."""

    def __init__(self, c: int):
        self.c = _class_index(c)

    def score(self, output: torch.Tensor) -> torch.Tensor:
        selected = output[:, self.c]
        return selected if selected.dim() == 1 else selected.flatten(1).sum(1)

    def check(self, output: torch.Tensor) -> None:
        _check_class(self.c, output)

    def __repr__(self) -> str:
        return f"ClassLogit({self.c})"


class ClassProbability(Target):
    """The softmax probability of class `c` over the class axis (per pixel, summed over the map, for [B,C,H,W])."""

    def __init__(self, c: int):
        self.c = _class_index(c)

    def score(self, output: torch.Tensor) -> torch.Tensor:
        selected = torch.softmax(output, dim=1)[:, self.c]
        return selected if selected.dim() == 1 else selected.flatten(1).sum(1)

    def check(self, output: torch.Tensor) -> None:
        _check_class(self.c, output)

    def __repr__(self) -> str:
        return f"ClassProbability({self.c})"


class RegionLogit(Target):
    """Σ over a region of class `c`'s logits in a segmentation output [B,C,H,W]; `mask` bool or float [H,W]
    (numpy or torch), a float mask weighting each pixel."""

    def __init__(self, c: int, mask: Any):
        self.c = _class_index(c)
        mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
        if mask.dim() != 2:
            raise ValueError(f"a region mask must be [H,W], got shape {tuple(mask.shape)}")
        if mask.is_complex():
            raise ValueError(f"a region mask must be bool or float, not {mask.dtype}")
        self.mask = graph_input(mask)  # a mask made under inference mode is copied: autograd saves it for backward

    def score(self, output: torch.Tensor) -> torch.Tensor:
        return (output[:, self.c] * self.mask.to(output.device, output.dtype)).sum((-2, -1))

    def check(self, output: torch.Tensor) -> None:
        if output.dim() != 4:
            shape = tuple(output.shape)
            raise ValueError(f"RegionLogit needs a segmentation output [N,C,H,W]; the model gives {shape}")
        _check_class(self.c, output)
        if tuple(self.mask.shape) != tuple(output.shape[-2:]):
            mask, size = tuple(self.mask.shape), tuple(output.shape[-2:])
            raise ValueError(f"the region mask is {mask} but the model's output map is {size}")

    def __repr__(self) -> str:
        return f"RegionLogit({self.c}, mask {tuple(self.mask.shape)} with {int((self.mask != 0).sum())} pixels)"


class Output(Target):
    """Any traceable function of the batched output [B,...] giving one score per row [B]."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        if not callable(fn):
            raise ValueError(f"Output needs a callable, not {type(fn).__name__}")
        self.fn = fn

    def score(self, output: torch.Tensor) -> torch.Tensor:
        return self.fn(output)

    def __repr__(self) -> str:
        return f"Output({getattr(self.fn, '__name__', type(self.fn).__name__)})"


class TopK:
    """Each image's `k` most likely classes (most likely first), chosen from the logits [N,C] of the explanation's
    own forward pass: `cam(x, TopK(3))`; the classes chosen are `cam.explanation(x, TopK(3)).classes`."""

    def __init__(self, k: int):
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
            raise ValueError(f"TopK needs a positive integer number of classes, not {k!r}")
        self.k = int(k)

    def classes(self, output: torch.Tensor) -> list[list[int]]:
        """The k classes of each image's output [N,C], as lists of class indices."""
        if output.dim() != 2:
            raise ValueError(f"TopK takes [N,C] logits; the model's output is {tuple(output.shape)}")
        if self.k > output.shape[1]:
            raise ValueError(f"TopK({self.k}) asks for more classes than the model's {output.shape[1]}")
        return output.topk(self.k, dim=1).indices.tolist()

    def __repr__(self) -> str:
        return f"TopK({self.k})"


class _PerRow(Target):
    """A pytorch-grad-cam style callable (one row's output → a scalar) applied to each row."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn

    def score(self, output: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.as_tensor(self.fn(row)).reshape(()).to(output.dtype) for row in output])

    def __repr__(self) -> str:
        return f"{type(self.fn).__name__}(per image)"


Targets = None | int | Target | TopK | Callable | Sequence[Any] | torch.Tensor | np.ndarray
#: Which entry of a dict or tuple output to explain: a key or an index (None: "out" for dicts that have it).
OutputSelector = Hashable | None


def select_output(output: Any, selector: OutputSelector = None) -> Any:
    """The entry of a dict or tuple output to explain (`selector` a key or index; None: the tensor itself,
    or "out" of a dict that has it). Works on tensors and on the fx nodes of a traced graph's output."""
    if isinstance(output, dict):
        key = "out" if selector is None and "out" in output else selector
        if key is None or key not in output:
            wanted = "give output= to choose one" if key is None else f"no entry {key!r}"
            raise ValueError(f"the model returns a dict with keys {list(output)}: {wanted}")
        return output[key]
    if isinstance(output, (tuple, list)):
        if selector is None or not isinstance(selector, int) or not -len(output) <= selector < len(output):
            wanted = "give output= (an index) to choose one" if selector is None else f"no entry {selector!r}"
            raise ValueError(f"the model returns a {type(output).__name__} of {len(output)}: {wanted}")
        return output[selector]
    if selector is not None:
        raise ValueError(f"output={selector!r} selects from a dict or tuple, but the model returns a single tensor")
    return output


def as_target(value: Any) -> Target:
    """One target from a Target, an int-like class index, a pytorch-grad-cam target or any callable on one row."""
    if isinstance(value, Target):
        return value
    kind = type(value).__name__
    if kind == "ClassifierOutputTarget" and hasattr(value, "category"):
        return ClassLogit(value.category)
    if kind == "SemanticSegmentationTarget" and hasattr(value, "mask"):
        return RegionLogit(value.category, value.mask)
    if _is_class_index(value):
        return ClassLogit(_class_index(value))
    if callable(value) and not isinstance(value, type):
        return _PerRow(value)
    raise ValueError(
        f"a target must be an integer class index, a fdcam.targets target or a callable, not {value!r} ({kind})"
    )


class BatchTargets:
    """T targets for each of N images, resolved against the model's output [N,...].

    `classes` [N,T] is set when every target is a class logit of [N,C] logits: the switch passes then
    take the class-row shortcut (the rows of the final Linear), exactly. Otherwise each pass's output
    is scored with `score_rows`, chunk by chunk.
    """

    def __init__(self, items: Sequence[Sequence[Target]], output_shape: Sequence[int], device: torch.device):
        self.items: tuple[tuple[Target, ...], ...] | None = tuple(tuple(row) for row in items)
        self.output_shape = tuple(output_shape)  # one image's output [...]
        self.shape = (len(self.items), len(self.items[0]) if self.items else 0)
        self.classes: torch.Tensor | None = None
        if len(self.output_shape) == 1 and all(type(t) is ClassLogit for row in self.items for t in row):
            self.classes = torch.tensor([[t.c for t in row] for row in self.items], dtype=torch.long, device=device)

    @classmethod
    def from_classes(cls, classes: torch.Tensor, output_shape: Sequence[int]) -> BatchTargets:
        """Class-logit targets from class indices [N,T] (what fdcam's integer targets always meant).

        For [N,C] logits the tensor is kept as it is, never read on the host (it may be symbolic while
        the explainer graph is traced)."""
        if len(output_shape) != 1:
            return cls([[ClassLogit(int(c)) for c in row] for row in classes.tolist()], output_shape, classes.device)
        resolved = cls([], output_shape, classes.device)
        resolved.items = None  # every target is the class logit of `classes`
        resolved.shape = tuple(classes.shape)
        resolved.classes = classes
        return resolved

    @property
    def output_numel(self) -> int:
        """Elements of one row's output: what a switch pass holds besides the tail's activations."""
        return int(np.prod(self.output_shape))

    def score_rows(self, output: torch.Tensor, image: int) -> torch.Tensor:
        """Scores [R,T] of rows [R,...] of the output, all of image `image`, by that image's targets."""
        if self.classes is not None:
            return output.index_select(1, self.classes[image])
        return torch.stack([target.score(output) for target in self.items[image]], 1)

    def score(self, output: torch.Tensor) -> torch.Tensor:
        """Scores [N,T] of the batch's own output [N,...]."""
        if self.classes is not None:
            return output.gather(1, self.classes)
        return torch.cat([self.score_rows(output[i : i + 1], i) for i in range(self.shape[0])])

    def objective(self, output: torch.Tensor) -> torch.Tensor:
        """Σ over images and targets of each target on its own copy: `output` [N·T,...] in image-major order."""
        if self.classes is not None:
            return output.gather(1, self.classes.reshape(-1, 1)).sum()
        n, t = self.shape
        return sum(self.items[i][j].score(output[i * t + j : i * t + j + 1]).sum() for i in range(n) for j in range(t))

    def __repr__(self) -> str:
        if self.items is None:
            return f"BatchTargets(classes={self.classes.tolist()})"
        return f"BatchTargets({[list(row) for row in self.items]})"


def resolve_targets(targets: Targets, output: torch.Tensor) -> BatchTargets:
    """N×T targets for the model's output [N,...] from None (the top-1 class of [N,C] logits), TopK(k) (the k most
    likely), a target or an int for every image, one per image, or equal-length lists per image (ints, tensors,
    arrays, target objects, pytorch-grad-cam targets). Raises a one-line ValueError when they do not fit the batch
    or the output."""
    n = output.shape[0]
    if targets is None:
        if output.dim() != 2:
            raise ValueError(
                f"give targets: the model's output is {tuple(output.shape)}, not [N,C] logits with a top-1 class"
                " (for a segmentation output, e.g. RegionLogit(c, mask))"
            )
        rows: list[list[Any]] = [[c] for c in output.argmax(1).tolist()]
    elif isinstance(targets, TopK):
        rows = targets.classes(output.detach())
    elif isinstance(targets, (torch.Tensor, np.ndarray)):
        rows = _index_rows(targets, n)
    elif isinstance(targets, (str, bytes)):
        raise ValueError(f"targets must be class indices or target objects, got the string {targets!r}")
    elif not isinstance(targets, (list, tuple)) and (
        isinstance(targets, Target) or _is_class_index(targets) or callable(targets)
    ):
        rows = [[targets]] * n
    else:
        try:
            entries = list(targets)
        except TypeError:
            raise ValueError(
                f"targets must be None, a class index or target, or one per image, not {type(targets).__name__}"
            ) from None
        if len(entries) != n:
            raise ValueError(f"got {len(entries)} targets for {n} images; give one entry (or one list) per image")
        rows = [_entry_row(entry) for entry in entries]
        if len({len(r) for r in rows}) != 1:
            raise ValueError("every image needs the same number of targets")
    if not rows or not rows[0]:
        raise ValueError("targets name no class; give at least one target per image")
    resolved = BatchTargets([[as_target(t) for t in row] for row in rows], output.shape[1:], output.device)
    for target in {id(t): t for row in resolved.items for t in row}.values():
        target.check(output)
    return resolved


def _entry_row(entry: Any) -> list[Any]:
    """One image's targets: a list/tuple/1-D array of targets, or one target."""
    if isinstance(entry, (torch.Tensor, np.ndarray)):
        if entry.ndim == 0:
            return [entry]
        if entry.ndim == 1:
            return list(entry)
        raise ValueError(f"one image's targets must be a list, got an array of shape {tuple(entry.shape)}")
    if isinstance(entry, (list, tuple)):
        return list(entry)
    return [entry]


def _index_rows(targets: torch.Tensor | np.ndarray, n: int) -> list[list[int]]:
    """Class indices from an integer tensor or array: a scalar, one per image [N] or [N,T]."""
    dtype_ok = (
        targets.dtype.kind in "iu"
        if isinstance(targets, np.ndarray)
        else not (targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool)
    )
    if not dtype_ok:
        raise ValueError(f"targets must be integer class indices, got an array of {targets.dtype}")
    values = torch.as_tensor(np.ascontiguousarray(targets) if isinstance(targets, np.ndarray) else targets).long()
    if values.dim() <= 1 and values.numel() == 1:
        return [[int(values.reshape(()))]] * n
    if values.dim() == 1:
        values = values[:, None]
    if values.dim() != 2 or values.shape[0] != n:
        shape = tuple(values.shape)
        raise ValueError(f"got targets of shape {shape} for {n} images; give one entry (or one row) per image")
    return values.tolist()


def _is_class_index(value: Any) -> bool:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.dtype.kind in "iu"
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        return not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _class_index(value: Any) -> int:
    """An int from an int-like (int, np.int64, 0-d integer tensor); floats, bools and strings are refused."""
    if not _is_class_index(value):
        raise ValueError(f"targets must be integer class indices, got {value!r} ({type(value).__name__})")
    return int(value.item() if isinstance(value, (torch.Tensor, np.ndarray)) else value)


def _check_class(c: int, output: torch.Tensor) -> None:
    if output.dim() < 2:
        raise ValueError(f"the model's output {tuple(output.shape)} has no class axis")
    if not 0 <= c < output.shape[1]:
        raise ValueError(f"class index {c} is out of range for a model with {output.shape[1]} classes")
