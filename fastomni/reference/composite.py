"""Reference (pure PyTorch) alpha compositing along OmniMotion rays: the spec.

For densities ``sigma [..., K]`` along a ray (no interval length, as in the original)::

    alpha_k = 1 - exp(-sigma_k)
    T_k     = prod_{l<k} (1 - alpha_l + 1e-10),  T_0 = 1
    w_k     = alpha_k * T_k

A composited value is ``sum_k w_k v_k`` (not divided by ``sum_k w_k``); the max-weight value is
``v_{argmax_k w_k}``. The occlusion score of a ray in the target frame is the total weight of its
samples in front of the predicted depth: ``sum_k w_k [d_k < depth - eps]``.

Example::

    >>> import torch
    >>> w, alpha = composite_alpha(torch.tensor([[0.0, 1e9, 1.0]]))
    >>> [round(v, 4) for v in w[0].tolist()]
    [0.0, 1.0, 0.0]
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TRANSMITTANCE_EPS", "composite_alpha", "alpha_to_weights", "composite_values", "select_max_weight", "occlusion_score"]

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
