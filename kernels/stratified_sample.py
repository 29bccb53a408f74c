"""Triton kernels of ``stratified_sample`` (spec: :mod:`fastomni.reference.stratified_sample`).

Tiling: a program takes ``BLOCK_R`` rays x ``BLOCK_K`` samples (``BLOCK_K`` = K rounded up to a
power of two, ``BLOCK_R * BLOCK_K`` = 1024 elements, 4 warps, registers only). The depth grid
(the float32 ``linspace`` cast to the pixels' dtype, or the interval bounds ``lower`` and ``upper -
lower`` when jittering) is computed once on the host by the reference's own functions (K values) and
read from cache, so every backend uses the same depths.

Bytes per ray of K samples (s = element size): forward reads ``2 s`` (+ ``K s`` of noise), writes
``4 K s`` (points and depths); backward reads ``3 K s`` of gradient, writes ``2 s``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastomni.reference.stratified_sample import depth_bounds, depth_grid

__all__ = ["stratified_sample_bwd", "stratified_sample_fwd"]

_TILE = 1024  # elements per program: BLOCK_R * BLOCK_K


@triton.jit
def _stratified_fwd_kernel(px, noise, base, width, points, depths, R, K, sx, sy, JITTER: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    row_ok = rows < R
    valid = row_ok[:, None] & (k < K)[None, :]
    x = tl.load(px + rows * 2, mask=row_ok, other=0.0)
    y = tl.load(px + rows * 2 + 1, mask=row_ok, other=0.0)
    xn = x / sx * 2.0 - 1.0
    yn = y / sy * 2.0 - 1.0
    d = tl.load(base + k, mask=k < K, other=0.0)[None, :]
    if JITTER:
        u = tl.load(noise + rows[:, None] * K + k[None, :], mask=valid, other=0.0)
        d = d + tl.load(width + k, mask=k < K, other=0.0)[None, :] * u
    idx = rows[:, None] * K + k[None, :]
    d = tl.broadcast_to(d, (BLOCK_R, BLOCK_K))
    tl.store(points + idx * 3, tl.broadcast_to(xn[:, None], (BLOCK_R, BLOCK_K)), mask=valid)
    tl.store(points + idx * 3 + 1, tl.broadcast_to(yn[:, None], (BLOCK_R, BLOCK_K)), mask=valid)
    tl.store(points + idx * 3 + 2, d, mask=valid)
    tl.store(depths + idx, d, mask=valid)


@triton.jit
def _stratified_bwd_kernel(grad_points, grad_px, R, K, sx, sy, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    row_ok = rows < R
    valid = row_ok[:, None] & (k < K)[None, :]
    idx = (rows[:, None] * K + k[None, :]) * 3
    gx = tl.sum(tl.load(grad_points + idx, mask=valid, other=0.0), axis=1)
    gy = tl.sum(tl.load(grad_points + idx + 1, mask=valid, other=0.0), axis=1)
    tl.store(grad_px + rows * 2, gx * 2.0 / sx, mask=row_ok)
    tl.store(grad_px + rows * 2 + 1, gy * 2.0 / sy, mask=row_ok)


def _blocks(K: int) -> tuple[int, int]:
    block_k = triton.next_power_of_2(K)
    return max(1, _TILE // block_k), block_k


def stratified_sample_fwd(px: torch.Tensor, noise: torch.Tensor | None, h: int, w: int, num_samples: int,
                          min_depth: float, max_depth: float) -> tuple[torch.Tensor, torch.Tensor]:
    """px ``[R, 2]``, noise ``[R, K]`` or None (contiguous). Returns points ``[R, K, 3]`` and depths
    ``[R, K, 1]``."""
    R, K = px.shape[0], num_samples
    points, depths = px.new_empty(R, K, 3), px.new_empty(R, K, 1)
    # the reference's own grid (K values): the linspace, or the interval bounds when jittering
    if noise is None:
        base = width = depth_grid(K, min_depth, max_depth, px.dtype, px.device)
    else:
        base, upper = depth_bounds(K, min_depth, max_depth, px.dtype, px.device)
        width = upper - base
    if R:
        block_r, block_k = _blocks(K)
        # the scales w - 1, h - 1 go as ints: a Python float argument is typed fp32 in a compiled kernel
        with torch.cuda.device_of(px):
            _stratified_fwd_kernel[(triton.cdiv(R, block_r),)](
                px, base if noise is None else noise, base, width, points, depths, R, K, w - 1, h - 1,
                JITTER=noise is not None, BLOCK_R=block_r, BLOCK_K=block_k)
    return points, depths


def stratified_sample_bwd(grad_points: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """grad_points ``[R, K, 3]`` (contiguous) -> grad_px ``[R, 2]``."""
    R, K = grad_points.shape[:2]
    grad_px = grad_points.new_empty(R, 2)
    if R:
        block_r, block_k = _blocks(K)
        with torch.cuda.device_of(grad_points):
            _stratified_bwd_kernel[(triton.cdiv(R, block_r),)](
                grad_points, grad_px, R, K, w - 1, h - 1, BLOCK_R=block_r, BLOCK_K=block_k)
    return grad_px
