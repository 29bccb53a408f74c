"""Triton kernels of ``affine_coupling`` (spec: :mod:`fastomni.reference.affine_coupling`), for the
default network: encoding (2 + 4F) -> PD -> H0 (+ per-frame code bias) -> H1 -> H2 -> (s, t), widths
powers of two in [16, 256] (the op layer checks this and says why otherwise).

Tiling. A program takes ``BLOCK_M`` points of one frame (grid ``(cdiv(P, BLOCK_M), n)``), so the
frame's code bias is one row. In the forward, activations never leave registers: the layers
alternate between a full-width tile and column chunks of ``BLOCK_N``, each chunk consumed as soon
as it is made::

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
and in the backward ``g_h1``, ``g_a1``, ``g_p``) are what limits the block: at width 256 the compiles
for sm_90 allow ``BLOCK_M`` = 16 (see ``_BLOCKS``). float32 dots use ``tf32x3`` (three TF32
tensor-core products, float32 accuracy), float64 ``ieee``.

The backward is two kernels and a few torch ops, with no atomics (deterministic for a fixed shape):

1. ``_coupling_bwd_recompute_kernel`` runs the forward again (``_network`` with ``SAVE``) and writes
   each point's activations ``e, p, h0, h1, h2`` to ``acts [n P, PD + H0 + H1 + H2 + ENC_PAD]``, the
   gradients of the unclamped ``(s, t)`` to ``g_st [n P, 2]`` and grad_y's transformed coordinate.
2. ``_coupling_bwd_kernel`` runs the chain rule from ``g_st`` down, reading the activations back
   (the LeakyReLU masks, no recompute) in the forward's chunk order; it writes the gradients of the
   pre-activations ``g_a2, g_a1, g_a0, g_ap`` to ``grads [n P, PD + H0 + H1 + H2]`` and grad_y's two
   kept coordinates. Its only full-width tiles are ``g_h1`` / ``g_a1`` and ``g_p``.
3. :func:`affine_coupling_bwd` forms each weight gradient as one ``mm`` over all points (e.g.
   ``dW2 = g_a2^T h1``), each bias gradient and the code bias's as a ``sum``. These are float32
   (float64) unless the caller enables TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32``), and
   give the same bits on every run of a shape on one GPU model and library version.

No kernel holds a weight-gradient accumulator. Spills at width 256 (ptxas, sm_90 / sm_80): none /
24 B in float32, none in the float64 recompute, 288 / 368 B in the float64 chain rule (its ``H0``
loop holds ``g_a1`` and ``g_p``, 32 float64 registers each); the one-kernel backward with per-block
partial sums and float atomics used 255 registers and 0.5-2 KiB of stack. tests/test_affine_coupling.py
bounds each kernel's stack. The buffers cost 8,272 B per point in float32 at widths 256, F = 4 (double in
float64), alive during the backward only.

Launches run under ``torch.cuda.device_of(y)`` (Triton launches on the current device). The
LeakyReLU slope is a compile-time constant: a float argument would be typed fp32.

Bytes per point, float32, ``BLOCK_M`` = 16, PD = H = 256, F = 4 (estimates from the code, not measured):
- HBM: forward reads y (12 B), writes x (12 B). Backward: the kernels write ``acts`` and ``grads``
  (~8.3 KB) and read ``acts`` back (~4.1 KB); the ``mm``s and sums read both again (~12 KB).
- L2: the forward reads the weights (~806 KB) once per program, ~50 KB per point; the backward
  twice (~100 KB per point; the one-kernel backward read ~126 KB and added ~50 KB of atomics).
  L2 traffic, not the 0.4 MFLOP per point, bounds these kernels: larger blocks need the
  full-width activations out of registers (a shared-memory or split-K design).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["affine_coupling_fwd", "affine_coupling_bwd", "config", "launch_options"]

# (BLOCK_M, BLOCK_N, num_warps) per (kernel, dtype), no software pipelining (num_stages=1: its extra
# buffers would not fit). Chosen from compiles for sm_80 and sm_90 at width 256 (fewest spills; tests
# assert the shared memory and bound the stack): float32 shared memory forward 96 KiB, backward
# 64 + 48 KiB; float64 100 / 100 + 100 KiB. BLOCK_M = 32 spills 0.5-7 KiB, 4 or 16 warps spill more.
_BLOCKS = {("fwd", torch.float32): (16, 64, 8), ("bwd_recompute", torch.float32): (16, 32, 8),
           ("bwd", torch.float32): (16, 16, 8),
           ("fwd", torch.float64): (16, 32, 8), ("bwd_recompute", torch.float64): (16, 32, 8),
           ("bwd", torch.float64): (16, 32, 8)}


def launch_options(kernel: str, dtype: torch.dtype) -> dict:
    """Compile options of ``kernel`` (a key of ``_BLOCKS``) for ``dtype``."""
    return dict(num_warps=_BLOCKS[kernel, dtype][2], num_stages=1)


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
def _network(v0, v1, cb_row, sigma, proj_w, proj_b, in_w, w1, b1, w2, b2, out_w, out_b, acts, rows, ok,
             SLOPE: tl.constexpr, BLOCK_M: tl.constexpr, F: tl.constexpr, ENC_PAD: tl.constexpr, PD: tl.constexpr,
             H0: tl.constexpr, H1: tl.constexpr, H2: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
             SAVE: tl.constexpr, SAVE_P_LATE: tl.constexpr):
    """Forward of the block's network: the unclamped ``s``, ``t``. With ``SAVE``, also writes the
    block's activations to rows ``rows`` (where ``ok``) of ``acts`` (layout: :func:`_act_columns`);
    ``p`` after its last use if ``SAVE_P_LATE``, else as soon as it is made (which spills less
    depends on the dtype: see ``config``)."""
    ENC: tl.constexpr = 2 + 4 * F
    W_ACT: tl.constexpr = PD + H0 + H1 + H2 + ENC_PAD
    j, coord, freq, is_cos, trig = _encoding_columns(sigma, F, ENC_PAD)
    arg = tl.where(coord[None, :] == 0, v0[:, None], v1[:, None]) * freq[None, :]
    e = tl.where(is_cos[None, :], tl.cos(arg), tl.sin(arg))
    e = tl.where(trig[None, :], e, 0.0)
    e = tl.where(j[None, :] == 0, v0[:, None], tl.where(j[None, :] == 1, v1[:, None], e))
    if SAVE:
        tl.store(acts + rows[:, None] * W_ACT + PD + H0 + H1 + H2 + j[None, :], e, mask=ok[:, None])

    k_pd = tl.arange(0, PD)
    wp_t = tl.load(proj_w + k_pd[None, :] * ENC + j[:, None], mask=(j < ENC)[:, None], other=0.0)  # [ENC_PAD, PD]
    p = _leaky(tl.dot(e, wp_t, input_precision=PRECISION) + tl.load(proj_b + k_pd)[None, :], SLOPE)
    if SAVE and not SAVE_P_LATE:
        tl.store(acts + rows[:, None] * W_ACT + k_pd[None, :], p, mask=ok[:, None])

    k_h1 = tl.arange(0, H1)
    acc1 = tl.zeros((BLOCK_M, H1), dtype=p.dtype)
    for c in tl.range(0, H0, BLOCK_N):
        cols = c + tl.arange(0, BLOCK_N)
        win_t = tl.load(in_w + cols[None, :] * PD + k_pd[:, None])  # [PD, BN]
        h0 = _leaky(tl.dot(p, win_t, input_precision=PRECISION) + tl.load(cb_row + cols)[None, :], SLOPE)
        if SAVE:
            tl.store(acts + rows[:, None] * W_ACT + PD + cols[None, :], h0, mask=ok[:, None])
        w1_t = tl.load(w1 + k_h1[None, :] * H0 + cols[:, None])  # [BN, H1]
        acc1 += tl.dot(h0, w1_t, input_precision=PRECISION)
    if SAVE and SAVE_P_LATE:
        tl.store(acts + rows[:, None] * W_ACT + k_pd[None, :], p, mask=ok[:, None])
    h1 = _leaky(acc1 + tl.load(b1 + k_h1)[None, :], SLOPE)
    if SAVE:
        tl.store(acts + rows[:, None] * W_ACT + PD + H0 + k_h1[None, :], h1, mask=ok[:, None])

    s = tl.zeros((BLOCK_M,), dtype=p.dtype)
    t = tl.zeros((BLOCK_M,), dtype=p.dtype)
    for c in tl.range(0, H2, BLOCK_N):
        cols = c + tl.arange(0, BLOCK_N)
        w2_t = tl.load(w2 + cols[None, :] * H1 + k_h1[:, None])  # [H1, BN]
        h2 = _leaky(tl.dot(h1, w2_t, input_precision=PRECISION) + tl.load(b2 + cols)[None, :], SLOPE)
        if SAVE:
            tl.store(acts + rows[:, None] * W_ACT + PD + H0 + H1 + cols[None, :], h2, mask=ok[:, None])
        s += tl.sum(h2 * tl.load(out_w + cols)[None, :], axis=1)
        t += tl.sum(h2 * tl.load(out_w + H2 + cols)[None, :], axis=1)
    return s + tl.load(out_b), t + tl.load(out_b + 1)


@triton.jit
def _coupling_fwd_kernel(y, code_bias, sigma, proj_w, proj_b, in_w, w1, b1, w2, b2, out_w, out_b, out, P,
                         SLOPE: tl.constexpr,
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
    s, t = _network(v0, v1, code_bias + frame * H0, sigma, proj_w, proj_b, in_w, w1, b1, w2, b2, out_w, out_b,
                    None, frame * P + pts, ok, SLOPE, BLOCK_M, F, ENC_PAD, PD, H0, H1, H2, BLOCK_N, PRECISION, False,
                    False)
    s = tl.minimum(tl.maximum(s, -8.0), 8.0)
    if INVERSE:
        xc = yc * tl.exp(s) + t
    else:
        xc = (yc - t) * tl.exp(-s)
    tl.store(out + base + K0, v0, mask=ok)
    tl.store(out + base + K1, v1, mask=ok)
    tl.store(out + base + TRANSFORMED, xc, mask=ok)


@triton.jit
def _coupling_bwd_recompute_kernel(grad_out, y, code_bias, sigma, proj_w, proj_b, in_w, w1, b1, w2, b2, out_w, out_b,
                                   acts, g_st, grad_y, P, SLOPE: tl.constexpr, TRANSFORMED: tl.constexpr,
                                   K0: tl.constexpr, K1: tl.constexpr, INVERSE: tl.constexpr, F: tl.constexpr,
                                   ENC_PAD: tl.constexpr, PD: tl.constexpr, H0: tl.constexpr, H1: tl.constexpr,
                                   H2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                   PRECISION: tl.constexpr, SAVE_P_LATE: tl.constexpr):
    """Backward, part 1: the block's forward again, its activations written to ``acts``; the gradients
    of the unclamped ``s``, ``t`` to ``g_st [n P, 2]`` and that of the transformed coordinate to grad_y."""
    frame = tl.program_id(1).to(tl.int64)
    pts = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = pts < P
    rows = frame * P + pts
    base = rows * 3
    v0 = tl.load(y + base + K0, mask=ok, other=0.0)
    v1 = tl.load(y + base + K1, mask=ok, other=0.0)
    yc = tl.load(y + base + TRANSFORMED, mask=ok, other=0.0)
    s_raw, t = _network(v0, v1, code_bias + frame * H0, sigma, proj_w, proj_b, in_w, w1, b1, w2, b2, out_w, out_b,
                        acts, rows, ok, SLOPE, BLOCK_M, F, ENC_PAD, PD, H0, H1, H2, BLOCK_N, PRECISION, True,
                        SAVE_P_LATE)
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
    tl.store(g_st + rows * 2, g_s, mask=ok)
    tl.store(g_st + rows * 2 + 1, g_t, mask=ok)
    tl.store(grad_y + base + TRANSFORMED, g * scale, mask=ok)


@triton.jit
def _coupling_bwd_kernel(grad_out, y, sigma, proj_w, in_w, w1, w2, out_w, acts, g_st, grads, grad_y, P,
                         SLOPE: tl.constexpr, TRANSFORMED: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr,
                         INVERSE: tl.constexpr, F: tl.constexpr, ENC_PAD: tl.constexpr, PD: tl.constexpr,
                         H0: tl.constexpr, H1: tl.constexpr, H2: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Backward, part 2: the chain rule from ``g_st`` down to the encoding, reading the activations from
    ``acts``. Writes the gradients of the pre-activations (``grads``, layout :func:`_grad_columns`) and
    those of the two kept coordinates to grad_y."""
    ENC: tl.constexpr = 2 + 4 * F
    W_ACT: tl.constexpr = PD + H0 + H1 + H2 + ENC_PAD
    W_GRAD: tl.constexpr = PD + H0 + H1 + H2
    frame = tl.program_id(1).to(tl.int64)
    pts = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = pts < P
    rows = frame * P + pts
    base = rows * 3
    act_rows = acts + rows[:, None] * W_ACT
    grad_rows = grads + rows[:, None] * W_GRAD
    g_s = tl.load(g_st + rows * 2, mask=ok, other=0.0)  # rows past P: 0, so they add nothing below
    g_t = tl.load(g_st + rows * 2 + 1, mask=ok, other=0.0)

    # h2 chunks -> (s, t): gradient of the pre-activation a2, and of h1
    k_h1 = tl.arange(0, H1)
    g_h1 = tl.zeros((BLOCK_M, H1), dtype=g_s.dtype)
    for c in tl.range(0, H2, BLOCK_N):
        cols = c + tl.arange(0, BLOCK_N)
        h2 = tl.load(act_rows + PD + H0 + H1 + cols[None, :], mask=ok[:, None], other=0.0)
        g_a2 = g_s[:, None] * tl.load(out_w + cols)[None, :] + g_t[:, None] * tl.load(out_w + H2 + cols)[None, :]
        g_a2 = tl.where(h2 > 0, g_a2, g_a2 * SLOPE)
        tl.store(grad_rows + PD + H0 + H1 + cols[None, :], g_a2, mask=ok[:, None])
        w2_c = tl.load(w2 + cols[:, None] * H1 + k_h1[None, :])  # [BN, H1]
        g_h1 += tl.dot(g_a2, w2_c, input_precision=PRECISION)
    h1 = tl.load(act_rows + PD + H0 + k_h1[None, :], mask=ok[:, None], other=0.0)
    g_a1 = tl.where(h1 > 0, g_h1, g_h1 * SLOPE)
    tl.store(grad_rows + PD + H0 + k_h1[None, :], g_a1, mask=ok[:, None])

    # h0 chunks: gradient of a0 (the code bias's too), and of p
    k_pd = tl.arange(0, PD)
    g_p = tl.zeros((BLOCK_M, PD), dtype=g_s.dtype)
    for c in tl.range(0, H0, BLOCK_N):
        cols = c + tl.arange(0, BLOCK_N)
        h0 = tl.load(act_rows + PD + cols[None, :], mask=ok[:, None], other=0.0)
        w1_c = tl.load(w1 + k_h1[:, None] * H0 + cols[None, :])  # [H1, BN]
        g_a0 = tl.dot(g_a1, w1_c, input_precision=PRECISION)
        g_a0 = tl.where(h0 > 0, g_a0, g_a0 * SLOPE)
        tl.store(grad_rows + PD + cols[None, :], g_a0, mask=ok[:, None])
        win_c = tl.load(in_w + cols[:, None] * PD + k_pd[None, :])  # [BN, PD]
        g_p += tl.dot(g_a0, win_c, input_precision=PRECISION)
    p = tl.load(act_rows + k_pd[None, :], mask=ok[:, None], other=0.0)
    g_ap = tl.where(p > 0, g_p, g_p * SLOPE)
    tl.store(grad_rows + k_pd[None, :], g_ap, mask=ok[:, None])

    # projection and encoding
    j, coord, freq, is_cos, trig = _encoding_columns(sigma, F, ENC_PAD)
    wp = tl.load(proj_w + k_pd[:, None] * ENC + j[None, :], mask=(j < ENC)[None, :], other=0.0)  # [PD, ENC_PAD]
    g_e = tl.dot(g_ap, wp, input_precision=PRECISION)  # [BM, ENC_PAD]
    v0 = tl.load(y + base + K0, mask=ok, other=0.0)
    v1 = tl.load(y + base + K1, mask=ok, other=0.0)
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


