"""Alpha compositing of ray samples: ``fastomni::composite`` (forward) and
``fastomni::composite_bwd`` (its explicit backward), dispatched between the backends.

For densities ``sigma [..., K]`` (math and backward in :mod:`fastomni.reference.composite`)::

    alpha_k = 1 - exp(-sigma_k),  T_k = prod_{l<k} (1 - alpha_l + 1e-10),  w_k = alpha_k T_k
    rgb = sum_k w_k c_k,  point = sum_k w_k m_k p_k (or p at argmax_k w_k m_k),  opacity = sum_k w_k m_k

One call serves each use in OmniMotion: training (weights for the distortion loss, rgb from the
unmasked weights, the correspondence from the weights masked to the depth range), inference
(``select_max``: the max-weight sample) and the occlusion score (``mask``: samples in front of the
predicted depth; the score is ``opacity``).

Example::

    >>> import torch
    >>> from fastomni.ops.composite import composite
    >>> out = composite(torch.rand(4, 8, 32), colors=torch.rand(4, 8, 32, 3), points=torch.rand(4, 8, 32, 3))
    >>> out.weights.shape, out.rgb.shape, out.point.shape, out.opacity.shape
    (torch.Size([4, 8, 32]), torch.Size([4, 8, 3]), torch.Size([4, 8, 3]), torch.Size([4, 8, 1]))
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastomni._nvtx import annotate
from fastomni.ops import _checks, _registry
from fastomni.reference import composite as ref

__all__ = ["Composite", "composite"]

OP = "composite"


class Composite(NamedTuple):
    """Outputs of :func:`composite` for rays ``[...]`` of ``K`` samples."""

    weights: Tensor  #: ``[..., K]`` blending weights ``alpha_k T_k`` (unmasked)
    alphas: Tensor  #: ``[..., K]``
    rgb: Tensor  #: ``[..., C]`` ``sum_k w_k c_k``
    point: Tensor  #: ``[..., D]`` ``sum_k w_k m_k p_k``, or the masked max-weight ``p_k``
    opacity: Tensor  #: ``[..., 1]`` ``sum_k w_k m_k``


_CHECKS = _checks.register_backends(OP)


def _fwd(backend, density, colors, points, mask, select_max):
    if backend == "reference":
        return tuple(t.contiguous() for t in ref.composite(density, colors, points, mask, select_max))
    _checks.require(OP, _CHECKS, backend)
    if backend == "cpu":
        return torch.ops.fastomni_cpu.composite_fwd(density, colors, points, mask, select_max)
    if backend == "cuda":
        return torch.ops.fastomni_cuda.composite_fwd(density, colors, points, mask, select_max)
    from fastomni.kernels import composite as kernels

    return kernels.composite_fwd(density, colors, points, mask, select_max)


def _bwd(backend, grads, density, colors, points, mask, select_max):
    if backend == "reference":
        return ref.composite_bwd_ref(*grads, density, colors, points, mask, select_max)
    _checks.require(OP, _CHECKS, backend)
    if backend == "cpu":
        return torch.ops.fastomni_cpu.composite_bwd(*grads, density, colors, points, mask, select_max)
    if backend == "cuda":
        return torch.ops.fastomni_cuda.composite_bwd(*grads, density, colors, points, mask, select_max)
    from fastomni.kernels import composite as kernels

    return kernels.composite_bwd(*grads, density, colors, points, mask, select_max)


@torch.library.custom_op("fastomni::composite", mutates_args=())
def composite_op(density: Tensor, colors: Tensor, points: Tensor, mask: Tensor | None, select_max: bool,
                 backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Flat, contiguous form: density ``[R, K]``, colors ``[R, K, C]``, points ``[R, K, D]``, bool
    mask ``[R, K]`` or None. Returns weights, alphas ``[R, K]``, rgb ``[R, C]``, point ``[R, D]``,
    opacity ``[R, 1]``."""
    with annotate(f"{OP}.fwd"):
        return tuple(_fwd(backend, density, colors, points, mask, select_max))


