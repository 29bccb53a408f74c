"""Ray samples of OmniMotion's orthographic camera: ``fastomni::stratified_sample`` (forward) and
``fastomni::stratified_sample_bwd`` (gradient w.r.t. the pixels), dispatched between the backends.

A pixel ``(x, y)`` gives the ray ``(x / (w-1) * 2 - 1, y / (h-1) * 2 - 1, z)``; its ``K`` depths are
``linspace(min_depth, max_depth, K)``, or (``det=False``) jittered uniformly inside the intervals
bounded by the midpoints (math in :mod:`fastomni.reference.stratified_sample`). The jitter is drawn
here, from ``generator``, so every backend gives the same samples for the same generator state.

Example::

    >>> import torch
    >>> from fastomni.ops.stratified_sample import stratified_sample
    >>> g = torch.Generator().manual_seed(0)
    >>> pts, depths = stratified_sample(torch.rand(8, 256, 2) * 63, 64, 64, 32, 0.0, 2.0, det=False, generator=g)
    >>> pts.shape, depths.shape
    (torch.Size([8, 256, 32, 3]), torch.Size([8, 256, 32, 1]))
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastomni._nvtx import annotate
from fastomni.ops import _checks, _registry
from fastomni.reference import stratified_sample as ref

__all__ = ["stratified_sample"]

OP = "stratified_sample"

_CHECKS = _checks.register_backends(OP)


def _fwd(backend, px, noise, h, w, num_samples, min_depth, max_depth):
    if backend == "reference":
        pts, depths = ref.stratified_sample(px, h, w, num_samples, min_depth, max_depth, noise)
        return pts.contiguous(), depths.contiguous()
    _checks.require(OP, _CHECKS, backend)
    args = (px, noise, h, w, num_samples, min_depth, max_depth)
    if backend == "cpu":
        return torch.ops.fastomni_cpu.stratified_sample_fwd(*args)
    if backend == "cuda":
        return torch.ops.fastomni_cuda.stratified_sample_fwd(*args)
    from fastomni.kernels import stratified_sample as kernels

    return kernels.stratified_sample_fwd(*args)


def _bwd(backend, grad_points, h, w):
    if backend == "reference":
        return ref.stratified_sample_bwd_ref(grad_points, h, w)
    _checks.require(OP, _CHECKS, backend)
    if backend == "cpu":
        return torch.ops.fastomni_cpu.stratified_sample_bwd(grad_points, h, w)
    if backend == "cuda":
        return torch.ops.fastomni_cuda.stratified_sample_bwd(grad_points, h, w)
    from fastomni.kernels import stratified_sample as kernels

    return kernels.stratified_sample_bwd(grad_points, h, w)


@torch.library.custom_op("fastomni::stratified_sample", mutates_args=())
def stratified_sample_op(px: Tensor, noise: Tensor | None, h: int, w: int, num_samples: int, min_depth: float,
                         max_depth: float, backend: str) -> tuple[Tensor, Tensor]:
    """Flat, contiguous form: px ``[R, 2]``, noise ``[R, K]`` or None. Returns points ``[R, K, 3]``
    and depths ``[R, K, 1]``."""
    with annotate(f"{OP}.fwd"):
        return tuple(_fwd(backend, px, noise, h, w, num_samples, min_depth, max_depth))


@stratified_sample_op.register_fake
def _(px, noise, h, w, num_samples, min_depth, max_depth, backend):
    return px.new_empty(px.shape[0], num_samples, 3), px.new_empty(px.shape[0], num_samples, 1)


@torch.library.custom_op("fastomni::stratified_sample_bwd", mutates_args=())
def stratified_sample_bwd_op(grad_points: Tensor, h: int, w: int, backend: str) -> Tensor:
    """Gradient w.r.t. px ``[R, 2]`` from grad_points ``[R, K, 3]``."""
    with annotate(f"{OP}.bwd"):
        return _bwd(backend, grad_points, h, w)


@stratified_sample_bwd_op.register_fake
def _(grad_points, h, w, backend):
    return grad_points.new_empty(grad_points.shape[0], 2)


def _setup_context(ctx, inputs, output):
    ctx.h, ctx.w, ctx.backend = inputs[2], inputs[3], inputs[-1]


def _backward(ctx, grad_points, grad_depths):
    # the depths depend on the noise alone, so grad_depths reaches nothing
    grad_px = stratified_sample_bwd_op(grad_points.contiguous(), ctx.h, ctx.w, ctx.backend)
    return grad_px, None, None, None, None, None, None, None


stratified_sample_op.register_autograd(_backward, setup_context=_setup_context)


def stratified_sample(px: Tensor, h: int, w: int, num_samples: int, min_depth: float, max_depth: float, *,
                      det: bool = True, generator: torch.Generator | None = None,
                      noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Samples on the rays of pixels ``px [..., 2]`` (float32/float64) of an ``h x w`` frame.

    ``det=False`` jitters the depths with ``noise = torch.rand([..., K], generator=generator)``;
    an explicit ``noise [..., K]`` in [0, 1) is used as given. Returns ``(points [..., K, 3],
    depths [..., K, 1])``; gradients flow to ``px`` (the noise is a sample, not differentiable).
    """
    if not px.is_floating_point() or px.dim() < 1 or px.shape[-1] != 2:
        raise ValueError(f"px must be a floating tensor [..., 2], got {px.dtype} {tuple(px.shape)}")
    if h < 2 or w < 2 or num_samples < 1:
        raise ValueError(f"need h, w >= 2 and num_samples >= 1, got h={h}, w={w}, num_samples={num_samples}")
    lead = px.shape[:-1]
    if noise is None and not det:
        noise = torch.rand(*lead, num_samples, generator=generator, dtype=px.dtype, device=px.device)
    if noise is not None:
        if noise.shape != (*lead, num_samples) or noise.dtype != px.dtype:
            raise ValueError(f"noise must be {px.dtype} of shape {(*lead, num_samples)}, got {noise.dtype} "
                             f"{tuple(noise.shape)}")
        if noise.requires_grad:
            raise ValueError("noise requires grad, but the samples are not differentiable w.r.t. it")
    backend = _registry.select(OP, *(t for t in (px, noise) if t is not None))
    if backend == "reference":
        return ref.stratified_sample(px, h, w, num_samples, min_depth, max_depth, noise)
    flat_noise = None if noise is None else noise.reshape(-1, num_samples).contiguous()
    pts, depths = stratified_sample_op(px.reshape(-1, 2).contiguous(), flat_noise, h, w, num_samples,
                                       float(min_depth), float(max_depth), backend)
    return pts.reshape(*lead, num_samples, 3), depths.reshape(*lead, num_samples, 1)