def _act_columns(widths: dict) -> list[int]:
    """Column widths of the backward's activation buffer ``acts [n P, W]``: ``p``, ``h0``, ``h1``,
    ``h2`` and the encoding ``e`` (zero-padded to ``ENC_PAD`` columns)."""
    return [widths["PD"], widths["H0"], widths["H1"], widths["H2"], widths["ENC_PAD"]]


def _grad_columns(widths: dict) -> list[int]:
    """Column widths of the backward's buffer ``grads [n P, W]`` of pre-activation gradients: those of
    ``p``'s, ``h0``'s (``a0``), ``h1``'s and ``h2``'s pre-activations."""
    return [widths["PD"], widths["H0"], widths["H1"], widths["H2"]]


def config(kernel: str, dtype: torch.dtype, proj_weight, in_weight, hidden_weights, sigma, transformed: int,
           inverse: bool, negative_slope: float = 0.01) -> dict:
    """Compile-time constants of ``kernel`` (a key of ``_BLOCKS``) for this layer. The LeakyReLU slope is
    one of them: a float passed at run time is typed fp32 by the compiler (0.01 -> 0.009999999776 in a
    float64 kernel), a constexpr becomes a literal of the kernel's dtype."""
    F = sigma.shape[0]
    h0, h1, h2 = in_weight.shape[0], hidden_weights[0].shape[0], hidden_weights[1].shape[0]
    kept = [c for c in range(3) if c != transformed]
    block_m, block_n, _ = _BLOCKS[kernel, dtype]
    cfg = dict(TRANSFORMED=transformed, K0=kept[0], K1=kept[1], INVERSE=bool(inverse), F=F,
               ENC_PAD=max(16, triton.next_power_of_2(2 + 4 * F)), PD=proj_weight.shape[0], H0=h0, H1=h1, H2=h2,
               BLOCK_M=block_m, BLOCK_N=min(block_n, h0, h2), SLOPE=float(negative_slope),
               PRECISION="tf32x3" if dtype == torch.float32 else "ieee")
    if kernel == "bwd_recompute":
        # writing p after its last use: float64 0 B of spills instead of 224-296 B; float32 16-44 B instead of 0-24 B
        cfg["SAVE_P_LATE"] = dtype == torch.float64
    return cfg


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
        cfg = config("fwd", y.dtype, proj_weight, in_weight, hidden_weights, sigma, transformed, inverse,
                     negative_slope)
        with torch.cuda.device_of(y):
            _coupling_fwd_kernel[(triton.cdiv(P, cfg["BLOCK_M"]), n)](
                y, code_bias, sigma.contiguous(), *weights, out, P, **launch_options("fwd", y.dtype), **cfg)
    return out


