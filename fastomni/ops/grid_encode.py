"""Multiresolution grid encoding (Instant-NGP style): ``fastomni::grid_encode`` (forward) and
``fastomni::grid_encode_bwd`` (its explicit backward, gradients of the points *and* of the table),
dispatched between the backends.

A point ``x [D]`` in ``[0, 1]^D`` (``D`` = 1..4, clamped) gets, per level ``l`` of resolution
``R_l [D]``, the D-linear interpolation of the features of its cell's ``2^D`` corners, read from rows
``offsets[l] : offsets[l+1]`` of ``table [S, F]`` (dense index for coarse levels, the xor-prime
hash for fine ones; math and backward in :mod:`fastomni.reference.grid_encode`)::

    out[:, l F:(l+1) F] = sum_b w_b(x) table[offsets[l] + index_l(cell_l(x) + b)]

The coordinate gradient is returned too (a coupling layer's conditioner sees coordinates that depend
on earlier layers); it is zero along an axis where ``x`` was clamped.

Example::

    >>> import torch
    >>> from fastomni.ops.grid_encode import grid_encode
    >>> from fastomni.reference.grid_encode import grid_levels
    >>> res, off = grid_levels(dim=3, num_levels=8, base_resolution=8, max_resolution=256, log2_table_size=14)
    >>> table = (torch.rand(off[-1], 2) * 2e-4 - 1e-4).requires_grad_()
    >>> x = torch.rand(1000, 3, requires_grad=True)
    >>> out = grid_encode(x, table, res, off)
    >>> out.shape
    torch.Size([1000, 16])
    >>> out.square().sum().backward()
    >>> x.grad.shape, table.grad.shape
    (torch.Size([1000, 3]), torch.Size([97560, 2]))
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from fastomni._nvtx import annotate
from fastomni.ops import _checks, _registry
from fastomni.reference import grid_encode as ref

__all__ = ["grid_encode", "grid_encode_op"]

OP = "grid_encode"

_CHECKS = _checks.register_backends(OP)


def _levels(resolutions: list[int], offsets: list[int], dim: int) -> list[tuple[int, ...]]:
    return [tuple(resolutions[l * dim:(l + 1) * dim]) for l in range(len(offsets) - 1)]


def _fwd(backend, x, table, resolutions, offsets):
    if backend == "reference":
        return ref.grid_encode(x, table, _levels(resolutions, offsets, x.shape[1]), offsets).contiguous()
    _checks.require(OP, _CHECKS, backend)
    if backend == "cpu":
        return torch.ops.fastomni_cpu.grid_encode_fwd(x, table, resolutions, offsets)
    if backend == "cuda":
        return torch.ops.fastomni_cuda.grid_encode_fwd(x, table, resolutions, offsets)
    from fastomni.kernels import grid_encode as kernels

    return kernels.grid_encode_fwd(x, table, resolutions, offsets)


def _bwd(backend, grad_out, x, table, resolutions, offsets):
    if backend == "reference":
        return ref.grid_encode_bwd_ref(grad_out, x, table, _levels(resolutions, offsets, x.shape[1]), offsets)
    _checks.require(OP, _CHECKS, backend)
    if backend == "cpu":
        return torch.ops.fastomni_cpu.grid_encode_bwd(grad_out, x, table, resolutions, offsets)
    if backend == "cuda":
        return torch.ops.fastomni_cuda.grid_encode_bwd(grad_out, x, table, resolutions, offsets)
    from fastomni.kernels import grid_encode as kernels

    return kernels.grid_encode_bwd(grad_out, x, table, resolutions, offsets)


@torch.library.custom_op("fastomni::grid_encode", mutates_args=())
def grid_encode_op(x: Tensor, table: Tensor, resolutions: list[int], offsets: list[int], backend: str) -> Tensor:
    """Flat, contiguous form: x ``[N, D]``, table ``[S, F]``, resolutions ``[L * D]`` (level-major),
    offsets ``[L + 1]``. Returns ``[N, L F]``."""
    with annotate(f"{OP}.fwd"):
        return _fwd(backend, x, table, resolutions, offsets)


@grid_encode_op.register_fake
def _(x, table, resolutions, offsets, backend):
    return x.new_empty(x.shape[0], (len(offsets) - 1) * table.shape[1])


@torch.library.custom_op("fastomni::grid_encode_bwd", mutates_args=())
def grid_encode_bwd_op(grad_out: Tensor, x: Tensor, table: Tensor, resolutions: list[int], offsets: list[int],
                       backend: str) -> tuple[Tensor, Tensor]:
    """Backward of :func:`grid_encode_op`: ``(grad_x [N, D], grad_table [S, F])``."""
    with annotate(f"{OP}.bwd"):
        return tuple(_bwd(backend, grad_out, x, table, resolutions, offsets))


@grid_encode_bwd_op.register_fake
def _(grad_out, x, table, resolutions, offsets, backend):
    return torch.empty_like(x), torch.empty_like(table)


def _setup_context(ctx, inputs, output):
    x, table, resolutions, offsets, backend = inputs
    ctx.save_for_backward(x, table)
    ctx.resolutions, ctx.offsets, ctx.backend = resolutions, offsets, backend


def _backward(ctx, grad_out):
    x, table = ctx.saved_tensors
    grad_x, grad_table = grid_encode_bwd_op(grad_out.contiguous(), x, table, ctx.resolutions, ctx.offsets,
                                            ctx.backend)
    return grad_x, grad_table, None, None, None


grid_encode_op.register_autograd(_backward, setup_context=_setup_context)


def _validate(x: Tensor, table: Tensor, resolutions: Sequence[Sequence[int]], offsets: Sequence[int]) -> None:
    for name, t in (("x", x), ("table", table)):
        if t.dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    if table.dtype != x.dtype:
        raise TypeError(f"table dtype {table.dtype} differs from x dtype {x.dtype}")
    if table.device != x.device:
        raise ValueError(f"table is on {table.device}, x on {x.device}")
    ref._check(x, table, resolutions, offsets)
    # a data-dependent check: skipped while torch.compile traces (it would break the graph)
    if not torch.compiler.is_compiling() and bool(torch.isnan(x).any()):
        raise ValueError("x contains NaN (a NaN point has no grid cell)")


def grid_encode(x: Tensor, table: Tensor, resolutions: Sequence[Sequence[int]], offsets: Sequence[int]) -> Tensor:
    """Encode points ``x [N, D]`` (float32/float64, ``D`` = 1..4, clamped to ``[0, 1]``) with the
    feature grid ``table [S, F]`` (same dtype) of levels ``resolutions [L][D]`` and row offsets
    ``offsets [L + 1]`` (``offsets[0] = 0``, ``offsets[-1] = S``; :func:`~fastomni.reference.grid_encode.grid_levels`
    makes both). Returns ``[N, L F]``, level-major. Differentiable w.r.t. ``x`` and ``table``.
    """
    _validate(x, table, resolutions, offsets)
    backend = _registry.select(OP, x, table)
    if backend == "reference":
        return ref.grid_encode(x, table, resolutions, offsets)
    flat = [int(r) for res in resolutions for r in res]
    return grid_encode_op(x.contiguous(), table.contiguous(), flat, [int(o) for o in offsets], backend)
