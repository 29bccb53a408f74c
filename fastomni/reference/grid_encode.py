"""Reference (pure PyTorch) multiresolution grid encoding, Instant-NGP style: the spec.

A grid of ``L`` levels over ``[0, 1]^D`` (``D`` = 1..4). Level ``l`` has ``R_{l,d}`` cells along
axis ``d`` (vertices ``0..R_{l,d}``) and owns rows ``offsets[l] : offsets[l+1]`` of the feature
table ``[S, F]``. A point ``x`` (clamped to ``[0, 1]``) has position ``p_d = x_d R_{l,d}``, cell
``c_d = min(floor(p_d), R_{l,d} - 1)`` and fraction ``f_d = p_d - c_d``. Its level-``l`` feature is
the D-linear interpolation of the ``2^D`` corners ``v = c + b``, ``b in {0, 1}^D``::

    feat_l(x) = sum_b w_b table[offsets[l] + index_l(c + b)],   w_b = prod_d (f_d if b_d else 1 - f_d)

``index_l`` is dense (``v_0 + V_0 (v_1 + V_1 (v_2 + ...))``, ``V_d = R_{l,d} + 1``) when the level's
vertices fit its rows (``prod_d V_d <= size_l``), else the spatial hash
``(xor_d (v_d * PRIMES[d] mod 2^32)) mod size_l``. The output ``[N, L F]`` is level-major.

Backward (:func:`grid_encode_bwd_ref`), for ``g_l = grad_out[:, lF:(l+1)F]``::

    d table[offsets[l] + index_l(c + b)] += w_b g_l                 (scatter-add)
    d x_d += sum_l sum_b <g_l, feat_b> R_{l,d} (+1 if b_d else -1) prod_{e != d} w_{b,e}

and ``d x_d = 0`` where ``x_d`` was clamped (outside ``[0, 1]``).

Example::

    >>> import torch
    >>> res, off = grid_levels(dim=2, num_levels=3, base_resolution=4, max_resolution=16, log2_table_size=8)
    >>> res, off
    ([(4, 4), (8, 8), (16, 16)], [0, 25, 106, 362])
    >>> grid_encode(torch.rand(5, 2), torch.randn(off[-1], 2), res, off).shape
    torch.Size([5, 6])
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["PRIMES", "corner_weights", "grid_encode", "grid_encode_bwd_ref", "grid_indices", "grid_levels"]

PRIMES = (1, 2654435761, 805459861, 3674653429)
_MASK32 = 0xFFFFFFFF


def grid_levels(dim: int, num_levels: int, base_resolution: int | Sequence[int], max_resolution: int | Sequence[int],
                log2_table_size: int) -> tuple[list[tuple[int, ...]], list[int]]:
    """Resolutions growing geometrically from ``base_resolution`` to ``max_resolution`` (per axis,
    or one value for all), and row offsets: level ``l`` gets ``min(prod_d (R_{l,d} + 1), 2^log2_table_size)``
    rows. Returns ``(resolutions [L][D], offsets [L + 1])``."""
    base = [base_resolution] * dim if isinstance(base_resolution, int) else list(base_resolution)
    top = [max_resolution] * dim if isinstance(max_resolution, int) else list(max_resolution)
    if len(base) != dim or len(top) != dim or min(base) < 1 or any(t < b for b, t in zip(base, top)):
        raise ValueError(f"need {dim} resolutions with 1 <= base <= max, got base {base}, max {top}")
    if not 1 <= dim <= 4 or num_levels < 1 or not 1 <= log2_table_size <= 30:
        raise ValueError(f"need dim in 1..4, num_levels >= 1, log2_table_size in 1..30; got {dim}, {num_levels}, "
                         f"{log2_table_size}")
    resolutions, offsets = [], [0]
    for l in range(num_levels):
        frac = l / (num_levels - 1) if num_levels > 1 else 0.0
        res = tuple(int(round(b * (t / b) ** frac)) for b, t in zip(base, top))
        resolutions.append(res)
        offsets.append(offsets[-1] + min(math.prod(r + 1 for r in res), 2 ** log2_table_size))
    return resolutions, offsets


def _corner_bits(dim: int, device) -> Tensor:
    """``[2^D, D]`` int64: corner ``b`` has bit ``d`` = ``(b >> d) & 1``."""
    return torch.tensor([[(b >> d) & 1 for d in range(dim)] for b in range(2 ** dim)], dtype=torch.long, device=device)


def grid_indices(vertices: Tensor, res: Sequence[int], size: int) -> Tensor:
    """Row (within its level) of integer vertices ``[..., D]`` of a level of resolution ``res``
    with ``size`` rows: dense when every vertex fits, hashed otherwise."""
    dims = [r + 1 for r in res]
    if math.prod(dims) <= size:
        idx = torch.zeros_like(vertices[..., 0])
        for d in reversed(range(len(res))):
            idx = idx * dims[d] + vertices[..., d]
        return idx
    h = torch.zeros_like(vertices[..., 0])
    for d in range(len(res)):
        h = h ^ ((vertices[..., d] * PRIMES[d]) & _MASK32)
    return h % size


def corner_weights(x: Tensor, res: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """For points ``x [N, D]`` at one level: ``(cells [N, D] int64, fractions [N, D], inside [N, D] bool)``,
    ``inside`` False where ``x`` was clamped to ``[0, 1]``."""
    r = torch.tensor(res, dtype=x.dtype, device=x.device)
    inside = (x >= 0) & (x <= 1)
    p = x.clamp(0, 1) * r
    cell = torch.minimum(p.floor(), r - 1)
    return cell.long(), p - cell, inside


def _check(x: Tensor, table: Tensor, resolutions, offsets) -> None:
    if x.dim() != 2 or not 1 <= x.shape[1] <= 4:
        raise ValueError(f"x must be [N, D] with D in 1..4, got {tuple(x.shape)}")
    if table.dim() != 2:
        raise ValueError(f"table must be [S, F], got {tuple(table.shape)}")
    if len(offsets) != len(resolutions) + 1 or offsets[0] != 0 or offsets[-1] != table.shape[0]:
        raise ValueError(f"offsets must be [0, ..., {table.shape[0]}] with {len(resolutions) + 1} entries, got {list(offsets)}")
    if any(b <= a for a, b in zip(offsets[:-1], offsets[1:])):
        raise ValueError(f"offsets must be strictly increasing (every level needs >= 1 row), got {list(offsets)}")
    for res in resolutions:
        if len(res) != x.shape[1] or min(res) < 1:
            raise ValueError(f"every level needs {x.shape[1]} resolutions >= 1, got {list(res)}")


def grid_encode(x: Tensor, table: Tensor, resolutions: Sequence[Sequence[int]], offsets: Sequence[int]) -> Tensor:
    """Encode points ``x [N, D]`` in ``[0, 1]^D`` with the grid ``table [S, F]`` (levels
    ``resolutions [L][D]``, rows ``offsets [L + 1]``). Returns ``[N, L F]`` (level-major).
    Differentiable w.r.t. ``x`` and ``table`` through autograd."""
    _check(x, table, resolutions, offsets)
    bits = _corner_bits(x.shape[1], x.device)
    out = []
    for l, res in enumerate(resolutions):
        cell, frac, inside = corner_weights(x, res)
        frac = torch.where(inside, frac, frac.detach())
        w = torch.where(bits.bool(), frac[:, None, :], 1 - frac[:, None, :]).prod(-1)       # [N, C]
        rows = offsets[l] + grid_indices(cell[:, None, :] + bits, res, offsets[l + 1] - offsets[l])
        out.append((w[..., None] * table[rows]).sum(1))                                    # [N, F]
    return torch.cat(out, dim=-1) if out else x.new_zeros(x.shape[0], 0)


def grid_encode_bwd_ref(grad_out: Tensor, x: Tensor, table: Tensor, resolutions: Sequence[Sequence[int]],
                        offsets: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Explicit backward of :func:`grid_encode`: ``grad_out [N, L F]`` -> ``(grad_x [N, D],
    grad_table [S, F])`` (see the module docstring for the math)."""
    _check(x, table, resolutions, offsets)
    n, dim = x.shape
    feats = table.shape[1]
    bits = _corner_bits(dim, x.device)
    grad_x = torch.zeros_like(x)
    grad_table = torch.zeros_like(table)
    for l, res in enumerate(resolutions):
        g = grad_out[:, l * feats:(l + 1) * feats]                                          # [N, F]
        cell, frac, inside = corner_weights(x, res)
        lin = torch.where(bits.bool(), frac[:, None, :], 1 - frac[:, None, :])              # [N, C, D]
        w = lin.prod(-1)
        rows = offsets[l] + grid_indices(cell[:, None, :] + bits, res, offsets[l + 1] - offsets[l])
        grad_table.index_add_(0, rows.reshape(-1), (w[..., None] * g[:, None, :]).reshape(-1, feats))
        dot = (table[rows] * g[:, None, :]).sum(-1)                                         # [N, C]
        r = torch.tensor(res, dtype=x.dtype, device=x.device)
        sign = bits.to(x.dtype) * 2 - 1                                                     # [C, D]
        for d in range(dim):
            others = torch.cat([lin[..., :d], lin[..., d + 1:]], dim=-1).prod(-1)          # [N, C]
            grad_x[:, d] += (dot * others * sign[:, d]).sum(-1) * r[d]
    return grad_x * (x >= 0) * (x <= 1), grad_table
