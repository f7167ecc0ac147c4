"""The FD-CAM authors' loop, the baseline (anchor) of the latency table: one class at a time, unfactorised."""

from __future__ import annotations

import torch
from torch import nn

from fdcam.forward import ForwardPass
from fdcam.groups import channel_groups
from fdcam.maps import to_input_size, weighted_sum
from fdcam.model_state import preserved_model_state
from fdcam.split import split_model
from fdcam.switch import switch_logits, switch_masks, switch_scores
from fdcam.tail import TorchTail
from fdcam.weights import combine_weights

__all__ = ["AUTHORS_CHUNK", "AuthorsFDCAM"]

AUTHORS_CHUNK = 128


class AuthorsFDCAM:
    """The FD-CAM authors' loop, as a baseline: one class at a time, the 2K switch passes of that
    class through the full (unfactorised) torch tail in chunks of 128 masks."""

    def __init__(
        self, model: nn.Module, layer: str, chunk: int = AUTHORS_CHUNK, theta: float = 0.95, bias: float = 0.5
    ):
        self.model, self.layer, self.chunk, self.theta, self.bias = model, layer, chunk, theta, bias
        self._cache: dict[tuple, tuple] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with preserved_model_state(self.model):
            key = (tuple(x.shape[1:]), x.device)
            if key not in self._cache:
                split = split_model(self.model, self.layer, x[:1].detach())
                self._cache[key] = (split, TorchTail(split.tail, batch_size=self.chunk, factorise=False))
            split, tail = self._cache[key]
            forward = ForwardPass.run(split, x)
            maps = []  # [N] of [1,T,H,W]
            for i in range(x.shape[0]):
                class_maps = []
                extras = tuple(extra[i : i + 1] for extra in forward.extras)
                # one image's pass, without the batch's graph: its gradients run the tail again,
                # as the authors' loop does
                one = ForwardPass(split, forward.activations[i : i + 1], extras, forward.logits[i : i + 1])
                for c in forward.logits[i].argmax(0, keepdim=True):  # top-1; the loop is per class
                    gradients = one.gradients(c.view(1, 1))
                    alpha = gradients.mean(dim=(-2, -1))[0]  # [1,K]
                    masks = switch_masks(channel_groups(forward.activations[i], self.theta))
                    logits = switch_logits(tail, one.activations, masks, extras, c.view(1, 1))[0]
                    scores = switch_scores(logits, forward.logits[i], c.view(1))
                    weights = combine_weights(alpha, scores, self.bias)
                    cam = weighted_sum(one.activations, weights[None])
                    class_maps.append(to_input_size(cam, tuple(x.shape[-2:])))
                maps.append(torch.cat(class_maps, dim=1))
            return torch.cat(maps)