@composite_op.register_fake
def _(density, colors, points, mask, select_max, backend):
    (R, K), C, D = density.shape, colors.shape[-1], points.shape[-1]
    new = density.new_empty
    return new(R, K), new(R, K), new(R, C), new(R, D), new(R, 1)


@torch.library.custom_op("fastomni::composite_bwd", mutates_args=())
def composite_bwd_op(grad_weights: Tensor, grad_alphas: Tensor, grad_rgb: Tensor, grad_point: Tensor,
                     grad_opacity: Tensor, density: Tensor, colors: Tensor, points: Tensor, mask: Tensor | None,
                     select_max: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`composite_op`: gradients of density, colors and points."""
    with annotate(f"{OP}.bwd"):
        grads = (grad_weights, grad_alphas, grad_rgb, grad_point, grad_opacity)
        return tuple(_bwd(backend, grads, density, colors, points, mask, select_max))


@composite_bwd_op.register_fake
def _(grad_weights, grad_alphas, grad_rgb, grad_point, grad_opacity, density, colors, points, mask, select_max,
      backend):
    return torch.empty_like(density), torch.empty_like(colors), torch.empty_like(points)


def _setup_context(ctx, inputs, output):
    density, colors, points, mask, select_max, backend = inputs
    ctx.save_for_backward(density, colors, points, mask)
    ctx.select_max, ctx.backend = select_max, backend


def _backward(ctx, grad_weights, grad_alphas, grad_rgb, grad_point, grad_opacity):
    density, colors, points, mask = ctx.saved_tensors
    grads = [g.contiguous() for g in (grad_weights, grad_alphas, grad_rgb, grad_point, grad_opacity)]
    gd, gc, gp = composite_bwd_op(*grads, density, colors, points, mask, ctx.select_max, ctx.backend)
    return gd, gc, gp, None, None, None


composite_op.register_autograd(_backward, setup_context=_setup_context)


def _validate(density: Tensor, colors: Tensor, points: Tensor, mask: Tensor | None) -> None:
    if not density.is_floating_point() or density.dim() < 1 or density.shape[-1] < 1:
        raise ValueError(f"density must be a floating tensor [..., K] with K >= 1, got {density.dtype} "
                         f"{tuple(density.shape)}")
    for name, t in (("colors", colors), ("points", points)):
        if t.dtype != density.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from density dtype {density.dtype}")
        if t.shape[:-1] != density.shape:
            raise ValueError(f"{name} must have shape [*{tuple(density.shape)}, channels], got {tuple(t.shape)}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != density.shape):
        raise ValueError(f"mask must be a bool tensor of shape {tuple(density.shape)}, got {mask.dtype} "
                         f"{tuple(mask.shape)}")


def composite(density: Tensor, colors: Tensor | None = None, points: Tensor | None = None,
              mask: Tensor | None = None, *, select_max: bool = False) -> Composite:
    """Composite rays of ``K`` samples in one call (see the module docstring for the math).

    density: ``[..., K]`` float32/float64, ``>= 0``; colors: ``[..., K, C]`` and points
    ``[..., K, D]`` of the same dtype, or None (then ``rgb``/``point`` have 0 channels); mask: bool
    ``[..., K]`` or None (all kept) selecting the samples of ``point`` and ``opacity``. Gradients
    flow to density, colors and points (through ``select_max``: to the selected point only).
    """
    colors = density.new_zeros(*density.shape, 0) if colors is None else colors
    points = density.new_zeros(*density.shape, 0) if points is None else points
    _validate(density, colors, points, mask)
    backend = _registry.select(OP, *(t for t in (density, colors, points, mask) if t is not None))
    if backend == "reference":
        return Composite(*ref.composite(density, colors, points, mask, select_max))
    lead, K = density.shape[:-1], density.shape[-1]
    R = density.numel() // K  # explicit: a -1 is ambiguous for 0-channel colors or points

    def flat(t: Tensor) -> Tensor:
        return t.reshape(R, K, *t.shape[density.dim():]).contiguous()

    outs = composite_op(flat(density), flat(colors), flat(points), None if mask is None else flat(mask),
                        select_max, backend)
    return Composite(*(o.reshape(*lead, o.shape[-1]) for o in outs))
