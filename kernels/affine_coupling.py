"""Triton kernels of ``affine_coupling`` (spec: :mod:`fastomni.reference.affine_coupling`), for the
default network: encoding (2 + 4F) -> PD -> H0 (+ per-frame code bias) -> H1 -> H2 -> (s, t), widths
powers of two in [16, 256] (the op layer checks this and says why otherwise).

Tiling. A program takes ``BLOCK_M`` points of one frame (grid ``(cdiv(P, BLOCK_M), n)``), so the
frame's code bias is one row. Activations never leave registers: the layers alternate between a
full-width tile and column chunks of ``BLOCK_N``, each chunk consumed as soon as it is made::

    e  [BM, ENC_PAD]                     registers (sin/cos of the kept coordinates)
    p  = leaky(e @ Wp^T + bp)            full [BM, PD]
    for each chunk c of H0:              h0_c = leaky(p @ Win^T[:, c] + code_bias[c])   [BM, BN]
        acc1 += h0_c @ W1^T[c, :]        full [BM, H1]
    h1 = leaky(acc1 + b1)
    for each chunk c of H2:              h2_c = leaky(h1 @ W2^T[:, c] + b2[c])          [BM, BN]
        (s, t) += h2_c . Wo[:, c]        row sums, [BM] each
    x_c = (y_c - t) e^{-s}  or  y_c e^{s} + t

Weights are not resident: a layer's float32 weights (256 KiB at 256 x 256) exceed shared memory,
so each dot streams its ``[K, BN]`` / ``[BN, N]`` weight tile from L2 (every program reads the same
weights, so they stay in L2) through shared memory. The full-width tiles (``p``, ``acc1``/``h1``,
and in the backward ``g_h1``, ``g_p``) are what limits the block: at width 256 the compiles for
sm_90 allow ``BLOCK_M`` = 16 (see ``_BLOCKS``). float32 dots use ``tf32x3`` (three TF32 tensor-core
products, float32 accuracy), float64 ``ieee``.

The backward recomputes the forward for its block (keeping ``e``, ``p``, ``h1`` in registers and
recomputing each chunk ``h0_c``, ``h2_c`` where it is needed), then runs the chain rule in the same
chunk order. Weight and bias gradients are per-block partial sums (``tl.dot`` over the block's
points) added to the outputs with atomics (order, hence float rounding, not deterministic).

Bytes per point, float32, ``BLOCK_M`` = 16, PD = H = 256, F = 4:
- HBM: forward reads y (12 B), writes x (12 B); backward reads y and grad (24 B), writes grad_y (12 B).
- L2: the forward reads the weights (~806 KB) once per program, ~50 KB per point; the backward about
  2.5 times the weights (~126 KB per point) plus ~806 KB of atomic adds per program (~50 KB per
  point). L2 traffic, not the 0.4 MFLOP per point, bounds these kernels: larger blocks need the
  full-width activations out of registers (a shared-memory or split-K design).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["affine_coupling_fwd", "affine_coupling_bwd", "config", "LAUNCH"]

# (BLOCK_M, BLOCK_N) per (kernel, dtype), 8 warps, no software pipelining (num_stages=1: its extra
# buffers would not fit). Chosen from compiles for sm_90 at width 256 (tests assert the shared
# memory): float32 forward 96 KiB of shared memory, backward 134 KiB; float64 100 / 116 KiB.
# Larger blocks exceed the 227 KiB of an SM or spill kilobytes of registers.
_BLOCKS = {("fwd", torch.float32): (16, 64), ("bwd", torch.float32): (16, 32),
           ("fwd", torch.float64): (16, 32), ("bwd", torch.float64): (16, 16)}
LAUNCH = dict(num_warps=8, num_stages=1)


@triton.jit
def _leaky(a, slope):
    return tl.where(a > 0, a, a * slope)


@triton.jit
def _encoding_columns(sigma, F: tl.constexpr, ENC_PAD: tl.constexpr):
    """Per column j of the encoding: which kept coordinate it reads (0/1), its frequency, whether it
    is a cosine, whether it is a sin/cos column at all."""
    j = tl.arange(0, ENC_PAD)
    jj = tl.maximum(j - 2, 0)
    coord = jj // (2 * F)
    trig = (j >= 2) & (j < 2 + 4 * F)
    freq = tl.load(sigma + jj % F, mask=trig, other=0.0)
    is_cos = (jj % (2 * F)) >= F
    return j, coord, freq, is_cos, trig


@triton.jit
def _network(v0, v1, cb_row, sigma, proj_w, proj_b, in_w, w1, b1, w2, b2, out_w, out_b, slope,
             BLOCK_M: tl.constexpr, F: tl.constexpr, ENC_PAD: tl.constexpr, PD: tl.constexpr, H0: tl.constexpr, H1: tl.constexpr,
             H2: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Forward of the block's network: encoding ``e``, ``p``, ``h1`` and the unclamped ``s``, ``t``."""
    ENC: tl.constexpr = 2 + 4 * F
    j, coord, freq, is_cos, trig = _encoding_columns(sigma, F, ENC_PAD)
    arg = tl.where(coord[None, :] == 0, v0[:, None], v1[:, None]) * freq[None, :]
    e = tl.where(is_cos[None, :], tl.cos(arg), tl.sin(arg))
    e = tl.where(trig[None, :], e, 0.0)
    e = tl.where(j[None, :] == 0, v0[:, None], tl.where(j[None, :] == 1, v1[:, None], e))

    k_pd = tl.arange(0, PD)
    wp_t = tl.load(proj_w + k_pd[None, :] * ENC + j[:, None], mask=(j < ENC)[:, None], other=0.0)  # [ENC_PAD, PD]
    p = _leaky(tl.dot(e, wp_t, input_precision=PRECISION) + tl.load(proj_b + k_pd)[None, :], slope)

    k_h1 = tl.arange(0, H1)
    acc1 = tl.zeros((BLOCK_M, H1), dtype=p.dtype)
    for c in tl.range(0, H0, BLOCK_N):
        cols = c + tl.arange(0, BLOCK_N)
        win_t = tl.load(in_w + cols[None, :] * PD + k_pd[:, None])  # [PD, BN]
        h0 = _leaky(tl.dot(p, win_t, input_precision=PRECISION) + tl.load(cb_row + cols)[None, :], slope)
        w1_t = tl.load(w1 + k_h1[None, :] * H0 + cols[:, None])  # [BN, H1]
        acc1 += tl.dot(h0, w1_t, input_precision=PRECISION)
    h1 = _leaky(acc1 + tl.load(b1 + k_h1)[None, :], slope)

    s = tl.zeros((BLOCK_M,), dtype=p.dtype)
    t = tl.zeros((BLOCK_M,), dtype=p.dtype)
    for c in tl.range(0, H2, BLOCK_N):
        cols = c + tl.arange(0, BLOCK_N)
        w2_t = tl.load(w2 + cols[None, :] * H1 + k_h1[:, None])  # [H1, BN]
        h2 = _leaky(tl.dot(h1, w2_t, input_precision=PRECISION) + tl.load(b2 + cols)[None, :], slope)
        s += tl.sum(h2 * tl.load(out_w + cols)[None, :], axis=1)
        t += tl.sum(h2 * tl.load(out_w + H2 + cols)[None, :], axis=1)
    return e, p, h1, s + tl.load(out_b), t + tl.load(out_b + 1)


