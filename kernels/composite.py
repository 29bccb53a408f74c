"""Triton kernels of ``composite`` (spec: :mod:`fastomni.reference.composite`).

Tiling: a program takes ``BLOCK_R`` rays x ``BLOCK_K`` samples (``BLOCK_K`` = K rounded up to a
power of two; ``BLOCK_R * BLOCK_K`` = 512 elements, so 4 warps hold one element per thread in
registers at OmniMotion's K = 32, 16 rays a program). Each row of the tile is one ray; the
transmittance is an exclusive product scan along the row, done in registers (``tl.cumprod`` on
``q_{k-1}``, read by a second, cached load of the density shifted by one sample). Color and point
channels (``C``, ``D``) are compile-time constants, one strided load per channel.

Forward, bytes per ray of K samples (s = element size): reads ``K (1 + C + D) s`` (+ K bytes of
mask, + the shifted density re-read from cache), writes ``(2K + C + D + 1) s``; at K = 32, C = D =
3, float32: 896 bytes read, 284 written.

Backward: recomputes ``T`` the same way, then needs the exclusive reverse sum
``sum_{j>k} g_j w_j``: ``g w`` is written to the density-gradient output as scratch, re-read shifted
by one sample after a barrier and scanned (``tl.cumsum(reverse=True)``), which keeps the sum exact
(no ``inclusive - self`` cancellation, which ``/ (1 - alpha_k + 1e-10)`` would amplify). Bytes per
ray: reads ``K (3 + C + D) s + (C + D + 1) s`` (+ mask; + the scratch round trip ``2 K s``),
writes ``K (1 + C + D) s``. No shared memory beyond what the scans use.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["composite_bwd", "composite_fwd"]

_TILE = 512  # elements per program: BLOCK_R * BLOCK_K


@triton.jit
def _transmittance(density, rows, k, valid, K):
    """``(exp(-s), alpha, T)`` of a ``[BLOCK_R, BLOCK_K]`` tile of rays: ``T_k = prod_{l<k} q_l``."""
    s = tl.load(density + rows * K + k, mask=valid, other=0.0)
    e = tl.exp(-s)
    a = 1.0 - e
    eps = tl.full((1, 1), 1e-10, s.dtype)
    has_prev = valid & (k >= 1)
    s_prev = tl.load(density + rows * K + k - 1, mask=has_prev, other=0.0)
    q_prev = tl.where(has_prev, (1.0 - (1.0 - tl.exp(-s_prev))) + eps, 1.0)
    return e, a, tl.cumprod(q_prev, axis=1)


@triton.jit
def _tile(R, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Ray ids ``r [BLOCK_R]``, their column ``rows [BLOCK_R, 1]``, samples ``k [1, BLOCK_K]``, and
    the in-bounds mask of the tile."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rows = r[:, None]
    k = tl.arange(0, BLOCK_K)[None, :]
    return r, rows, k, (rows < R) & (k < K)


@triton.jit
def _composite_fwd_kernel(density, colors, points, mask, weights, alphas, rgb, point, opacity, R, K,
                          C: tl.constexpr, D: tl.constexpr, HAS_MASK: tl.constexpr, SELECT_MAX: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    r, rows, k, valid = _tile(R, K, BLOCK_R, BLOCK_K)
    row_ok = r < R
    _, a, trans = _transmittance(density, rows, k, valid, K)
    w = a * trans
    idx = rows * K + k
    tl.store(weights + idx, w, mask=valid)
    tl.store(alphas + idx, a, mask=valid)
    wm = w
    if HAS_MASK:
        wm = w * tl.load(mask + idx, mask=valid, other=0).to(w.dtype)
    tl.store(opacity + r, tl.sum(tl.where(valid, wm, 0.0), axis=1), mask=row_ok)
    for c in tl.static_range(C):
        col = tl.load(colors + idx * C + c, mask=valid, other=0.0)
        tl.store(rgb + r * C + c, tl.sum(w * col, axis=1), mask=row_ok)
    if SELECT_MAX:
        # first maximum, as torch.argmax; padding lanes never win
        best = tl.argmax(tl.where(valid, wm, -float("inf")), axis=1, tie_break_left=True).to(tl.int64)
        for c in tl.static_range(D):
            val = tl.load(points + (r * K + best) * D + c, mask=row_ok, other=0.0)
            tl.store(point + r * D + c, val, mask=row_ok)
    else:
        for c in tl.static_range(D):
            pts = tl.load(points + idx * D + c, mask=valid, other=0.0)
            tl.store(point + r * D + c, tl.sum(wm * pts, axis=1), mask=row_ok)


@triton.jit
def _composite_bwd_kernel(grad_weights, grad_alphas, grad_rgb, grad_point, grad_opacity, density, colors, points,
                          mask, grad_density, grad_colors, grad_points, R, K, C: tl.constexpr, D: tl.constexpr,
                          HAS_MASK: tl.constexpr, SELECT_MAX: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    r, rows, k, valid = _tile(R, K, BLOCK_R, BLOCK_K)
    row_ok = r < R
    e, a, trans = _transmittance(density, rows, k, valid, K)
    w = a * trans
    idx = rows * K + k
    keep = tl.where(valid, 1.0, 0.0).to(w.dtype)
    if HAS_MASK:
        keep = tl.load(mask + idx, mask=valid, other=0).to(w.dtype)
    wm = w * keep
    g = tl.load(grad_weights + idx, mask=valid, other=0.0)
    g += keep * tl.load(grad_opacity + r, mask=row_ok, other=0.0)[:, None]
    for c in tl.static_range(C):
        grgb = tl.load(grad_rgb + r * C + c, mask=row_ok, other=0.0)[:, None]
        g += grgb * tl.load(colors + idx * C + c, mask=valid, other=0.0)
        tl.store(grad_colors + idx * C + c, w * grgb, mask=valid)
    if SELECT_MAX:
        best = tl.argmax(tl.where(valid, wm, -float("inf")), axis=1, tie_break_left=True)
        chosen = k == best[:, None]
        for c in tl.static_range(D):
            gpt = tl.load(grad_point + r * D + c, mask=row_ok, other=0.0)[:, None]
            tl.store(grad_points + idx * D + c, tl.where(chosen, gpt, 0.0), mask=valid)
    else:
        for c in tl.static_range(D):
            gpt = tl.load(grad_point + r * D + c, mask=row_ok, other=0.0)[:, None]
            g += keep * gpt * tl.load(points + idx * D + c, mask=valid, other=0.0)
            tl.store(grad_points + idx * D + c, wm * gpt, mask=valid)
    # sum_{j>k} g_j w_j, exactly: scratch through grad_density, read back shifted by one sample
    tl.store(grad_density + idx, g * w, mask=valid)
    tl.debug_barrier()
    after = tl.cumsum(tl.load(grad_density + idx + 1, mask=valid & (k + 1 < K), other=0.0), axis=1, reverse=True)
    tl.debug_barrier()  # every lane has read its neighbour before any lane overwrites the scratch
    q = (1.0 - a) + tl.full((1, 1), 1e-10, w.dtype)
    ga = tl.load(grad_alphas + idx, mask=valid, other=0.0)
    tl.store(grad_density + idx, (g * trans - after / q + ga) * e, mask=valid)


def _blocks(K: int) -> tuple[int, int]:
    block_k = triton.next_power_of_2(K)
    return max(1, _TILE // block_k), block_k


def composite_fwd(density: torch.Tensor, colors: torch.Tensor, points: torch.Tensor, mask: torch.Tensor | None,
                  select_max: bool) -> tuple[torch.Tensor, ...]:
    """density ``[R, K]``, colors ``[R, K, C]``, points ``[R, K, D]``, bool mask ``[R, K]`` or None,
    all contiguous. Returns weights, alphas ``[R, K]``, rgb ``[R, C]``, point ``[R, D]``,
    opacity ``[R, 1]``."""
    R, K = density.shape
    C, D = colors.shape[-1], points.shape[-1]
    weights, alphas = torch.empty_like(density), torch.empty_like(density)
    rgb, point, opacity = density.new_empty(R, C), density.new_empty(R, D), density.new_empty(R, 1)
    if R:
        block_r, block_k = _blocks(K)
        with torch.cuda.device_of(density):
            _composite_fwd_kernel[(triton.cdiv(R, block_r),)](
                density, colors, points, density if mask is None else mask, weights, alphas, rgb, point, opacity,
                R, K, C=C, D=D, HAS_MASK=mask is not None, SELECT_MAX=select_max, BLOCK_R=block_r, BLOCK_K=block_k)
    return weights, alphas, rgb, point, opacity


def composite_bwd(grad_weights, grad_alphas, grad_rgb, grad_point, grad_opacity, density, colors, points, mask,
                  select_max: bool) -> tuple[torch.Tensor, ...]:
    """Gradients of density ``[R, K]``, colors ``[R, K, C]`` and points ``[R, K, D]`` (contiguous
    inputs shaped like :func:`composite_fwd`'s inputs and outputs)."""
    R, K = density.shape
    grad_density, grad_colors, grad_points = torch.empty_like(density), torch.empty_like(colors), torch.empty_like(points)
    if R:
        block_r, block_k = _blocks(K)
        with torch.cuda.device_of(density):
            _composite_bwd_kernel[(triton.cdiv(R, block_r),)](
                grad_weights, grad_alphas, grad_rgb, grad_point, grad_opacity, density, colors, points,
                density if mask is None else mask, grad_density, grad_colors, grad_points, R, K,
                C=colors.shape[-1], D=points.shape[-1], HAS_MASK=mask is not None, SELECT_MAX=select_max,
                BLOCK_R=block_r, BLOCK_K=block_k)
    return grad_density, grad_colors, grad_points
