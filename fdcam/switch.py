"""Switch passes: the tail run with each channel group switched on (alone) and switched off."""

from __future__ import annotations

from typing import Sequence

import torch

from .tail import Tail

__all__ = ["switch_masks", "switch_logits", "switch_scores"]


def switch_masks(groups: torch.Tensor, switch: str = "on_off") -> torch.Tensor:
    """Masks [2K,K] (switch-on rows 1_G(k), then switch-off rows 1 − 1_G(k)), or [K,K] of switch-off only."""
    on = groups.to(torch.float32)
    if switch == "off":
        return 1.0 - on
    if switch == "on_off":
        return torch.cat([on, 1.0 - on])
    raise ValueError(f"switch must be 'on_off' or 'off', not {switch!r}")


def switch_logits(tail: Tail, features: torch.Tensor, masks: torch.Tensor, extras: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """Logits [M, classes] of the M switch passes of one image (features [1,K,h,w]); class independent."""
    return tail.run(features, masks.to(features.dtype), extras)


def switch_scores(logits: torch.Tensor, full_logits: torch.Tensor, classes: torch.Tensor, switch: str = "on_off") -> torch.Tensor:
    """Scores s [T,K] for classes [T] from the switch logits: (s⁺ + s⁻)/2, or s⁻ alone for switch='off'.

    s⁺_k = f_c(tail(A ⊙ 1_G(k))), s⁻_k = f_c(X) − f_c(tail(A ⊙ (1 − 1_G(k)))).
    """
    selected = logits[:, classes].T  # [T, M]
    full = full_logits[classes][:, None]  # [T, 1]
    if switch == "off":
        return full - selected
    k = selected.shape[1] // 2
    return (selected[:, :k] + (full - selected[:, k:])) / 2
