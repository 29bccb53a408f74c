"""Reference (pure PyTorch) Gabor filter and multiplicative-filter-network step: the spec.

A Gabor filter maps ``x [N, in]`` to ``[N, H]``::

    g(x)_h = sin(W_h . x + b_h) * exp(-0.5 * gamma_h * ||x - mu_h||^2)

with the squared distance expanded as ``|x|^2 + |mu_h|^2 - 2 x . mu_h`` (as the original computes
it, so float32 results match it). One MFN step multiplies a filter by a linear map of the previous
hidden state::

    out_k = g_k(x) * (out_{k-1} @ L^T + c)

A whole GaborNet (:func:`gabor_net`) chains ``L + 1`` filters and ``L`` hidden linears and ends with
an output linear: ``h_0 = g_0(x)``, ``h_k = g_k(x) * (h_{k-1} @ L_k^T + c_k)``,
``y = h_L @ W_o^T + b_o``.

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

__all__ = ["gabor_filter", "gabor_step", "gabor_step_bwd_ref", "gabor_net", "gabor_net_bwd_ref"]


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


def gabor_net(
    x: Tensor,
    filter_weight: list[Tensor],
    filter_bias: list[Tensor],
    mu: list[Tensor],
    gamma: list[Tensor],
    lin_weight: list[Tensor],
    lin_bias: list[Tensor],
    out_weight: Tensor,
    out_bias: Tensor,
) -> Tensor:
    """Whole multiplicative filter network (no output activation).

    x: ``[N, in]``; per filter ``k = 0..L``: ``filter_weight[k], mu[k] [H, in]``,
    ``filter_bias[k], gamma[k] [H]``; per hidden linear ``k = 1..L`` (list index ``k-1``):
    ``lin_weight [H, H]``, ``lin_bias [H]`` (``lin_bias`` is empty for bias-free linears);
    out_weight ``[O, H]``, out_bias ``[O]``. Returns ``[N, O]``.
    """
    h = gabor_step(x, filter_weight[0], filter_bias[0], mu[0], gamma[0])
    for k in range(1, len(filter_weight)):
        h = gabor_step(x, filter_weight[k], filter_bias[k], mu[k], gamma[k], h, lin_weight[k - 1],
                       lin_bias[k - 1] if lin_bias else None)
    return h @ out_weight.T + out_bias


def gabor_net_bwd_ref(
    grad_out: Tensor,
    x: Tensor,
    filter_weight: list[Tensor],
    filter_bias: list[Tensor],
    mu: list[Tensor],
    gamma: list[Tensor],
    lin_weight: list[Tensor],
    lin_bias: list[Tensor],
    out_weight: Tensor,
    out_bias: Tensor,
) -> tuple:
    """Explicit backward of :func:`gabor_net`, chaining :func:`gabor_step_bwd_ref` from the last
    layer down (it recomputes every hidden state first).

    grad_out: ``[N, O]``. Returns ``(dx, d_filter_weight, d_filter_bias, d_mu, d_gamma,
    d_lin_weight, d_lin_bias, d_out_weight, d_out_bias)``; the list entries match the input lists
    (``d_lin_bias`` is empty when ``lin_bias`` is).
    """
    n_filters = len(filter_weight)

    def bias(k: int) -> Tensor | None:
        return lin_bias[k - 1] if lin_bias else None

    hs = [gabor_step(x, filter_weight[0], filter_bias[0], mu[0], gamma[0])]
    for k in range(1, n_filters):
        hs.append(gabor_step(x, filter_weight[k], filter_bias[k], mu[k], gamma[k], hs[-1], lin_weight[k - 1],
                             bias(k)))
    d_out_w, d_out_b = grad_out.T @ hs[-1], grad_out.sum(0)
    grad_h = grad_out @ out_weight
    dx = torch.zeros_like(x)
    d_fw, d_fb, d_mu, d_gamma = [None] * n_filters, [None] * n_filters, [None] * n_filters, [None] * n_filters
    d_lw, d_lb = [None] * (n_filters - 1), [None] * (n_filters - 1)
    for k in reversed(range(n_filters)):
        prev = (hs[k - 1], lin_weight[k - 1], bias(k)) if k > 0 else ()
        g = gabor_step_bwd_ref(grad_h, x, filter_weight[k], filter_bias[k], mu[k], gamma[k], *prev)
        dx = dx + g[0]
        d_fw[k], d_fb[k], d_mu[k], d_gamma[k] = g[1:5]
        if k > 0:
            grad_h, d_lw[k - 1], d_lb[k - 1] = g[5:8]
    return dx, d_fw, d_fb, d_mu, d_gamma, d_lw, d_lb if lin_bias else [], d_out_w, d_out_b
