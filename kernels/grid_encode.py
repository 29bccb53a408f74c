"""Triton kernels of ``grid_encode`` (spec: :mod:`fastomni.reference.grid_encode`).

Tiling: a program takes ``BLOCK_N`` points and loops over the ``L`` levels (a runtime loop), so the
coordinate gradient of a point is summed in registers, without atomics. A point's axes are a
``[BLOCK_N, 4]`` tile (``D`` padded to 4: padded axes have resolution 1, cell 0, fraction 0, stride 0,
so they add nothing to the weight product, the dense index or the hash); the ``2^D`` corners are a
``tl.static_range`` loop whose corner bits are compile-time constants. Per corner: the weight is a
product reduction of the tile, the dense row a sum, the hash an xor reduction of
``v_d * PRIMES[d]`` (int64, exact) reduced mod ``2^32`` and mod the level's rows, as the reference
does. The level table (``[L, 12]`` int64: row offset, rows, dense flag, resolutions, dense strides;
the layout of ``csrc/grid_encode_levels.h``) is built on the host and read with scalar loads.

Backward: the table gradient is scattered with ``tl.atomic_add(sem="relaxed")``: on a GPU the
``N L 2^D`` scattered rows collide rarely in the hashed levels and the coarse levels' contention is
what Instant-NGP also accepts; sorting the pairs by row would cost a radix sort of ``N L 2^D`` keys
per step. The float sum order, hence the last bits of ``grad_table``, is therefore not deterministic.

Bytes per point and level (s = element size, F features): forward reads ``D s`` + ``2^D F s``
(gathered rows), writes ``F s``; backward reads ``(D + F) s + 2^D F s`` and adds ``2^D F s`` atomically.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastomni.reference.grid_encode import PRIMES

__all__ = ["grid_encode_bwd", "grid_encode_fwd", "level_table"]

LEVEL_INFO = 12  # int64 values per level (csrc/grid_encode_levels.h)
# points per program; the interpreter (TRITON_INTERPRET=1) runs programs one after another, each op
# vectorized over its block, so it gets one large block instead of many small ones
_BLOCK_N = 1024 if os.environ.get("TRITON_INTERPRET") == "1" else 64


def level_table(resolutions: list[int], offsets: list[int], dim: int) -> list[int]:
    """The ``[L * 12]`` level table of ``csrc/grid_encode_levels.h`` (host side, plain ints)."""
    info = []
    for l in range(len(offsets) - 1):
        res = resolutions[l * dim:(l + 1) * dim]
        size = offsets[l + 1] - offsets[l]
        strides, stride = [], 1
        for r in res:
            strides.append(stride)
            stride *= r + 1
        dense = stride <= size
        pad = [0] * (4 - dim)
        info += [offsets[l], size, int(dense), 0, *res, *pad, *(strides if dense else [0] * dim), *pad]
    return info


@triton.jit
def _prod(t, col, D: tl.constexpr):
    """``prod_{d < D} t[:, d]`` of a ``[BLOCK_N, 4]`` tile. Columns are taken by masked sums (plain
    reductions, which the interpreter runs vectorized, unlike a custom-combine ``tl.reduce``)."""
    w = tl.sum(tl.where(col == 0, t, 0.0), axis=1)
    for d in tl.static_range(1, D):
        w = w * tl.sum(tl.where(col == d, t, 0.0), axis=1)
    return w


@triton.jit
def _locate(x, n, ok, lv, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Axes of ``BLOCK_N`` points at one level: ``(cell [BLOCK_N, 4] int64, frac, r, inside, col)``."""
    col = tl.arange(0, 4)[None, :]
    in_dim = col < D
    xv = tl.load(x + n[:, None] * D + col, mask=ok[:, None] & in_dim, other=0.0)
    r = tl.where(in_dim, tl.load(lv + 4 + col, mask=in_dim, other=1), 1).to(xv.dtype)
    inside = (xv >= 0.0) & (xv <= 1.0)
    p = tl.minimum(tl.maximum(xv, 0.0), 1.0) * r
    c = tl.minimum(tl.floor(p), r - 1.0)
    return c.to(tl.int64), p - c, r, inside, col


@triton.jit
def _corner(cell, frac, col, lv, primes, D: tl.constexpr, B: tl.constexpr):
    """Row of corner ``B`` (bit d = axis d takes ``cell + 1``), its weight, and its ``[BLOCK_N, 4]`` linear
    factors."""
    bit = ((B >> col) & 1) == 1
    v = cell + bit.to(tl.int64)
    lin = tl.where(bit, frac, 1.0 - frac)
    stride = tl.load(lv + 8 + col)
    prime = tl.load(primes + col)
    dense_row = tl.sum(v * stride, axis=1)
    hv = v * prime
    h = tl.sum(tl.where(col == 0, hv, 0), axis=1)
    for d in tl.static_range(1, D):
        h = h ^ tl.sum(tl.where(col == d, hv, 0), axis=1)
    h = h - ((h >> 32) << 32)  # mod 2^32 (h >= 0)
    row = tl.where(tl.load(lv + 2) != 0, dense_row, h % tl.load(lv + 1))
    return tl.load(lv) + row, _prod(lin, col, D), lin


