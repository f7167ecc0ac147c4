"""Switch passes: the tail run with each channel group switched on (alone) and switched off."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .groups import GroupMembers
from .options import SWITCHES, invalid_choice
from .tail import Tail
from .targets import BatchTargets

__all__ = ["switch_masks", "switch_logits", "group_switch_logits", "switch_scores"]


def switch_masks(groups: torch.Tensor, switch: str = "on_off") -> torch.Tensor:
    """Masks [...,2K,K] (switch-on rows 1_G(k), then switch-off rows 1 − 1_G(k)), or [...,K,K] of switch-off only.

    `groups` is one image's boolean [K,K] or a batch [N,K,K].
    """
    on = groups.to(torch.float32)
    if switch == "off":
        return 1.0 - on
    if switch == "on_off":
        return torch.cat([on, 1.0 - on], dim=-2)
    raise invalid_choice("switch", switch, SWITCHES)


def switch_logits(
    tail: Tail,
    features: torch.Tensor,
    masks: torch.Tensor,
    extras: Sequence[torch.Tensor] = (),
    classes: torch.Tensor | BatchTargets | None = None,
    sparsity: int | None = None,
) -> torch.Tensor:
    """Logits of the switch passes of N images in one `Tail.run` call: features [N,K,h,w], masks [N,M,K]
    (or [M,K] shared) → [N,M,C], or [N,M,T] for the classes [N,T] only (the switch scores need no more),
    or [N,M,T] target scores for targets (fdcam.targets.BatchTargets).

    Class-logit targets of [N,C] logits take the class-row shortcut (only those rows of a last Linear,
    exact); any other target scores each chunk's whole outputs inside the tail, within its memory budget.
    `sparsity` bounds the ones or the zeros of every mask row (FD-CAM: the largest possible group).
    """
    masks = masks.to(features.dtype)
    if isinstance(classes, BatchTargets):
        if classes.classes is None:
            return tail.run(features, masks, extras, sparsity=sparsity, score=classes)
        classes = classes.classes
    return tail.run(features, masks, extras, classes, sparsity=sparsity)


def group_switch_logits(
    tail: Tail,
    features: torch.Tensor,
    groups: torch.Tensor,
    switch: str = "on_off",
    extras: Sequence[torch.Tensor] = (),
    classes: torch.Tensor | BatchTargets | None = None,
    sparsity: int | None = None,
    members: GroupMembers | None = None,
) -> torch.Tensor:
    """`switch_logits` of `switch_masks(groups, switch)` for groups [N,K,K]: [N,M,T] (or [N,M,C]).

    A tail that scores groups directly (`TorchTail.group_passes`: its first op is its last Linear, or a 1×1
    convolution on a CPU) does so for class-logit targets, without building the N·2K·K mask rows (from the
    groups' `members`, when given, at the cost of their sizes); others run the masks.
    """
    if switch not in SWITCHES:
        raise invalid_choice("switch", switch, SWITCHES)
    chosen = classes.classes if isinstance(classes, BatchTargets) else classes
    passes = getattr(tail, "group_passes", None)
    options = {"switch": switch} if members is None else {"switch": switch, "members": members}
    direct = None if passes is None or chosen is None else passes(features, groups, extras, chosen, **options)
    if direct is None:
        return switch_logits(tail, features, switch_masks(groups, switch), extras, classes, sparsity)
    on, off = direct
    return off if switch == "off" else torch.cat([on, off], dim=-2)


def switch_scores(
    logits: torch.Tensor, full_logits: torch.Tensor, classes: torch.Tensor | None, switch: str = "on_off"
) -> torch.Tensor:
    """Scores s [...,T,K] for classes [...,T] from the switch logits of those classes [...,M,T] and the full
    logits [...,C]: (s⁺ + s⁻)/2, or s⁻ alone for switch='off'. With `classes` None, `logits` are the passes'
    target scores [...,M,T] and `full_logits` the unmasked ones [...,T].

    s⁺_k = f_c(tail(A ⊙ 1_G(k))), s⁻_k = f_c(X) − f_c(tail(A ⊙ (1 − 1_G(k)))).
    """
    m = logits.shape[-2]
    selected = logits.transpose(-1, -2)  # [...,T,M]
    full = (full_logits if classes is None else full_logits.gather(-1, classes)).unsqueeze(-1)  # [...,T,1]
    if switch == "off":
        return full - selected
    k = m // 2
    return (selected[..., :k] + (full - selected[..., k:])) / 2
