"""The ``fast`` model family: OmniMotion's structure with multiresolution grids instead of big MLPs.

Same representation and interface as :class:`~fastomni.nn.model.OmniMotion` (a canonical volume,
a per-frame invertible map, orthographic rays, compositing, the same losses and correspondence
API), but each network is a feature grid (:func:`fastomni.ops.grid_encode.grid_encode`) read by a
small head, which converges in far fewer steps (Instant-NGP; CaDeX++ for grid-conditioned
coupling layers):

- :class:`GridField`: points in a box -> grid features ``[N, L F]`` -> ``Linear -> LeakyReLU ->
  Linear`` head.
- :class:`GridCouplingNVP`: affine coupling layers; layer ``i`` transforms coordinate ``c_i`` by
  ``x_c -> (x_c - t) exp(-s)`` with ``(s, t)`` read from a grid over the two kept coordinates and
  the frame time. ``s, t`` depend only on what the layer keeps, so the inverse
  ``x_c -> x_c exp(s) + t`` is exact. The last head layer starts at zero: the map starts as the
  identity.
- :class:`FastOmniMotion`: the model; ``color_mlp`` (canonical colour and density) and
  ``deform_mlp`` (the bijection) keep the original's attribute names so the training code's
  parameter groups apply unchanged.

Example::

    >>> import torch
    >>> m = FastOmniMotion(num_imgs=4, h=16, w=16, num_samples_ray=8)
    >>> x = torch.rand(2, 5, 8, 3)
    >>> y = m.map_to_canonical(x, [0, 3])
    >>> bool(torch.allclose(m.map_from_canonical(y, [0, 3]), x, atol=1e-5))
    True
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fastomni.nn.model import RayModel, _check_ids, _check_points
from fastomni.nn.nvp import _affine_matrix
from fastomni.ops.grid_encode import grid_encode
from fastomni.reference.affine_coupling import S_CLAMP
from fastomni.reference.grid_encode import grid_levels

__all__ = ["FastOmniMotion", "GridCouplingNVP", "GridField", "FAST_DEFAULTS", "FAST_LEGACY"]

# The fast family's shape; every entry is a constructor argument of FastOmniMotion and is stored
# in its checkpoints, so a run reloads the same model. deform_max 0: the image's longer side (the
# finest coupling grid then has about 1.5 px cells over its box, 1.5x the image).
FAST_DEFAULTS = {
    "n_layers": 6, "deform_levels": 8, "deform_base": 4, "deform_max": 0, "deform_log2_size": 17,
    "color_levels": 10, "color_base": 8, "color_max": 256, "color_log2_size": 17,
    "features": 2, "hidden": 32, "affine_levels": 4,
}
# Options added after the first fast checkpoints, with the value those checkpoints were built with.
FAST_LEGACY = {"affine_levels": 0}


class GridField(nn.Module):
    """A multiresolution grid over the box ``[lo, hi]^D`` read by a two-layer head.

    x: ``[..., D]`` -> ``[..., out]``. Points outside the box are clamped to it.
    """

    def __init__(self, dim: int, out: int, levels: int, base, top, log2_size: int, features: int, hidden: int,
                 lo: Tensor, hi: Tensor, init_scale: float = 1e-4, zero_out: bool = False):
        super().__init__()
        self.resolutions, self.offsets = grid_levels(dim, levels, base, top, log2_size)
        self.table = nn.Parameter((torch.rand(self.offsets[-1], features) * 2 - 1) * init_scale)
        self.head = nn.Sequential(nn.Linear(levels * features, hidden), nn.LeakyReLU(0.01), nn.Linear(hidden, out))
        if zero_out:
            nn.init.zeros_(self.head[2].weight)
            nn.init.zeros_(self.head[2].bias)
        self.register_buffer("lo", lo.clone().float())
        self.register_buffer("hi", hi.clone().float())

    def features(self, x: Tensor) -> Tensor:
        """Grid features ``[N, L F]`` of points ``x [N, D]``."""
        unit = (x - self.lo.to(x.dtype)) / (self.hi - self.lo).to(x.dtype)
        return grid_encode(unit.contiguous(), self.table.to(x.dtype), self.resolutions, self.offsets)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        return self.head(self.features(flat)).reshape(*lead, -1)


class GridCouplingNVP(nn.Module):
    """``n_layers`` affine coupling layers over 3D points, conditioned on grids over the two kept
    coordinates and the frame time ``t in [0, 1]``. Layer ``i`` transforms coordinate
    ``transformed[i]`` (cycling x, y, z). ``forward`` maps local -> canonical, ``inverse`` back."""

    def __init__(self, num_imgs: int, n_layers: int, levels: int, base: int, top: int, log2_size: int,
                 features: int, hidden: int, min_depth: float, max_depth: float, affine_levels: int = 0):
        super().__init__()
        self.transformed = [i % 3 for i in range(n_layers)]
        t_top = max(1, num_imgs - 1)
        box_lo = torch.tensor([-1.5, -1.5, min_depth - 0.5 * (max_depth - min_depth)])
        box_hi = torch.tensor([1.5, 1.5, max_depth + 0.5 * (max_depth - min_depth)])
        # The original's optional affine warp of (x, y) from (t, depth) (NVPSimplified's affine_mlp),
        # read from a small dense grid over (depth, t): camera roll, zoom and pan, learned from every
        # point of a frame at once. Zero head: the identity at the start.
        self.affine = None
        if affine_levels:
            self.affine = GridField(2, 5, affine_levels, (2, min(2, t_top)), (8, t_top), 12, features, hidden,
                                    torch.tensor([float(box_lo[2]), 0.0]), torch.tensor([float(box_hi[2]), 1.0]),
                                    zero_out=True)
        self.layers = nn.ModuleList()
        for c in self.transformed:
            kept = [d for d in range(3) if d != c]
            lo = torch.cat([box_lo[kept], torch.zeros(1)])
            hi = torch.cat([box_hi[kept], torch.ones(1)])
            self.layers.append(GridField(3, 2, levels, (base, base, min(base, t_top)), (top, top, t_top), log2_size,
                                         features, hidden, lo, hi, zero_out=True))

    def _st(self, i: int, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        c = self.transformed[i]
        kept = [d for d in range(3) if d != c]
        inp = torch.cat([x[..., kept], t.expand(*x.shape[:-1], 1)], dim=-1)
        st = self.layers[i](inp)
        return st[..., 0:1].clamp(-S_CLAMP, S_CLAMP), st[..., 1:2]

    def _update(self, x: Tensor, c: int, value: Tensor) -> Tensor:
        return torch.cat([x[..., :c], value, x[..., c + 1:]], dim=-1)

    def _warp(self, t: Tensor, x: Tensor, inverse: bool) -> Tensor:
        """The affine warp of ``x``'s (x, y) (or its inverse), from (depth, t)."""
        theta = self.affine(torch.cat([x[..., 2:3], t.expand(*x.shape[:-1], 1)], dim=-1))
        mat = _affine_matrix(theta, inverse)
        xy = mat[..., :2, :2] @ x[..., :2, None] + mat[..., :2, 2:]
        return torch.cat([xy[..., 0], x[..., 2:]], dim=-1)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        """Local points ``x [n, ..., 3]`` of frames with times ``t [n, 1]`` -> canonical."""
        t = t.reshape(t.shape[0], *([1] * (x.dim() - 2)), 1).to(x.dtype)
        if self.affine is not None:
            x = self._warp(t, x, inverse=False)
        for i, c in enumerate(self.transformed):
            s, b = self._st(i, x, t)
            x = self._update(x, c, (x[..., c:c + 1] - b) * torch.exp(-s))
        return x

    def inverse(self, t: Tensor, u: Tensor) -> Tensor:
        """Canonical points ``u [n, ..., 3]`` -> local points of frames with times ``t [n, 1]``."""
        t = t.reshape(t.shape[0], *([1] * (u.dim() - 2)), 1).to(u.dtype)
        for i in reversed(range(len(self.transformed))):
            c = self.transformed[i]
            s, b = self._st(i, u, t)
            u = self._update(u, c, u[..., c:c + 1] * torch.exp(s) + b)
        return self._warp(t, u, inverse=True) if self.affine is not None else u


