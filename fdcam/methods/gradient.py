"""Gradient-weighted CAMs: Grad-CAM, Grad-CAM++, XGrad-CAM and Layer-CAM (as pytorch-grad-cam 1.5.7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import BaseCAM, BatchContext

__all__ = ["GradCAM", "GradCAMPlusPlus", "XGradCAM", "LayerCAM"]


class GradCAM(BaseCAM):
    """Grad-CAM (Selvaraju et al. 2017): w_k = spatial mean of ∂f_c/∂A_k."""

    def channel_weights(self, context: BatchContext) -> torch.Tensor:
        return context.gradients.mean(dim=(-2, -1))


class GradCAMPlusPlus(BaseCAM):
    """Grad-CAM++ (Chattopadhay et al. 2018) with the exponential-output closed form for α."""

    def channel_weights(self, context: BatchContext) -> torch.Tensor:
        grads = context.gradients
        activation_sums = context.activations.sum(dim=(-2, -1), keepdim=True)[:, None]
        grads_2 = grads**2
        alpha = grads_2 / (2 * grads_2 + activation_sums * grads_2 * grads + 1e-6)
        alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
        return (F.relu(grads) * alpha).sum(dim=(-2, -1))


class XGradCAM(BaseCAM):
    """XGrad-CAM (Fu et al. 2020): w_k = Σ_ij (A_k,ij / Σ A_k) ∂f_c/∂A_k,ij."""

    def channel_weights(self, context: BatchContext) -> torch.Tensor:
        activations = context.activations[:, None]
        activation_sums = activations.sum(dim=(-2, -1), keepdim=True)
        return (context.gradients * activations / (activation_sums + 1e-7)).sum(dim=(-2, -1))


class LayerCAM(BaseCAM):
    """Layer-CAM (Jiang et al. 2021): per-pixel weights ReLU(∂f_c/∂A_k,ij)."""

    def channel_weights(self, context: BatchContext) -> torch.Tensor:
        return F.relu(context.gradients)