@triton.jit
def _grid_fwd_kernel(x, table, levels, primes, out, N, L, D: tl.constexpr, F: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr):
    n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    ok = n < N
    f = tl.arange(0, BLOCK_F)[None, :]
    fmask = ok[:, None] & (f < F)
    for l in range(L):
        lv = levels + l * 12
        cell, frac, r, inside, col = _locate(x, n, ok, lv, D, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_F), dtype=frac.dtype)
        for B in tl.static_range(2 ** D):
            row, w, lin = _corner(cell, frac, col, lv, primes, D, B)
            acc += w[:, None] * tl.load(table + row[:, None] * F + f, mask=fmask, other=0.0)
        tl.store(out + n[:, None] * (L * F) + l * F + f, acc, mask=fmask)


@triton.jit
def _grid_bwd_kernel(grad_out, x, table, levels, primes, grad_x, grad_table, N, L, D: tl.constexpr,
                     F: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr):
    n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    ok = n < N
    f = tl.arange(0, BLOCK_F)[None, :]
    fmask = ok[:, None] & (f < F)
    gx = tl.zeros((BLOCK_N, 4), dtype=grad_x.dtype.element_ty)
    inside = gx == 0.0
    col = tl.arange(0, 4)[None, :]
    for l in range(L):
        lv = levels + l * 12
        cell, frac, r, inside, col = _locate(x, n, ok, lv, D, BLOCK_N)
        g = tl.load(grad_out + n[:, None] * (L * F) + l * F + f, mask=fmask, other=0.0)
        gl = tl.zeros((BLOCK_N, 4), dtype=frac.dtype)
        for B in tl.static_range(2 ** D):
            row, w, lin = _corner(cell, frac, col, lv, primes, D, B)
            ptr = row[:, None] * F + f
            tl.atomic_add(grad_table + ptr, w[:, None] * g, mask=fmask, sem="relaxed")
            dot = tl.sum(tl.load(table + ptr, mask=fmask, other=0.0) * g, axis=1)
            sign = tl.where(((B >> col) & 1) == 1, 1.0, -1.0)
            for d in tl.static_range(D):
                others = _prod(tl.where(col == d, 1.0, lin), col, D)
                gl += tl.where(col == d, (dot * others)[:, None] * sign, 0.0)
        gx += gl * r
    tl.store(grad_x + n[:, None] * D + col, tl.where(inside, gx, 0.0), mask=ok[:, None] & (col < D))


def _tables(x: torch.Tensor, resolutions: list[int], offsets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    levels = torch.tensor(level_table(resolutions, offsets, x.shape[1]), dtype=torch.int64, device=x.device)
    return levels, torch.tensor(PRIMES, dtype=torch.int64, device=x.device)


def grid_encode_fwd(x: torch.Tensor, table: torch.Tensor, resolutions: list[int], offsets: list[int]) -> torch.Tensor:
    """x ``[N, D]``, table ``[S, F]`` (contiguous, one dtype), resolutions ``[L * D]``, offsets ``[L + 1]``
    -> ``[N, L F]``."""
    N, D = x.shape
    F, L = table.shape[1], len(offsets) - 1
    out = x.new_empty(N, L * F)
    if N and L and F:
        levels, primes = _tables(x, resolutions, offsets)
        with torch.cuda.device_of(x):
            _grid_fwd_kernel[(triton.cdiv(N, _BLOCK_N),)](x, table, levels, primes, out, N, L, D=D, F=F,
                                                           BLOCK_N=_BLOCK_N, BLOCK_F=triton.next_power_of_2(F))
    return out


def grid_encode_bwd(grad_out: torch.Tensor, x: torch.Tensor, table: torch.Tensor, resolutions: list[int],
                    offsets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_out ``[N, L F]`` -> ``(grad_x [N, D], grad_table [S, F])``."""
    N, D = x.shape
    F, L = table.shape[1], len(offsets) - 1
    grad_x, grad_table = torch.zeros_like(x), torch.zeros_like(table)
    if N and L and F:
        levels, primes = _tables(x, resolutions, offsets)
        with torch.cuda.device_of(x):
            _grid_bwd_kernel[(triton.cdiv(N, _BLOCK_N),)](grad_out, x, table, levels, primes, grad_x, grad_table,
                                                           N, L, D=D, F=F, BLOCK_N=_BLOCK_N,
                                                           BLOCK_F=triton.next_power_of_2(F))
    return grad_x, grad_table