@triton.jit
def _coupling_fwd_kernel(y, code_bias, sigma, proj_w, proj_b, in_w, w1, b1, w2, b2, out_w, out_b, out, P, slope,
                         TRANSFORMED: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, INVERSE: tl.constexpr,
                         F: tl.constexpr, ENC_PAD: tl.constexpr, PD: tl.constexpr, H0: tl.constexpr,
                         H1: tl.constexpr, H2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         PRECISION: tl.constexpr):
    frame = tl.program_id(1).to(tl.int64)
    pts = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = pts < P
    base = (frame * P + pts) * 3
    v0 = tl.load(y + base + K0, mask=ok, other=0.0)
    v1 = tl.load(y + base + K1, mask=ok, other=0.0)
    yc = tl.load(y + base + TRANSFORMED, mask=ok, other=0.0)
    _, _, _, s, t = _network(v0, v1, code_bias + frame * H0, sigma, proj_w, proj_b, in_w, w1, b1, w2, b2, out_w,
                             out_b, slope, BLOCK_M, F, ENC_PAD, PD, H0, H1, H2, BLOCK_N, PRECISION)
    s = tl.minimum(tl.maximum(s, -8.0), 8.0)
    if INVERSE:
        xc = yc * tl.exp(s) + t
    else:
        xc = (yc - t) * tl.exp(-s)
    tl.store(out + base + K0, v0, mask=ok)
    tl.store(out + base + K1, v1, mask=ok)
    tl.store(out + base + TRANSFORMED, xc, mask=ok)


