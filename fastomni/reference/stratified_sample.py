"""Reference (pure PyTorch) ray sampling of OmniMotion's orthographic camera: the spec.

A pixel ``(x, y)`` of an ``h x w`` frame is normalized to ``x_n = x / (w-1) * 2 - 1`` (same for
y with ``h``) and lifted to the ray ``(x_n, y_n, z)``. ``K`` depths are ``linspace(min, max, K)``
computed in float32 and then cast to the pixels' dtype, as the original computes them (its float32
``torch.linspace`` is promoted when concatenated with float64 pixels): :func:`depth_grid` is the one
place that builds them, for every backend and every caller. Stratified sampling replaces depth ``k`` by ``lower_k + (upper_k - lower_k) * u_k``, with the
interval bounded by the midpoints to its neighbours (the first and last intervals are half-open
at the ends) and ``u ~ U[0, 1)``.

Only the x and y of a point depend on the pixel, linearly: ``d points[..., k, 0] / d px[..., 0] =
2 / (w-1)`` for every sample k (y likewise with ``h``); the depths depend on the noise alone.

Example::

    >>> import torch
    >>> pts, depths = stratified_sample(torch.zeros(1, 4, 2), h=8, w=8, num_samples=5,
    ...                                 min_depth=0.0, max_depth=2.0)
    >>> pts.shape, depths[0, 0, :, 0].tolist()
    (torch.Size([1, 4, 5, 3]), [0.0, 0.5, 1.0, 1.5, 2.0])
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["denormalize_coords", "depth_bounds", "depth_grid", "normalize_coords", "sample_depths", "stratified_sample", "stratified_sample_bwd_ref"]


def normalize_coords(px: Tensor, h: int, w: int) -> Tensor:
    """Pixels ``[..., 2]`` (x, y) to [-1, 1] coordinates ``[..., 2]``."""
    scale = torch.tensor([w - 1.0, h - 1.0], dtype=px.dtype, device=px.device)
    return px / scale * 2 - 1.0


def denormalize_coords(xy: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`normalize_coords`: ``[..., 2]`` to pixels ``[..., 2]``."""
    scale = torch.tensor([w - 1.0, h - 1.0], dtype=xy.dtype, device=xy.device)
    return (xy + 1.0) * scale / 2.0


def depth_grid(num_samples: int, min_depth: float, max_depth: float, dtype=torch.float32, device=None) -> Tensor:
    """The evenly spaced depths ``[K]``: ``torch.linspace(min_depth, max_depth, K)`` in float32 (the
    original's), then cast to ``dtype``; so float64 samples carry the float32 grid's values exactly."""
    return torch.linspace(min_depth, max_depth, num_samples, dtype=torch.float32, device=device).to(dtype)


def depth_bounds(num_samples: int, min_depth: float, max_depth: float, dtype=torch.float32, device=None
                 ) -> tuple[Tensor, Tensor]:
    """Stratification intervals ``(lower [K], upper [K])`` in ``dtype``: the midpoints between
    neighbouring depths of :func:`depth_grid`, the grid's own ends at both ends."""
    depths = depth_grid(num_samples, min_depth, max_depth, dtype, device)
    mids = 0.5 * (depths[1:] + depths[:-1])
    return torch.cat([depths[:1], mids]), torch.cat([mids, depths[-1:]])


def sample_depths(shape: tuple[int, ...], num_samples: int, min_depth: float, max_depth: float,
                  noise: Tensor | None = None, dtype=torch.float32, device=None) -> Tensor:
    """Depths ``[*shape, K]``: evenly spaced, or stratified by ``noise [*shape, K]`` in [0, 1)."""
    if noise is None:
        return depth_grid(num_samples, min_depth, max_depth, dtype, device).expand(*shape, num_samples)
    lower, upper = depth_bounds(num_samples, min_depth, max_depth, dtype, device)
    return lower + (upper - lower) * noise


def stratified_sample(px: Tensor, h: int, w: int, num_samples: int, min_depth: float, max_depth: float,
                      noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """3D samples along the rays of pixels ``px [..., 2]``.

    noise: ``[..., K]`` uniform [0, 1) jitter, or None for deterministic samples.
    Returns ``(points [..., K, 3], depths [..., K, 1])``.
    """
    depths = sample_depths(px.shape[:-1], num_samples, min_depth, max_depth, noise, px.dtype, px.device)
    xy = normalize_coords(px, h, w)[..., None, :].expand(*px.shape[:-1], num_samples, 2)
    return torch.cat([xy, depths[..., None]], dim=-1), depths[..., None]


def stratified_sample_bwd_ref(grad_points: Tensor, h: int, w: int) -> Tensor:
    """Explicit backward of :func:`stratified_sample` w.r.t. ``px``.

    grad_points: ``[..., K, 3]``. Returns ``grad_px [..., 2] = sum_k grad_points[..., k, :2] * 2 /
    (w-1, h-1)`` (the depths output and the noise carry no gradient to ``px``).
    """
    scale = torch.tensor([w - 1.0, h - 1.0], dtype=grad_points.dtype, device=grad_points.device)
    return grad_points[..., :2].sum(dim=-2) * 2 / scale