def affine_coupling_bwd(grad_out, y, code_bias, proj_weight, proj_bias, in_weight, hidden_weights, hidden_biases,
                        out_weight, out_bias, sigma, transformed: int, inverse: bool,
                        negative_slope: float) -> list[torch.Tensor]:
    """Gradients ``[y, code_bias, proj_weight, proj_bias, in_weight, W1, W2, b1, b2, out_weight, out_bias]``
    (the op's flat order) from ``grad_out [n, P, 3]``.

    The kernels write each point's activations and pre-activation gradients (``acts``, ``grads``);
    each weight gradient is then one ``mm`` over all ``n P`` points, each bias gradient one ``sum``:
    no atomics, so the result is the same bit for bit from run to run (for a fixed shape and device).
    Memory: the two buffers hold ``2 (PD + H0 + H1 + H2) + ENC_PAD + 2`` values per point, 8,272 B in
    float32 at widths 256 and F = 4 (16.5 KB in float64), freed when this returns."""
    n, P = y.shape[:2]
    y, code_bias, grad_out, sigma = y.contiguous(), code_bias.contiguous(), grad_out.contiguous(), sigma.contiguous()
    weights = [t.contiguous() for t in (proj_weight, proj_bias, in_weight, hidden_weights[0], hidden_biases[0],
                                        hidden_weights[1], hidden_biases[1], out_weight, out_bias)]
    proj_w, _, in_w, w1, _, w2, _, out_w, _ = weights
    cfg = {kernel: config(kernel, y.dtype, proj_weight, in_weight, hidden_weights, sigma, transformed, inverse,
                          negative_slope) for kernel in ("bwd_recompute", "bwd")}
    act_columns, grad_columns = _act_columns(cfg["bwd"]), _grad_columns(cfg["bwd"])
    acts = y.new_empty(n * P, sum(act_columns))
    grads = y.new_empty(n * P, sum(grad_columns))
    g_st = y.new_empty(n * P, 2)  # gradients of the unclamped s and t
    grad_y = torch.empty_like(y)
    if n * P:
        with torch.cuda.device_of(y):
            _coupling_bwd_recompute_kernel[(triton.cdiv(P, cfg["bwd_recompute"]["BLOCK_M"]), n)](
                grad_out, y, code_bias, sigma, *weights, acts, g_st, grad_y, P,
                **launch_options("bwd_recompute", y.dtype), **cfg["bwd_recompute"])
            _coupling_bwd_kernel[(triton.cdiv(P, cfg["bwd"]["BLOCK_M"]), n)](
                grad_out, y, sigma, proj_w, in_w, w1, w2, out_w, acts, g_st, grads, grad_y, P,
                **launch_options("bwd", y.dtype), **cfg["bwd"])
    p, h0, h1, h2, e = acts.split(act_columns, dim=1)
    g_ap, g_a0, g_a1, g_a2 = grads.split(grad_columns, dim=1)
    e = e[:, :proj_weight.shape[1]]
    return [grad_y, g_a0.unflatten(0, (n, P)).sum(1), g_ap.T.mm(e), g_ap.sum(0), g_a0.T.mm(p), g_a1.T.mm(h0),
            g_a2.T.mm(h1), g_a1.sum(0), g_a2.sum(0), g_st.T.mm(h2), g_st.sum(0)]