@triton.jit
def _coupling_bwd_kernel(grad_out, y, code_bias, sigma, proj_w, proj_b, in_w, w1, b1, w2, b2, out_w, out_b,
                         grad_y, g_cb, g_pw, g_pb, g_inw, g_w1, g_b1, g_w2, g_b2, g_ow, g_ob, P, slope,
                         TRANSFORMED: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, INVERSE: tl.constexpr,
                         F: tl.constexpr, ENC_PAD: tl.constexpr, PD: tl.constexpr, H0: tl.constexpr,
                         H1: tl.constexpr, H2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         PRECISION: tl.constexpr):
    ENC: tl.constexpr = 2 + 4 * F
    frame = tl.program_id(1).to(tl.int64)
    pts = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = pts < P
    base = (frame * P + pts) * 3
    v0 = tl.load(y + base + K0, mask=ok, other=0.0)
    v1 = tl.load(y + base + K1, mask=ok, other=0.0)
    yc = tl.load(y + base + TRANSFORMED, mask=ok, other=0.0)
    cb_row = code_bias + frame * H0
    e, p, h1, s_raw, t = _network(v0, v1, cb_row, sigma, proj_w, proj_b, in_w, w1, b1, w2, b2, out_w, out_b, slope,
                                  BLOCK_M, F, ENC_PAD, PD, H0, H1, H2, BLOCK_N, PRECISION)

    # the affine update; rows past P have g = 0, so they add nothing anywhere below
    g = tl.load(grad_out + base + TRANSFORMED, mask=ok, other=0.0)
    s = tl.minimum(tl.maximum(s_raw, -8.0), 8.0)
    if INVERSE:
        scale = tl.exp(s)
        g_s = g * yc * scale
        g_t = g
    else:
        scale = tl.exp(-s)
        g_s = -g * (yc - t) * scale
        g_t = -g * scale
    g_s = tl.where((s_raw >= -8.0) & (s_raw <= 8.0), g_s, 0.0)  # as torch.clamp's gradient
    tl.atomic_add(g_ob, tl.sum(g_s, axis=0))
    tl.atomic_add(g_ob + 1, tl.sum(g_t, axis=0))

    # h2 chunks -> (s, t): gradients of Wo, W2, b2 and of h1
    k_h1 = tl.arange(0, H1)
    g_h1 = tl.zeros((BLOCK_M, H1), dtype=p.dtype)
    for c in tl.range(0, H2, BLOCK_N):
        cols = c + tl.arange(0, BLOCK_N)
        w2_t = tl.load(w2 + cols[None, :] * H1 + k_h1[:, None])  # [H1, BN]
        h2 = _leaky(tl.dot(h1, w2_t, input_precision=PRECISION) + tl.load(b2 + cols)[None, :], slope)
        tl.atomic_add(g_ow + cols, tl.sum(g_s[:, None] * h2, axis=0))
        tl.atomic_add(g_ow + H2 + cols, tl.sum(g_t[:, None] * h2, axis=0))
        g_a2 = g_s[:, None] * tl.load(out_w + cols)[None, :] + g_t[:, None] * tl.load(out_w + H2 + cols)[None, :]
        g_a2 = tl.where(h2 > 0, g_a2, g_a2 * slope)
        tl.atomic_add(g_b2 + cols, tl.sum(g_a2, axis=0))
        tl.atomic_add(g_w2 + cols[:, None] * H1 + k_h1[None, :],
                      tl.dot(tl.trans(g_a2), h1, input_precision=PRECISION))  # [BN, H1]
        g_h1 += tl.dot(g_a2, tl.trans(w2_t), input_precision=PRECISION)
    g_a1 = tl.where(h1 > 0, g_h1, g_h1 * slope)
    tl.atomic_add(g_b1 + k_h1, tl.sum(g_a1, axis=0))

    # h0 chunks (recomputed from p): gradients of W1, Win, the code bias and of p
    k_pd = tl.arange(0, PD)
    g_p = tl.zeros((BLOCK_M, PD), dtype=p.dtype)
    for c in tl.range(0, H0, BLOCK_N):
        cols = c + tl.arange(0, BLOCK_N)
        win_t = tl.load(in_w + cols[None, :] * PD + k_pd[:, None])  # [PD, BN]
        h0 = _leaky(tl.dot(p, win_t, input_precision=PRECISION) + tl.load(cb_row + cols)[None, :], slope)
        w1_t = tl.load(w1 + k_h1[None, :] * H0 + cols[:, None])  # [BN, H1]
        tl.atomic_add(g_w1 + k_h1[:, None] * H0 + cols[None, :],
                      tl.dot(tl.trans(g_a1), h0, input_precision=PRECISION))  # [H1, BN]
        g_a0 = tl.dot(g_a1, tl.trans(w1_t), input_precision=PRECISION)
        g_a0 = tl.where(h0 > 0, g_a0, g_a0 * slope)
        tl.atomic_add(g_cb + frame * H0 + cols, tl.sum(g_a0, axis=0))
        tl.atomic_add(g_inw + cols[:, None] * PD + k_pd[None, :],
                      tl.dot(tl.trans(g_a0), p, input_precision=PRECISION))  # [BN, PD]
        g_p += tl.dot(g_a0, tl.trans(win_t), input_precision=PRECISION)
    g_ap = tl.where(p > 0, g_p, g_p * slope)
    tl.atomic_add(g_pb + k_pd, tl.sum(g_ap, axis=0))

    # projection and encoding
    j, coord, freq, is_cos, trig = _encoding_columns(sigma, F, ENC_PAD)
    tl.atomic_add(g_pw + k_pd[:, None] * ENC + j[None, :], tl.dot(tl.trans(g_ap), e, input_precision=PRECISION),
                  mask=(j < ENC)[None, :])  # [PD, ENC_PAD]
    wp = tl.load(proj_w + k_pd[:, None] * ENC + j[None, :], mask=(j < ENC)[None, :], other=0.0)  # [PD, ENC_PAD]
    g_e = tl.dot(g_ap, wp, input_precision=PRECISION)  # [BM, ENC_PAD]
    # d sin(v f)/dv = f cos(v f), d cos(v f)/dv = -f sin(v f); columns 0 and 1 are v0 and v1 themselves
    arg = tl.where(coord[None, :] == 0, v0[:, None], v1[:, None]) * freq[None, :]
    d_trig = tl.where(is_cos[None, :], -tl.sin(arg), tl.cos(arg)) * freq[None, :]
    d_enc = tl.where(trig[None, :], d_trig, tl.where(j[None, :] < 2, 1.0, 0.0))
    on_v0 = (j == 0) | (trig & (coord == 0))
    on_v1 = (j == 1) | (trig & (coord == 1))
    g_v0 = tl.sum(tl.where(on_v0[None, :], g_e * d_enc, 0.0), axis=1)
    g_v1 = tl.sum(tl.where(on_v1[None, :], g_e * d_enc, 0.0), axis=1)
    tl.store(grad_y + base + K0, tl.load(grad_out + base + K0, mask=ok, other=0.0) + g_v0, mask=ok)
    tl.store(grad_y + base + K1, tl.load(grad_out + base + K1, mask=ok, other=0.0) + g_v1, mask=ok)
    tl.store(grad_y + base + TRANSFORMED, g * scale, mask=ok)


