"""The explainer graph of a segmentation model: a class's logits summed over a region (`target="region"`).

Beside `image` [N,3,H,W] and `classes` int64 [N,T], the graph takes `region` float32 [N,T,h,w], one
mask per explained row (h,w the model's output map: the input size for torchvision's segmentation
models). Row (n,t) explains Σ_ij region[n,t,i,j] · out[n, classes[n,t], i, j], what
`fdcam.targets.RegionLogit(classes[n,t], region[n,t])` explains in the library. Outputs keep their
names: `logits` [N,C] are the model's output map averaged over its pixels (one number per class and
image, the map's own pixels are not returned), `targets` echo the classes, `saliency` [N,T,H,W].
A region row that is not finite gets a NaN map (`_refused_rows`' convention); a region of another
size than the graph's is refused by ONNX Runtime itself (h,w are fixed in the graph).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fdcam.factorise import shortcut_passes, sparse_rows
from fdcam.forward import ForwardPass
from fdcam.gradients import TailGraph
from fdcam.methods.base import BatchContext
from fdcam.split import SplitModel
from fdcam.tail import MaskedTail, expand_masks
from fdcam.targets import BatchTargets, OutputSelector, RegionLogit

from .graph import ExportError

__all__ = [
    "REGION_INPUT",
    "RegionExplainerModule",
    "RegionGraphTail",
    "RegionTargets",
    "region_cases",
    "region_metadata",
]

REGION_INPUT = "region"
TARGET_KINDS = ("class", "region")
# What a region graph's `logits` output holds: one number per class and image, as a classifier's logits.
LOGITS_MEANING = "the output map averaged over its pixels, per class (the explained scores are the region sums)"


class RegionTargets(BatchTargets):
    """RegionLogit targets for a whole batch as two tensors, traceable with a symbolic N and T: row (n,t)
    scores Σ_ij region[n,t,i,j] · out[n, classes[n,t], i, j] (classes [N,T] int64, region [N,T,h,w])."""

    def __init__(self, classes: torch.Tensor, region: torch.Tensor, output_shape: Sequence[int]):
        self.items = None
        self.classes = None  # not the class-row shortcut: each pass's whole output map is scored
        self.region_classes = classes
        self.region = region
        self.output_shape = tuple(output_shape)
        self.shape = tuple(classes.shape)

    def score_passes(self, output: torch.Tensor) -> torch.Tensor:
        """Scores [N,R,T] of R outputs [N,R,C,h,w] of each image."""
        n, r = output.shape[0], output.shape[1]
        t = self.region_classes.shape[1]
        index = self.region_classes[:, None, :, None, None].expand(n, r, t, *output.shape[-2:])
        return (output.gather(2, index) * self.region[:, None]).sum((-2, -1))

    def score_rows(self, output: torch.Tensor, image: int) -> torch.Tensor:
        part = RegionTargets(self.region_classes[image : image + 1], self.region[image : image + 1], self.output_shape)
        return part.score_passes(output[None])[0]

    def score(self, output: torch.Tensor) -> torch.Tensor:
        return self.score_passes(output[:, None])[:, 0]

    def objective(self, output: torch.Tensor) -> torch.Tensor:
        n, t = self.region_classes.shape
        rows = output.reshape(n, t, *output.shape[1:])
        index = self.region_classes[:, :, None, None, None].expand(n, t, 1, *output.shape[-2:])
        return (rows.gather(2, index)[:, :, 0] * self.region).sum()

    def __repr__(self) -> str:
        return f"RegionTargets(classes {tuple(self.shape)}, regions {tuple(self.region.shape)})"


class RegionGraphTail:
    """A graph engine (export.explainer.GraphTail) whose passes are scored by `RegionTargets` chunk by chunk:
    the [N,rows,C,h,w] outputs of one chunk are the only output maps alive at once."""

    def __init__(self, engine, output_numel: int, features: torch.Tensor, budget: int):
        self.engine = engine
        # Each pass also holds its output map and the scoring's product: the planner's rows (dense passes).
        self.rows = engine.plan(features, 1, output_numel=output_numel, budget=budget).rows

    def run(self, features, masks, extras=(), classes=None, *, sparsity=None, score=None) -> torch.Tensor:
        """The `Tail` protocol: with `score` (RegionTargets) the passes' scores [N,M,T], else the engine's logits."""
        if score is None:
            return self.engine.run(features, masks, extras, classes, sparsity=sparsity)
        masks = expand_masks(features, masks)
        m = masks.shape[1]
        shortcut = self.engine.shortcut
        state = sparse = None
        if shortcut is not None:
            state = shortcut.prepare(features, None)
            sparse = sparse_rows(masks, sparsity) if self.engine.plan(features, m, sparsity).gathers else None
        scores = []
        for lo in range(0, m, self.rows):
            chunk = masks[:, lo : lo + self.rows]
            if shortcut is None:
                outputs = MaskedTail(self.engine.tail)(features, chunk, *extras)
            else:
                chunk_sparse = None if sparse is None else tuple(t[:, lo : lo + chunk.shape[1]] for t in sparse)
                outputs = shortcut_passes(shortcut, state, chunk, extras, None, chunk_sparse)
            scores.append(score.score_passes(outputs))
        return torch.cat(scores, 1) if len(scores) > 1 else scores[0]


class RegionExplainerModule(nn.Module):
    """image [N,3,H,W], classes [N,T], region [N,T,h,w] → (logits [N,C], targets [N,T], saliency [N,T,H,W]).

    The region form of export.explainer.ExplainerModule: the same head, tail and method, the gradient of
    each row's region sum, and the method's switch passes scored by the regions (`RegionGraphTail`).
    """

    def __init__(self, split: SplitModel, method, refused_rows):
        super().__init__()
        self.head = split.head
        self.tail = split.tail
        self.split = split
        self.method = method
        self.refused_rows = refused_rows

    def forward(self, image: torch.Tensor, classes: torch.Tensor, region: torch.Tensor):
        finite = torch.isfinite(image).flatten(1).all(1)  # [N]
        image = torch.where(finite[:, None, None, None], image, torch.zeros_like(image))
        region_ok = torch.isfinite(region).flatten(2).all(2)  # [N,T]
        region = torch.where(torch.isfinite(region), region, torch.zeros_like(region))
        features, *extras = self.head(image)
        features, extras = features.detach(), tuple(e.detach() for e in extras)
        graph = TailGraph(self.tail, features, extras, copies=classes.shape[1])
        output = graph.image_outputs()  # [N,C,h,w]
        known = (classes >= 0) & (classes < output.shape[1])
        targets = RegionTargets(torch.where(known, classes, torch.zeros_like(classes)), region, output.shape[1:])
        gradients = graph.gradients(targets)
        forward = ForwardPass(self.split, features, extras, output)
        context = BatchContext(image, forward, targets, gradients=gradients.detach())
        with torch.no_grad():
            weights = self.method.channel_weights(context)
            saliency = self.method.saliency(context, weights)
        logits, echoed, saliency = self.refused_rows(finite, output.mean((-2, -1)), None, saliency.float(), classes)
        saliency = torch.where(region_ok[:, :, None, None], saliency, torch.full_like(saliency, float("nan")))
        return logits, echoed, saliency


def check_target(target: str, output: torch.Tensor) -> None:
    """ExportError (one line) unless `target` is a known kind that fits the model's output."""
    if target not in TARGET_KINDS:
        raise ExportError(f"unknown target {target!r}; one of {', '.join(TARGET_KINDS)}")
    if target == "region" and output.dim() != 4:
        raise ExportError(
            f"target 'region' explains a segmentation output [N,C,H,W]; the model gives {tuple(output.shape)}"
            " (use the default target for class logits)"
        )
    if target == "class" and output.dim() != 2:
        raise ExportError(
            f"the model's output is {tuple(output.shape)}, not [N,C] class logits; for a segmentation model"
            " export with target='region' (--target region)"
        )


