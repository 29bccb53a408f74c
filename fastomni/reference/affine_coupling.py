"""Reference (pure PyTorch) affine coupling layer of OmniMotion's bijection: the spec.

One coupling layer keeps two of the three coordinates and transforms the third. From the kept
coordinates ``v [.., 2]`` it computes ``s, t`` with a small network conditioned on the frame's
latent code, then (``m`` = 1 on kept coordinates)::

    forward (local -> canonical):  x = y * m + (1 - m) * ((y - t) * exp(-s))
    inverse (canonical -> local):  y = x * m + (1 - m) * (x * exp(s) + t)

with ``s`` clamped to [-8, 8]. The network of the default configuration is::

    p  = leaky(W_p [v, sin(v_i sigma_k), cos(v_i sigma_k)] + b_p)       # 2 + 4F -> P
    h0 = leaky(W_0[:, P-part] p + code_bias)                             # code_bias per frame
    h_l = leaky(W_l h_{l-1} + b_l)                                       # hidden layers
    (s, t) = W_o h + b_o

where ``code_bias = W_0[:, code-part] @ code + b_0`` is computed once per frame: the original
concatenates the code to every point instead, which is the same math at far higher cost.

Example::

    >>> import torch
    >>> y = torch.rand(2, 5, 3)
    >>> s, t = torch.zeros(2, 5, 1), torch.ones(2, 5, 1)
    >>> coupling_update(y, s, t, transformed=2, inverse=False)[..., 2].shape
    torch.Size([2, 5])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fixed_positional_encoding", "coupling_update", "coupling_st", "affine_coupling", "S_CLAMP"]

S_CLAMP = 8.0


def fixed_positional_encoding(v: Tensor, sigma: Tensor) -> Tensor:
    """``[v, sin(v_0 sigma), cos(v_0 sigma), sin(v_1 sigma), cos(v_1 sigma), ...]``.

    v: ``[..., D]``; sigma: ``[F]``. Returns ``[..., D + 2 D F]`` in the original's order
    (per coordinate: all sines, then all cosines).
    """
    arg = v[..., :, None] * sigma
    enc = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1).flatten(-2)
    return torch.cat([v, enc], dim=-1)


def coupling_update(y: Tensor, s: Tensor, t: Tensor, transformed: int, inverse: bool) -> Tensor:
    """Apply the affine update to coordinate ``transformed`` of ``y [..., 3]``.

    s, t: ``[..., 1]`` (s already clamped). Returns ``[..., 3]``; the kept coordinates are copied.
    """
    m = torch.ones(3, dtype=y.dtype, device=y.device)
    m[transformed] = 0
    if inverse:
        return y * m + (1 - m) * (y * torch.exp(s) + t)
    return y * m + (1 - m) * ((y - t) * torch.exp(-s))


def coupling_st(
    y: Tensor,
    code_bias: Tensor,
    proj_weight: Tensor,
    proj_bias: Tensor,
    in_weight: Tensor,
    hidden_weights: list[Tensor],
    hidden_biases: list[Tensor],
    out_weight: Tensor,
    out_bias: Tensor,
    sigma: Tensor,
    transformed: int,
    negative_slope: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """``(s, t)``, each ``[n, P, 1]``, of one coupling layer for points ``y [n, P, 3]`` of ``n``
    frames.

    code_bias: ``[n, H0]``; proj_weight ``[Pd, 2 + 4F]``, proj_bias ``[Pd]``; in_weight ``[H0, Pd]``
    (the projection's share of the first map_st linear); hidden_weights[l] ``[H_{l+1}, H_l]`` with
    biases; out_weight ``[2, H_L]``, out_bias ``[2]``; sigma ``[F]``.
    """
    kept = [c for c in range(3) if c != transformed]
    p = F.leaky_relu(fixed_positional_encoding(y[..., kept], sigma) @ proj_weight.T + proj_bias, negative_slope)
    h = F.leaky_relu(p @ in_weight.T + code_bias[:, None, :], negative_slope)
    for w, b in zip(hidden_weights, hidden_biases):
        h = F.leaky_relu(h @ w.T + b, negative_slope)
    st = h @ out_weight.T + out_bias
    s, t = st[..., 0:1], st[..., 1:2]
    return torch.clamp(s, -S_CLAMP, S_CLAMP), t


def affine_coupling(
    y: Tensor,
    code_bias: Tensor,
    proj_weight: Tensor,
    proj_bias: Tensor,
    in_weight: Tensor,
    hidden_weights: list[Tensor],
    hidden_biases: list[Tensor],
    out_weight: Tensor,
    out_bias: Tensor,
    sigma: Tensor,
    transformed: int,
    inverse: bool,
    negative_slope: float = 0.01,
) -> Tensor:
    """One coupling layer, forward (``inverse=False``) or inverse, on ``y [n, P, 3]``.

    Arguments as :func:`coupling_st`. Returns ``[n, P, 3]``.
    """
    s, t = coupling_st(y, code_bias, proj_weight, proj_bias, in_weight, hidden_weights, hidden_biases,
                       out_weight, out_bias, sigma, transformed, negative_slope)
    return coupling_update(y, s, t, transformed, inverse)
