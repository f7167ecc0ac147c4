"""FD-CAM (Li et al., ICPR 2022): gradient weights scaled by grouped switch-on/off scores."""

from __future__ import annotations

import torch

from ..factorise import max_group_size
from ..groups import GroupMembers, channel_groups, channel_groups_and_members, single_channel_groups
from ..options import FDCAM_DEFAULTS, check_fdcam_options
from ..switch import group_switch_logits, switch_scores
from ..timing import timed_stage
from ..weights import combine_weights
from .base import BaseCAM, BatchContext

__all__ = ["FDCAM"]


class FDCAM(BaseCAM):
    """FD-CAM: w = α̂·exp(ŝ) − b with α the Grad-CAM weights and s the grouped switch scores.

    Options reproduce the paper's ablations: `theta` (row quantile of the cosine matrix; a group is
    strictly above it), `bias` b, `combine` ("exp" or "linear"), `switch` ("on_off" or "off"),
    `grouping` (False: each group is its channel alone). The 2K switch passes of an image do not
    depend on the class, so every requested class shares them.
    """

    uses_tail_engine = True

    def __init__(
        self,
        model,
        target_layer=None,
        *,
        theta: float = FDCAM_DEFAULTS["theta"],
        bias: float = FDCAM_DEFAULTS["bias"],
        combine: str = FDCAM_DEFAULTS["combine"],
        switch: str = FDCAM_DEFAULTS["switch"],
        grouping: bool = FDCAM_DEFAULTS["grouping"],
        **options,
    ):
        super().__init__(model, target_layer, **options)
        options = check_fdcam_options(theta=theta, bias=bias, combine=combine, switch=switch, grouping=grouping)
        self.theta, self.bias, self.combine, self.switch, self.grouping = options.values()

    def groups(self, activations: torch.Tensor) -> torch.Tensor:
        """Boolean channel groups: [K,K] for one image's activations [K,h,w], [N,K,K] for [N,K,h,w]."""
        if activations.dim() == 4:
            return self.groups_and_members(activations)[0]
        if not self.grouping:
            return single_channel_groups(activations.shape[-3], activations.device)
        return channel_groups(activations, self.theta)

    @timed_stage("grouping")
    def groups_and_members(self, activations: torch.Tensor) -> tuple[torch.Tensor, GroupMembers | None]:
        """Groups [N,K,K] of activations [N,K,h,w], and their members where the grouping gives them
        (fdcam.groups.channel_groups_and_members). The switch passes take their groups from here: a
        subclass that changes the groups overrides this (and `groups` for single images)."""
        if not self.grouping:
            # shape[0], not len(): len() fixes a traced graph's batch size to the example's.
            batch = activations.shape[0]
            eye = single_channel_groups(activations.shape[-3], activations.device)
            index = torch.arange(eye.shape[0], device=eye.device)[:, None].expand(batch, -1, 1)
            return eye.expand(batch, *eye.shape), GroupMembers(index, torch.ones_like(index, dtype=torch.bool))
        return channel_groups_and_members(activations, self.theta)

    @timed_stage("switch")
    def switch_scores(self, context: BatchContext) -> torch.Tensor:
        """Switch scores s [N,T,K] from one batched set of tail passes for all N images, each pass's output
        scored by the targets."""
        tail = self.tail_for(context)
        activations = context.activations
        groups, members = self.groups_and_members(activations)
        # Every group has at most this many channels: rows have few ones (on) or few zeros (off).
        sparsity = max_group_size(activations.shape[1], self.theta) if self.grouping else 1
        scores = group_switch_logits(  # [N,M,T]
            tail, activations, groups, self.switch, context.extras, context.targets, sparsity, members
        )
        return switch_scores(scores, context.scores, None, self.switch)

    def channel_weights(self, context: BatchContext) -> torch.Tensor:
        alpha = context.gradients.mean(dim=(-2, -1))
        return combine_weights(alpha, self.switch_scores(context), self.bias, self.combine)
