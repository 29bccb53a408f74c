"""Reference (pure PyTorch) Gabor filter and multiplicative-filter-network step: the spec.

A Gabor filter maps ``x [N, in]`` to ``[N, H]``::

    g(x)_h = sin(W_h . x + b_h) * exp(-0.5 * gamma_h * ||x - mu_h||^2)

with the squared distance expanded as ``|x|^2 + |mu_h|^2 - 2 x . mu_h`` (as the original computes
it, so float32 results match it). One MFN step multiplies a filter by a linear map of the previous
hidden state::

    out_k = g_k(x) * (out_{k-1} @ L^T + c)

Example::

    >>> import torch
    >>> x = torch.rand(5, 3)
    >>> W, b, mu, gamma = torch.randn(8, 3), torch.rand(8), torch.rand(8, 3), torch.rand(8)
    >>> gabor_filter(x, W, b, mu, gamma).shape
    torch.Size([5, 8])
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gabor_filter", "gabor_step", "gabor_step_bwd_ref"]


def _envelope(x: Tensor, mu: Tensor, gamma: Tensor) -> Tensor:
    """``exp(-0.5 * gamma * ||x - mu||^2)``: ``[N, H]``."""
    dist = (x**2).sum(-1)[..., None] + (mu**2).sum(-1)[None, :] - 2 * x @ mu.T
    return torch.exp(-0.5 * dist * gamma[None, :])


def gabor_filter(x: Tensor, weight: Tensor, bias: Tensor, mu: Tensor, gamma: Tensor) -> Tensor:
    """Gabor filter bank.

    x: ``[N, in]``; weight, mu: ``[H, in]``; bias, gamma: ``[H]``. Returns ``[N, H]``.
    """
    return torch.sin(x @ weight.T + bias) * _envelope(x, mu, gamma)


def gabor_step(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    mu: Tensor,
    gamma: Tensor,
    prev: Tensor | None = None,
    lin_weight: Tensor | None = None,
    lin_bias: Tensor | None = None,
) -> Tensor:
    """One MFN step: ``gabor_filter(x) * (prev @ lin_weight^T + lin_bias)``, or the bare filter
    when ``prev`` is None (the first step).

    x: ``[N, in]``; prev: ``[N, H]``; lin_weight: ``[H, H]``; lin_bias: ``[H]`` or None.
    Returns ``[N, H]``.
    """
    g = gabor_filter(x, weight, bias, mu, gamma)
    if prev is None:
        return g
    lin = prev @ lin_weight.T
    if lin_bias is not None:
        lin = lin + lin_bias
    return g * lin


def gabor_step_bwd_ref(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    mu: Tensor,
    gamma: Tensor,
    prev: Tensor | None = None,
    lin_weight: Tensor | None = None,
    lin_bias: Tensor | None = None,
) -> tuple[Tensor | None, ...]:
    """Explicit backward of :func:`gabor_step`.

    Returns gradients ``(x, weight, bias, mu, gamma, prev, lin_weight, lin_bias)`` with the shapes
    of the inputs (None for inputs that were None). With ``z = x W^T + b``, ``e`` the envelope and
    ``D`` the squared distance::

        dz = go * lin * cos(z) * e          dD = -0.5 * gamma * go * lin * sin(z) * e
        dx = dz W + 2 (rowsum(dD) x - dD mu)     dmu = 2 (colsum(dD) mu - dD^T x)
        dgamma = colsum(-0.5 * D * go * lin * g)
    """
    z = x @ weight.T + bias
    dist = (x**2).sum(-1)[..., None] + (mu**2).sum(-1)[None, :] - 2 * x @ mu.T
    env = torch.exp(-0.5 * dist * gamma[None, :])
    sin_z = torch.sin(z)
    g = sin_z * env
    if prev is None:
        go = grad_out
        d_prev = d_lin_w = d_lin_b = None
    else:
        lin = prev @ lin_weight.T
        if lin_bias is not None:
            lin = lin + lin_bias
        go = grad_out * lin
        d_lin = grad_out * g
        d_prev = d_lin @ lin_weight
        d_lin_w = d_lin.T @ prev
        d_lin_b = d_lin.sum(0) if lin_bias is not None else None
    dz = go * torch.cos(z) * env
    d_env = go * sin_z * env  # d/d(-0.5 * gamma * D) of exp(...) times go
    d_dist = -0.5 * gamma[None, :] * d_env
    d_gamma = (-0.5 * dist * d_env).sum(0)
    dx = dz @ weight + 2 * (d_dist.sum(1, keepdim=True) * x - d_dist @ mu)
    d_mu = 2 * (d_dist.sum(0)[:, None] * mu - d_dist.T @ x)
    d_weight = dz.T @ x
    d_bias = dz.sum(0)
    return dx, d_weight, d_bias, d_mu, d_gamma, d_prev, d_lin_w, d_lin_b