def config(kernel: str, dtype: torch.dtype, proj_weight, in_weight, hidden_weights, sigma, transformed: int,
           inverse: bool) -> dict:
    """Compile-time constants of ``kernel`` (``'fwd'`` or ``'bwd'``) for this layer."""
    F = sigma.shape[0]
    h0, h1, h2 = in_weight.shape[0], hidden_weights[0].shape[0], hidden_weights[1].shape[0]
    kept = [c for c in range(3) if c != transformed]
    block_m, block_n = _BLOCKS[kernel, dtype]
    return dict(TRANSFORMED=transformed, K0=kept[0], K1=kept[1], INVERSE=bool(inverse), F=F,
                ENC_PAD=max(16, triton.next_power_of_2(2 + 4 * F)), PD=proj_weight.shape[0], H0=h0, H1=h1, H2=h2,
                BLOCK_M=block_m, BLOCK_N=min(block_n, h0, h2),
                PRECISION="tf32x3" if dtype == torch.float32 else "ieee")


def affine_coupling_fwd(y, code_bias, proj_weight, proj_bias, in_weight, hidden_weights, hidden_biases, out_weight,
                        out_bias, sigma, transformed: int, inverse: bool, negative_slope: float) -> torch.Tensor:
    """``y [n, P, 3]`` -> ``[n, P, 3]``; arguments as :func:`fastomni.ops.affine_coupling.affine_coupling`,
    exactly two hidden layers."""
    n, P = y.shape[:2]
    y, code_bias = y.contiguous(), code_bias.contiguous()
    weights = [t.contiguous() for t in (proj_weight, proj_bias, in_weight, hidden_weights[0], hidden_biases[0],
                                        hidden_weights[1], hidden_biases[1], out_weight, out_bias)]
    out = torch.empty_like(y)
    if n * P:
        cfg = config("fwd", y.dtype, proj_weight, in_weight, hidden_weights, sigma, transformed, inverse)
        _coupling_fwd_kernel[(triton.cdiv(P, cfg["BLOCK_M"]), n)](
            y, code_bias, sigma.contiguous(), *weights, out, P, float(negative_slope), **LAUNCH, **cfg)
    return out


