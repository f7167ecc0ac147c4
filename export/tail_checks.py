"""The ONNX Runtime check of a tail graph: random mask cases, the torch tail's logits for them and the
largest difference of a session from those logits."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn

from .tail_form import TailForm, input_names

__all__ = ["check_cases", "cpu_session", "max_error", "reference_logits"]


def check_cases(
    reference: nn.Module,
    features: torch.Tensor,
    extras: Sequence[torch.Tensor],
    batches: Sequence[int],
    form: TailForm = TailForm(),
) -> list[tuple]:
    """(features, masks, extras, classes, torch logits) cases: 1 image × batches[0] masks, 2 images × batches[1].

    The masks are random 0/1 with the first row all ones (the unmasked tail), or with a `form.bound`
    rows of at most that many ones or zeros; the second image is the first one flipped, its extras
    halved. With `form.classes`, each image asks for 2 random classes (None otherwise).
    """
    generator = torch.Generator().manual_seed(0)
    cases = []
    k = features.shape[1]
    for images, batch in zip((1, 2), batches):
        if form.bound is None:
            masks = (torch.rand(images, int(batch), k, generator=generator) > 0.5).float()
        else:
            masks = _bounded_masks(images, int(batch), k, form.bound, generator)
        masks[:, 0] = 1.0
        batch_features = torch.cat([features, features.flip(-1)])[:images]
        batch_extras = [torch.cat([extra, extra * 0.5])[:images] for extra in extras]
        expected = reference_logits(reference, batch_features, masks, batch_extras)
        classes = None
        if form.classes:
            classes = torch.randint(0, expected.shape[-1], (images, 2), generator=generator)
            expected = expected.gather(2, classes[:, None, :].expand(-1, masks.shape[1], -1))
        cases.append((batch_features, masks, batch_extras, classes, expected))
    return cases


def _bounded_masks(images: int, batch: int, k: int, bound: int, generator: torch.Generator) -> torch.Tensor:
    """Random 0/1 masks [images,batch,K] whose rows have 1…`bound` ones (even rows) or zeros (odd rows)."""
    order = torch.rand(images, batch, k, generator=generator).argsort(-1)
    counts = torch.randint(1, bound + 1, (images, batch, 1), generator=generator)
    chosen = (order < counts).float()  # `counts` random channels per row
    odd = (torch.arange(batch) % 2 == 1)[None, :, None]
    return torch.where(odd, 1 - chosen, chosen)


@torch.no_grad()
def reference_logits(
    masked: nn.Module, features: torch.Tensor, masks: torch.Tensor, extras: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The torch tail's logits the graph must reproduce."""
    return masked(features, masks, *extras)


def max_error(session: ort.InferenceSession, checks: list[tuple]) -> tuple[float, float]:
    """(max |ONNX − torch|, max |torch|) over all check cases; a non-finite output counts as infinite error."""
    error, scale = 0.0, 0.0
    for features, masks, extras, classes, reference in checks:
        tensors = (features, masks, *([] if classes is None else [classes]), *extras)
        feed = dict(zip(input_names(len(extras), classes is not None), (t.numpy() for t in tensors)))
        (logits,) = session.run(["logits"], feed)
        logits = torch.from_numpy(logits)
        if logits.shape != reference.shape:
            return float("inf"), float(reference.abs().max())
        difference = (logits - reference).abs().max()
        error = max(error, float(difference) if torch.isfinite(difference) else float("inf"))
        scale = max(scale, float(reference.abs().max()))
    return error, scale


def cpu_session(path: Path, options: ort.SessionOptions | None) -> ort.InferenceSession:
    if options is None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