def example_regions(classes: torch.Tensor, size: Sequence[int], seed: int) -> torch.Tensor:
    """Float masks [N,T,h,w] to trace with: random weights (any values work; their H,W become the graph's)."""
    return torch.rand(*classes.shape, *size, generator=torch.Generator().manual_seed(seed))


def region_cases(output: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation rows for a batch's output map [N,C,h,w]: (classes [N,2], regions [N,2,h,w]).

    Row 0 explains the class with the largest mean logit over the pixels where it wins (the whole map if
    it wins nowhere); row 1 a random class over a centred rectangle of half the map's height and width.
    """
    n, c, h, w = output.shape
    top = output.mean((-2, -1)).argmax(1)  # [N]
    wins = (output.argmax(1) == top[:, None, None]).float()
    wins = torch.where(wins.flatten(1).any(1)[:, None, None], wins, torch.ones_like(wins))
    rectangle = torch.zeros(h, w)
    rectangle[h // 4 : h // 4 + max(h // 2, 1), w // 4 : w // 4 + max(w // 2, 1)] = 1.0
    other = torch.randint(0, c, (n,), generator=generator)
    classes = torch.stack([top, other], 1)
    regions = torch.stack([wins, rectangle.expand(n, h, w)], 1)
    return classes, regions


def library_targets(classes: torch.Tensor, regions: torch.Tensor) -> list[list[RegionLogit]]:
    """The library's targets for the graph's inputs: RegionLogit(classes[n,t], regions[n,t]) per row."""
    return [[RegionLogit(int(c), mask) for c, mask in zip(row, masks)] for row, masks in zip(classes.tolist(), regions)]


def region_metadata(output: OutputSelector, size: Sequence[int]) -> dict[str, str]:
    """What a region graph records beside the explainer metadata: the target kind, the output entry explained
    (a dict's key or a tuple's index; absent for a model returning one tensor), the mask size."""
    entry = {} if output is None else {"output": str(output)}
    inputs = f"image,classes,{REGION_INPUT}"
    return {
        "target": "region",
        **entry,
        "region_size": f"{size[0]}x{size[1]}",
        "inputs": inputs,
        "logits_meaning": LOGITS_MEANING,
    }


def region_input(metadata: dict[str, str]) -> list[dict]:
    """The `region` entry of the described inputs, for a region graph's metadata (else none)."""
    if metadata.get("target") != "region":
        return []
    h, w = (int(v) for v in metadata["region_size"].split("x"))
    return [{"name": REGION_INPUT, "dtype": "float32", "shape": ["N", "T", h, w]}]