def affine_coupling_bwd(grad_out, y, code_bias, proj_weight, proj_bias, in_weight, hidden_weights, hidden_biases,
                        out_weight, out_bias, sigma, transformed: int, inverse: bool,
                        negative_slope: float) -> list[torch.Tensor]:
    """Gradients ``[y, code_bias, proj_weight, proj_bias, in_weight, W1, W2, b1, b2, out_weight, out_bias]``
    (the op's flat order) from ``grad_out [n, P, 3]``."""
    n, P = y.shape[:2]
    y, code_bias, grad_out = y.contiguous(), code_bias.contiguous(), grad_out.contiguous()
    weights = [t.contiguous() for t in (proj_weight, proj_bias, in_weight, hidden_weights[0], hidden_biases[0],
                                        hidden_weights[1], hidden_biases[1], out_weight, out_bias)]
    grad_y = torch.empty_like(y)
    g_cb = torch.zeros_like(code_bias)
    g_w = [torch.zeros_like(w) for w in weights]  # accumulated with atomics
    if n * P:
        cfg = config("bwd", y.dtype, proj_weight, in_weight, hidden_weights, sigma, transformed, inverse)
        _coupling_bwd_kernel[(triton.cdiv(P, cfg["BLOCK_M"]), n)](
            grad_out, y, code_bias, sigma.contiguous(), *weights, grad_y, g_cb, *g_w, P, float(negative_slope),
            **LAUNCH, **cfg)
    g_pw, g_pb, g_inw, g_w1, g_b1, g_w2, g_b2, g_ow, g_ob = g_w
    return [grad_y, g_cb, g_pw, g_pb, g_inw, g_w1, g_w2, g_b1, g_b2, g_ow, g_ob]
