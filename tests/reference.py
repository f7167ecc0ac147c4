"""Slow, plain reference implementations used as test oracles (hooks on the original model, loops)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fdcam.export.agreement import ILL_CONDITIONED_FACTOR


def activations_and_gradient(model, layer, x, cls):
    """A [K,h,w] and ∂f_c/∂A via a temporary forward hook on the unsplit model; also the full logits."""
    store = {}

    def hook(module, inputs, output):
        output.retain_grad()
        store["a"] = output

    handle = layer.register_forward_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    logits[0, cls].backward()
    model.zero_grad(set_to_none=True)
    return store["a"][0].detach(), store["a"].grad[0].detach(), logits[0].detach()


def cosine_groups(A, theta):
    flat = A.reshape(A.shape[0], -1).double().numpy()
    k = flat.shape[0]
    cos = np.zeros((k, k))
    norms = np.linalg.norm(flat, axis=1)
    for i in range(k):
        if norms[i] == 0:
            continue  # a zero map has similarity 0 with everything
        safe = np.where(norms > 0, norms, 1.0)
        cos[i] = np.where(norms > 0, flat @ flat[i] / (safe * norms[i]), 0.0)
    # fdcam defines the similarities as the float64 cosines rounded to the activations' dtype: float32 maps that are
    # parallel up to float32 rounding tie there, and which of them lie above a row's quantile is decided by the ties
    # (test_segmentation's DeepLabV3 at a 2×2 map: in float32, channel 381's group holds 47 channels, not 48).
    rounded = torch.from_numpy(cos).to(A.dtype)
    return rounded > torch.quantile(rounded, theta, dim=-1, keepdim=True)


def minmax(v):
    return (v - v.min()) / (v.max() - v.min())


def fdcam_reference(
    model, layer, tail_fn, x, cls, theta=0.95, bias=0.5, combine="exp", switch="on_off", grouping=True, rows=64
):
    """FD-CAM as the paper and the issue define it, one tail pass per mask. `tail_fn` maps masked activations
    [B,K,h,w] to logits [B,classes] row by row (the model's own layers in eval mode), so the passes run `rows` at
    a time: the same passes, without reading a large tail's weights once per mask."""
    A, grad, logits = activations_and_gradient(model, layer, x, cls)
    alpha = grad.mean(dim=(1, 2))
    k = A.shape[0]
    groups = cosine_groups(A, theta) if grouping else torch.eye(k, dtype=torch.bool)
    on = groups.float()[:, :, None, None]  # [K masks, K channels, 1, 1]
    with torch.no_grad():

        def tail_scores(masks):
            return torch.cat([tail_fn(A * masks[i : i + rows])[:, cls] for i in range(0, k, rows)])

        off_scores = logits[cls] - tail_scores(1 - on)
        scores = off_scores if switch == "off" else (tail_scores(on) + off_scores) / 2
    a_hat, s_hat = minmax(alpha), minmax(scores)
    w = a_hat * torch.exp(s_hat) - bias if combine == "exp" else a_hat * s_hat - bias
    cam = F.relu((w[:, None, None] * A).sum(0))
    cam = F.interpolate(cam[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    return minmax(cam) if cam.max() > cam.min() else torch.zeros_like(cam)


def agreement(a, b):
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1]), float(np.abs(a - b).max())


# Two computation orders of the same float32 math (a batch vs single calls, chunked vs whole, one
# GEMM shape vs another) round differently: each dot product of n terms may move by ~n·ε32·Σ|terms|
# (in practice ~√n·ε32), so equality to a fixed number of digits holds only on the CPU that printed
# them. These checks compare to the scale of the values instead, with a correlation that shows the
# two are the same picture.
EPS32 = float(torch.finfo(torch.float32).eps)


def scale_of(*tensors) -> float:
    """The largest magnitude in the tensors (at least float32's tiny): what rounding errors scale with."""
    largest = [float(torch.as_tensor(t).detach().abs().max()) for t in tensors]
    return max(largest + [float(torch.finfo(torch.float32).tiny)])


def assert_same_or_within_the_float32_spread(
    got, expected, exact, *, rel: float = 4096 * EPS32, min_correlation: float = 0.9999
):
    """got ≈ expected as `assert_same_up_to_rounding`; where they differ by more, float32 must be what moves them:
    the float32 reference strays from the float64 one (`exact()`, computed only then) by over rel/2 of the scale,
    and got stays within rel + ILL_CONDITIONED_FACTOR × that spread of it (the rule of export/agreement.py).

    Ill-conditioned maps (min-max normalisation, exp and a ReLU over near-cancelling sums) amplify rounding: two
    float32 orders that agree on one CPU may differ by more than rel on another, each a few spreads from float64.
    """
    got64, expected64 = torch.as_tensor(got).detach().double(), torch.as_tensor(expected).detach().double()
    scale = scale_of(got64, expected64)
    if float((got64 - expected64).abs().max()) <= rel * scale:
        assert_same_up_to_rounding(got, expected, rel=rel, min_correlation=min_correlation)
        return
    truth = torch.as_tensor(exact()).detach().double()
    spread = float((expected64 - truth).abs().max())
    assert spread > rel * scale / 2, f"float32 moves the reference by {spread:.3g} only: the difference is not rounding"
    difference = float((got64 - truth).abs().max())
    allowed = rel * scale + ILL_CONDITIONED_FACTOR * spread
    assert difference <= allowed, f"max|Δ| from float64 = {difference:.3g} > {allowed:.3g} (spread {spread:.3g})"


def assert_same_up_to_rounding(got, expected, *, rel: float = 4096 * EPS32, min_correlation: float = 0.9999):
    """got ≈ expected as two float32 computation orders: max|Δ| ≤ rel·scale and correlation ≥ min_correlation.

    The default rel, 4096·ε32 ≈ 4.9e-4 of the scale, leaves room for reductions over thousands of terms
    through a few layers (and for maps, min-max normalisation and exp amplifying that by a few times).
    """
    got, expected = torch.as_tensor(got).detach().double(), torch.as_tensor(expected).detach().double()
    assert got.shape == expected.shape, (tuple(got.shape), tuple(expected.shape))
    difference = float((got - expected).abs().max()) if got.numel() else 0.0
    allowed = rel * scale_of(got, expected)
    assert difference <= allowed, f"max|Δ| = {difference:.3g} > {allowed:.3g} ({rel:.3g} of the scale)"
    if got.numel() > 2 and float(expected.std()) > 0 and float(got.std()) > 0:
        correlation = agreement(got.flatten().numpy(), expected.flatten().numpy())[0]
        assert correlation >= min_correlation, f"correlation {correlation:.6f} < {min_correlation}"
