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

__all__ = ["fixed_positional_encoding", "coupling_update", "coupling_st", "affine_coupling", "affine_coupling_bwd_ref",
           "S_CLAMP"]

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


def _activations(
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
    negative_slope: float,
) -> tuple[Tensor, list[Tensor], Tensor]:
    """The network's intermediate values for ``y [n, P, 3]``: the encoding ``e [n, P, 2 + 4F]``,
    the activations ``[p, h_0, .., h_L]`` (after LeakyReLU) and the unclamped ``st [n, P, 2]``."""
    kept = [c for c in range(3) if c != transformed]
    e = fixed_positional_encoding(y[..., kept], sigma)
    acts = [F.leaky_relu(e @ proj_weight.T + proj_bias, negative_slope)]
    acts.append(F.leaky_relu(acts[-1] @ in_weight.T + code_bias[:, None, :], negative_slope))
    for w, b in zip(hidden_weights, hidden_biases):
        acts.append(F.leaky_relu(acts[-1] @ w.T + b, negative_slope))
    return e, acts, acts[-1] @ out_weight.T + out_bias


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
    st = _activations(y, code_bias, proj_weight, proj_bias, in_weight, hidden_weights, hidden_biases,
                      out_weight, out_bias, sigma, transformed, negative_slope)[2]
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


def _leaky_grad(grad: Tensor, act: Tensor, negative_slope: float) -> Tensor:
    """Gradient through LeakyReLU from its output ``act`` (same sign as its input for slope >= 0)."""
    return torch.where(act > 0, grad, grad * negative_slope)


def affine_coupling_bwd_ref(
    grad_out: Tensor,
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor], list[Tensor], Tensor, Tensor]:
    """Explicit backward of :func:`affine_coupling` for ``grad_out [n, P, 3]``.

    Returns the gradients of ``(y, code_bias, proj_weight, proj_bias, in_weight, hidden_weights,
    hidden_biases, out_weight, out_bias)`` (same shapes); ``sigma`` (fixed frequencies) has none.
    The activations are recomputed from ``y``. With ``c`` the transformed coordinate, ``g = grad_out[..., c]``:

        forward:  dy_c = g e^{-s},  dt = -g e^{-s},  ds = -g x_c     (x_c = (y_c - t) e^{-s})
        inverse:  dy_c = g e^{s},   dt = g,          ds = g y_c e^{s}

    ``ds`` passes the clamp where ``-8 <= s_raw <= 8`` (as ``torch.clamp``), then flows back through
    the MLP (LeakyReLU derivative 1 or ``negative_slope``; requires ``negative_slope >= 0``) and the
    encoding: ``d v_d = de[v_d] + sum_k sigma_k (cos(v_d sigma_k) de[sin_dk] - sin(v_d sigma_k) de[cos_dk])``.
    The kept coordinates also receive ``grad_out`` directly.
    """
    kept = [c for c in range(3) if c != transformed]
    e, acts, st = _activations(y, code_bias, proj_weight, proj_bias, in_weight, hidden_weights, hidden_biases,
                               out_weight, out_bias, sigma, transformed, negative_slope)
    s_raw, t = st[..., 0], st[..., 1]
    s = torch.clamp(s_raw, -S_CLAMP, S_CLAMP)
    g = grad_out[..., transformed]
    if inverse:
        scale = torch.exp(s)
        g_s, g_t = g * y[..., transformed] * scale, g
    else:
        scale = torch.exp(-s)
        g_s, g_t = -g * (y[..., transformed] - t) * scale, -g * scale
    g_s = torch.where((s_raw >= -S_CLAMP) & (s_raw <= S_CLAMP), g_s, torch.zeros_like(g_s))
    g_st = torch.stack([g_s, g_t], dim=-1)

    def flat(a: Tensor) -> Tensor:
        return a.reshape(-1, a.shape[-1])

    g_out_w, g_out_b = flat(g_st).T @ flat(acts[-1]), flat(g_st).sum(0)
    g_h = g_st @ out_weight
    g_hidden_w, g_hidden_b = [], []
    for l in reversed(range(len(hidden_weights))):
        g_a = _leaky_grad(g_h, acts[l + 2], negative_slope)
        g_hidden_w.insert(0, flat(g_a).T @ flat(acts[l + 1]))
        g_hidden_b.insert(0, flat(g_a).sum(0))
        g_h = g_a @ hidden_weights[l]
    g_a = _leaky_grad(g_h, acts[1], negative_slope)
    g_in_w, g_code_bias = flat(g_a).T @ flat(acts[0]), g_a.sum(1)
    g_a = _leaky_grad(g_a @ in_weight, acts[0], negative_slope)
    g_proj_w, g_proj_b = flat(g_a).T @ flat(e), flat(g_a).sum(0)
    g_e = g_a @ proj_weight  # [n, P, 2 + 4F]

    n_freq = sigma.shape[0]
    arg = y[..., kept, None] * sigma  # [n, P, 2, F]
    g_sin, g_cos = g_e[..., 2:].unflatten(-1, (2, 2, n_freq)).unbind(-2)
    g_v = g_e[..., :2] + (sigma * (torch.cos(arg) * g_sin - torch.sin(arg) * g_cos)).sum(-1)
    g_y = grad_out.clone()
    g_y[..., transformed] = g * scale
    g_y[..., kept] += g_v
    return g_y, g_code_bias, g_proj_w, g_proj_b, g_in_w, g_hidden_w, g_hidden_b, g_out_w, g_out_b
