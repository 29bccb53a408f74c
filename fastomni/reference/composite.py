"""Reference (pure PyTorch) alpha compositing along OmniMotion rays: the spec.

For densities ``sigma [..., K]`` along a ray (no interval length, as in the original)::

    alpha_k = 1 - exp(-sigma_k)
    T_k     = prod_{l<k} (1 - alpha_l + 1e-10),  T_0 = 1
    w_k     = alpha_k * T_k

A composited value is ``sum_k w_k v_k`` (not divided by ``sum_k w_k``); the max-weight value is
``v_{argmax_k w_k}``. The occlusion score of a ray in the target frame is the total weight of its
samples in front of the predicted depth: ``sum_k w_k [d_k < depth - eps]``.

:func:`composite` is the whole op as backends implement it: with a per-sample mask ``m_k`` (the
original zeroes the correspondence weights of samples mapped outside the depth range; the
occlusion score keeps the samples in front of the predicted depth)::

    rgb     = sum_k w_k c_k                point = sum_k w_k m_k p_k  (or p at argmax_k w_k m_k)
    opacity = sum_k w_k m_k

Its backward (:func:`composite_bwd_ref`), with ``g_k`` the total gradient reaching ``w_k``::

    g_k        = gw_k + <grgb, c_k> + m_k (<gpoint, p_k> + gopacity)   (no <gpoint, p_k> with argmax)
    dL/dalpha_k = g_k T_k - (sum_{j>k} g_j w_j) / (1 - alpha_k + 1e-10) + galpha_k
    dL/dsigma_k = dL/dalpha_k * exp(-sigma_k)
    dL/dc_k     = w_k grgb,   dL/dp_k = w_k m_k gpoint  (or gpoint at the argmax only)

because ``T_j`` for ``j > k`` holds the factor ``1 - alpha_k + 1e-10`` once.

Example::

    >>> import torch
    >>> w, alpha = composite_alpha(torch.tensor([[0.0, 1e9, 1.0]]))
    >>> [round(v, 4) for v in w[0].tolist()]
    [0.0, 1.0, 0.0]
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "TRANSMITTANCE_EPS",
    "alpha_to_weights",
    "composite",
    "composite_alpha",
    "composite_bwd_ref",
    "composite_values",
    "occlusion_score",
    "select_max_weight",
]

TRANSMITTANCE_EPS = 1e-10


def alpha_to_weights(alpha: Tensor) -> Tensor:
    """Blending weights ``alpha_k T_k`` ``[..., K]`` from alphas ``[..., K]``."""
    trans = torch.cumprod(1.0 - alpha + TRANSMITTANCE_EPS, dim=-1)[..., :-1]
    trans = torch.cat([torch.ones_like(alpha[..., :1]), trans], dim=-1)
    return alpha * trans


def composite_alpha(density: Tensor) -> tuple[Tensor, Tensor]:
    """Blending weights and alphas, each ``[..., K]``, from densities ``[..., K]``."""
    alpha = 1.0 - torch.exp(-density)
    return alpha_to_weights(alpha), alpha


def composite_values(weights: Tensor, values: Tensor) -> Tensor:
    """``sum_k w_k v_k``: weights ``[..., K]``, values ``[..., K, C]`` -> ``[..., C]``."""
    return torch.sum(weights[..., None] * values, dim=-2)


def select_max_weight(weights: Tensor, values: Tensor) -> Tensor:
    """The value of the largest-weight sample (first on ties): ``[..., K]``, ``[..., K, C]`` ->
    ``[..., C]``."""
    idx = torch.argmax(weights, dim=-1, keepdim=True)
    return torch.gather(values, -2, idx[..., None].expand(*idx.shape, values.shape[-1])).squeeze(-2)


def occlusion_score(weights: Tensor, sample_depths: Tensor, depth: Tensor, eps: float) -> Tensor:
    """Total weight in front of ``depth - eps``.

    weights, sample_depths: ``[..., K]``; depth: ``[..., 1]``. Returns ``[..., 1]``.
    """
    visible = sample_depths < depth - eps
    return (weights * visible).sum(dim=-1, keepdim=True)


def composite(density: Tensor, colors: Tensor, points: Tensor, mask: Tensor | None = None,
              select_max: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Weights, alphas and composited values of rays in one call.

    density: ``[..., K]``; colors: ``[..., K, C]``; points: ``[..., K, D]``; mask: bool ``[..., K]``
    or None (all samples kept). Returns ``(weights [..., K], alphas [..., K], rgb [..., C],
    point [..., D], opacity [..., 1])``: ``rgb`` uses the unmasked weights, ``point`` and
    ``opacity`` the masked ones; ``select_max`` makes ``point`` the masked max-weight sample.
    """
    weights, alphas = composite_alpha(density)
    masked = weights if mask is None else weights * mask
    rgb = composite_values(weights, colors)
    point = select_max_weight(masked, points) if select_max else composite_values(masked, points)
    return weights, alphas, rgb, point, masked.sum(dim=-1, keepdim=True)


def composite_bwd_ref(grad_weights: Tensor, grad_alphas: Tensor, grad_rgb: Tensor, grad_point: Tensor,
                      grad_opacity: Tensor, density: Tensor, colors: Tensor, points: Tensor,
                      mask: Tensor | None = None, select_max: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Explicit backward of :func:`composite` (math in the module docstring).

    Gradients have the shapes of :func:`composite`'s outputs; returns ``(grad_density [..., K],
    grad_colors [..., K, C], grad_points [..., K, D])``. The mask is not differentiable.
    """
    e = torch.exp(-density)
    alphas = 1.0 - e
    q = 1.0 - alphas + TRANSMITTANCE_EPS
    trans = torch.cat([torch.ones_like(q[..., :1]), torch.cumprod(q, dim=-1)[..., :-1]], dim=-1)
    weights = alphas * trans
    keep = torch.ones_like(weights) if mask is None else mask.to(weights.dtype)
    g = grad_weights + (grad_rgb[..., None, :] * colors).sum(-1) + keep * grad_opacity
    if select_max:
        idx = torch.argmax(weights * keep, dim=-1, keepdim=True)
        onehot = torch.zeros_like(weights).scatter_(-1, idx, 1.0)
        grad_points = onehot[..., None] * grad_point[..., None, :]
    else:
        g = g + keep * (grad_point[..., None, :] * points).sum(-1)
        grad_points = (weights * keep)[..., None] * grad_point[..., None, :]
    gw = g * weights
    # sum_{j>k} g_j w_j: a reverse cumulative sum shifted by one, so no cancellation
    after = torch.flip(torch.cumsum(torch.flip(gw[..., 1:], [-1]), dim=-1), [-1])
    after = torch.cat([after, torch.zeros_like(gw[..., :1])], dim=-1)
    grad_alpha = g * trans - after / q + grad_alphas
    return grad_alpha * e, weights[..., None] * grad_rgb[..., None, :], grad_points