class FastOmniMotion(RayModel):
    """OmniMotion's representation on grids (see the module docstring), for ``num_imgs`` frames of
    ``h x w`` pixels. Frame ``i`` has time ``t_i = i / (num_imgs - 1)``."""

    family = "fast"

    def __init__(self, num_imgs: int, h: int, w: int, num_samples_ray: int = 16, min_depth: float = 0.0,
                 max_depth: float = 2.0, **shape):
        super().__init__(num_imgs, h, w, num_samples_ray, min_depth, max_depth)
        unknown = set(shape) - set(FAST_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown FastOmniMotion options {sorted(unknown)}; known: {sorted(FAST_DEFAULTS)}")
        self.options = {**FAST_DEFAULTS, **shape}
        if self.options["deform_max"] == 0:
            self.options["deform_max"] = max(h, w, self.options["deform_base"])
        s = self.options
        self.deform_mlp = GridCouplingNVP(num_imgs, s["n_layers"], s["deform_levels"], s["deform_base"],
                                          s["deform_max"], s["deform_log2_size"], s["features"], s["hidden"],
                                          min_depth, max_depth, s["affine_levels"])
        self.color_mlp = GridField(3, 4, s["color_levels"], s["color_base"], s["color_max"], s["color_log2_size"],
                                   s["features"], s["hidden"], torch.full((3,), -2.0), torch.full((3,), 2.0))
        with torch.no_grad():
            # Start opaque (density softplus(2 - 1) = 1.3, alpha 0.73 per sample): the composited
            # point, a weighted sum not divided by the weights, is then the surface point from the
            # first step instead of being shrunk towards the origin by a transparent volume.
            self.color_mlp.head[2].bias[3] = 2.0
        times = torch.arange(num_imgs, dtype=torch.float32)[:, None] / max(1, num_imgs - 1)
        self.register_buffer("time_steps", times, persistent=False)

    def _times(self, ids) -> Tensor:
        ids = _check_ids(ids, self.num_imgs, "ids").to(self.time_steps.device)
        return self.time_steps[ids]

    def map_to_canonical(self, x: Tensor, ids) -> Tensor:
        t = self._times(ids)
        _check_points(x, t.shape[0], 3, "x")
        return self.deform_mlp.forward(t, x)

    def map_from_canonical(self, u: Tensor, ids) -> Tensor:
        t = self._times(ids)
        _check_points(u, t.shape[0], 3, "u")
        return self.deform_mlp.inverse(t, u)
