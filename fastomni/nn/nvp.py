"""NVPSimplified, OmniMotion's invertible per-frame mapping, drop-in for
``networks/nvp_simplified.py``.

Same constructor arguments, attribute names and state_dict keys as the original (``layers1.{i}``
with ``mask``, ``map_st``, ``projection``; ``code_projectors.{i}``; ``affine_mlp`` when
``affine=True``), so an original state dict loads with ``strict=True``. The per-frame code enters
the first ``map_st`` linear as a per-frame bias instead of being concatenated to every point.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastomni.ops.affine_coupling import affine_coupling
from fastomni.reference.affine_coupling import S_CLAMP, coupling_update, fixed_positional_encoding

__all__ = ["NVPSimplified", "CouplingLayer", "MLP", "AffineMLP", "get_projection_layer"]


def _pe_frequencies(pe_freq: int) -> Tensor:
    """``pi * 2^k``, k = 0..pe_freq-1, float32 as the original builds them."""
    return math.pi * torch.pow(2, torch.linspace(0, pe_freq - 1, pe_freq))


class MLP(nn.Module):
    """``Linear -> [BatchNorm] -> act`` per hidden size, then ``Linear``; keys ``mlp.{j}``.

    x: ``[..., c_in]`` -> ``[..., c_out]``.
    """

    def __init__(self, c_in: int, c_out: int, c_hiddens: list[int], act=nn.LeakyReLU, bn=nn.BatchNorm1d):
        super().__init__()
        layers: list[nn.Module] = []
        d_in = c_in
        for d_out in c_hiddens:
            layers.append(nn.Linear(d_in, d_out))
            if bn is not None:
                layers.append(bn(d_out))
            layers.append(act())
            d_in = d_out
        layers.append(nn.Linear(d_in, c_out))
        self.mlp = nn.Sequential(*layers)
        self.c_out = c_out

    def forward(self, x: Tensor) -> Tensor:
        y = self.mlp(x.reshape(-1, x.shape[-1]))
        return y.reshape(*x.shape[:-1], self.c_out)


class IdentityProjection(nn.Module):
    def __init__(self, input_dims: int):
        super().__init__()
        self._input_dims = input_dims

    @property
    def proj_dims(self) -> int:
        return self._input_dims

    def forward(self, x: Tensor) -> Tensor:
        return x


class ProjectionLayer(nn.Module):
    """``Linear(in, 2P) -> ReLU -> Linear(2P, P)`` (``proj_type='simple'``)."""

    def __init__(self, input_dims: int, proj_dims: int):
        super().__init__()
        self._proj_dims = proj_dims
        self.input_dims = input_dims
        self.proj = nn.Sequential(nn.Linear(input_dims, 2 * proj_dims), nn.ReLU(), nn.Linear(2 * proj_dims, proj_dims))

    @property
    def proj_dims(self) -> int:
        return self._proj_dims

    def _check(self, x: Tensor) -> None:
        if x.shape[-1] != self.input_dims:
            raise ValueError(
                f"{type(self).__name__} takes {self.input_dims} coordinates but got {x.shape[-1]}; "
                "a coupling layer passes its 2 kept coordinates (the original fails here too)")

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        return self.proj(x)


class FixedPositionalEncoding(ProjectionLayer):
    """``[v, sin(v sigma), cos(v sigma)] -> Linear -> LeakyReLU`` (``'fixed_positional_encoding'``)."""

    def __init__(self, input_dims: int, frequency: int, proj_dims: int):
        super().__init__(input_dims, proj_dims)
        self.register_buffer("sigma", _pe_frequencies(frequency), persistent=False)
        self.proj = nn.Sequential(nn.Linear(input_dims + input_dims * frequency * 2, proj_dims), nn.LeakyReLU())

    @property
    def proj_dims(self) -> int:
        return self._proj_dims * 3

    def encode(self, x: Tensor) -> Tensor:
        """x: ``[..., D]`` -> ``[..., D + 2 D F]``."""
        self._check(x)
        return fixed_positional_encoding(x, self.sigma)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.encode(x))


class GaussianRandomFourierFeatures(ProjectionLayer):
    def __init__(self, input_dims: int, proj_dims: int, gamma: float = 1.0):
        super().__init__(input_dims, proj_dims)
        self._gamma = gamma
        self.register_buffer("B", torch.randn(3, proj_dims // 2))

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        xb = x @ (self.B * 2 * math.pi * self._gamma)
        return torch.cat([torch.cos(xb), torch.sin(xb)], dim=-1)


class GaborProjection(nn.Module):
    """The original's ``GaborLayer`` projection (``proj_type='gabor'``): keys ``linear``, ``mu``,
    ``gamma``, ``linear2``."""

    def __init__(self, input_dims: int, proj_dims: int, alpha: float = 1.0, beta: float = 1.0,
                 weight_scale: float = 128):
        super().__init__()
        self.input_dims = input_dims
        self.linear = nn.Linear(input_dims, proj_dims)
        self.mu = nn.Parameter(2 * torch.rand(proj_dims, input_dims) - 1)
        self.gamma = nn.Parameter(torch.distributions.Gamma(alpha, beta).sample((proj_dims,)))
        self.linear2 = nn.Linear(input_dims, proj_dims)
        bound = math.sqrt(weight_scale / proj_dims)
        with torch.no_grad():
            self.linear.weight.mul_(weight_scale * torch.sqrt(self.gamma[:, None]))
            self.linear.bias.uniform_(-math.pi, math.pi)
            self.linear2.weight.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.input_dims:
            raise ValueError(f"gabor projection takes {self.input_dims} coordinates but got {x.shape[-1]}")
        from fastomni.reference.gabor_filter import gabor_filter

        flat = x.reshape(-1, x.shape[-1])
        g = gabor_filter(flat, self.linear.weight, self.linear.bias, self.mu, self.gamma)
        return (g * self.linear2(flat)).reshape(*x.shape[:-1], -1)


def get_projection_layer(type: str, proj_dims: int = 128, pe_freq: int = 4, gamma: float = 1.0) -> nn.Module:
    """The original's projection factory: ``identity``, ``simple``, ``fixed_positional_encoding``,
    ``gaussianrff``, ``gabor``."""
    if type == "identity":
        return IdentityProjection(3)
    if type == "simple":
        return ProjectionLayer(2, proj_dims)
    if type == "fixed_positional_encoding":
        return FixedPositionalEncoding(2, pe_freq, proj_dims)
    if type == "gaussianrff":
        return GaussianRandomFourierFeatures(3, proj_dims, gamma)
    if type == "gabor":
        return GaborProjection(3, proj_dims)
    raise ValueError(f"unknown proj_type {type!r}; expected one of identity, simple, "
                     "fixed_positional_encoding, gaussianrff, gabor")


class CouplingLayer(nn.Module):
    """One affine coupling layer; ``mask [1,1,1,3]`` is 1 on the two kept coordinates."""

    def __init__(self, map_st: nn.Module, projection: nn.Module, mask: Tensor):
        super().__init__()
        self.map_st = map_st
        self.projection = projection
        self.register_buffer("mask", mask)

    @property
    def transformed(self) -> int:
        """Index of the coordinate this layer transforms."""
        zeros = (self.mask.reshape(3) == 0).nonzero()
        if zeros.numel() != 1:
            raise ValueError(f"coupling mask must have exactly one zero, got {self.mask.reshape(3).tolist()}")
        return int(zeros[0, 0])

    def kept(self) -> list[int]:
        t = self.transformed
        return [c for c in range(3) if c != t]

    def st(self, code: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(s, t)`` ``[n, ..., 1]`` for points ``y [n, ..., 3]`` and per-frame codes ``code [n, C]``.

        The code's share of the first ``map_st`` linear is a per-frame bias; the rest of the
        network runs on the flattened points.
        """
        mlp = self.map_st[0].mlp
        first = mlp[0]
        proj = self.projection(y[..., self.kept()])
        c = code.shape[-1]
        code_bias = code @ first.weight[:, :c].T + first.bias  # [n, H0]
        h = proj @ first.weight[:, c:].T + code_bias.reshape(code.shape[0], *([1] * (proj.dim() - 2)), -1)
        st = mlp[1:](h.reshape(-1, h.shape[-1])).reshape(*y.shape[:-1], 2)
        return torch.clamp(st[..., 0:1], -S_CLAMP, S_CLAMP), st[..., 1:2]

    def fused_weights(self) -> tuple[nn.Linear, list[nn.Linear], float] | None:
        """``(projection linear, map_st linears, LeakyReLU slope)`` when this layer has the default
        configuration that :func:`fastomni.ops.affine_coupling.affine_coupling` implements (fixed
        positional encoding, LeakyReLU MLP without BatchNorm, one slope >= 0), else None."""
        proj = self.projection
        if not isinstance(proj, FixedPositionalEncoding) or len(self.map_st) != 1 or not isinstance(self.map_st[0], MLP):
            return None
        layers = list(self.map_st[0].mlp)
        linears, acts = layers[0::2], [proj.proj[1], *layers[1::2]]
        if (len(proj.proj) != 2 or len(layers) < 3 or not all(isinstance(m, nn.Linear) for m in linears)
                or not all(type(a) is nn.LeakyReLU for a in acts)):
            return None
        slopes = {a.negative_slope for a in acts}
        if len(slopes) != 1 or min(slopes) < 0:
            return None
        return proj.proj[0], linears, slopes.pop()

    def transform(self, code: Tensor, y: Tensor, inverse: bool = False) -> Tensor:
        """Forward (local -> canonical) or inverse of this layer; ``y [n, ..., 3]``, ``code [n, C]``.

        The default configuration runs as one ``fastomni::affine_coupling`` op (backend chosen by
        :mod:`fastomni.ops`); any other runs the modules.
        """
        fused = self.fused_weights()
        if fused is None:
            s, t = self.st(code, y)
            return coupling_update(y, s, t, self.transformed, inverse)
        proj, linears, slope = fused
        first, hidden, out = linears[0], linears[1:-1], linears[-1]
        c = code.shape[-1]
        code_bias = torch.addmm(first.bias, code, first.weight[:, :c].T)  # [n, H0], once per frame
        return affine_coupling(y, code_bias, proj.weight, proj.bias, first.weight[:, c:], [m.weight for m in hidden],
                               [m.bias for m in hidden], out.weight, out.bias, self.projection.sigma, self.transformed,
                               inverse, slope)

    def forward(self, F: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The original's signature: ``F`` the code expanded to every point ``[..., C]``.
        Returns ``(x, log|det J|)``."""
        st = self.map_st(torch.cat([F, self.projection(y[..., self.kept()])], dim=-1))
        s = torch.clamp(st[..., 0:1], -S_CLAMP, S_CLAMP)
        return coupling_update(y, s, st[..., 1:2], self.transformed, False), (-s).sum(-1)

    def inverse(self, F: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        st = self.map_st(torch.cat([F, self.projection(x[..., self.kept()])], dim=-1))
        s = torch.clamp(st[..., 0:1], -S_CLAMP, S_CLAMP)
        return coupling_update(x, s, st[..., 1:2], self.transformed, True), s.sum(-1)


class AffineMLP(nn.Module):
    """The MLP the original's ``affine_mlp`` call actually builds: ``[PE(depth), t, depth]`` (10)
    -> 7 x (Linear, ReLU) of width 256 -> Linear(256, 5). Keys ``hidden.{0..6}.0``, ``hidden.7``.

    The PE interleaves sin and cos per frequency: ``[sin(f0 d), cos(f0 d), sin(f1 d), ...]``.
    """

    def __init__(self, pe_freq: int = 4, hidden_dim: int = 256, num_layers: int = 8, output_dim: int = 5):
        super().__init__()
        self.register_buffer("b", torch.tensor([(2**j) * math.pi for j in range(pe_freq)]), persistent=False)
        in_dim = 2 * pe_freq + 2
        self.hidden = nn.ModuleList()
        for i in range(num_layers):
            d_in = in_dim if i == 0 else hidden_dim
            if i == num_layers - 1:
                self.hidden.append(nn.Linear(d_in, output_dim))
            else:
                self.hidden.append(nn.Sequential(nn.Linear(d_in, hidden_dim), nn.ReLU(True)))

    def forward(self, x: Tensor) -> Tensor:
        """x: ``[..., 2]`` = (t, depth) -> ``[..., 5]``."""
        arg = x[..., 1:2, None] * self.b  # [..., 1, F]
        pos = torch.stack([torch.sin(arg), torch.cos(arg)], dim=-1).flatten(-3)  # [..., 2F]
        h = torch.cat([pos, x], dim=-1)
        for layer in self.hidden:
            h = layer(h)
        return h


def _affine_matrix(theta: Tensor, inverse: bool) -> Tensor:
    """``[..., 5]`` (angle, log s1, tx, log s2, ty) -> ``[..., 3, 3]`` or its analytic inverse."""
    angle, s1, tx, s2, ty = theta.unbind(-1)
    s1, s2 = torch.exp(s1), torch.exp(s2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    a, b, c, d = cos * s1, -sin * s1, sin * s2, cos * s2
    zeros, ones = torch.zeros_like(a), torch.ones_like(a)
    if inverse:
        inv_det = 1.0 / (a * d - b * c)
        rows = [d * inv_det, -b * inv_det, (b * ty - d * tx) * inv_det,
                -c * inv_det, a * inv_det, (c * tx - a * ty) * inv_det, zeros, zeros, ones]
    else:
        rows = [a, b, tx, c, d, ty, zeros, zeros, ones]
    return torch.stack(rows, dim=-1).reshape(*theta.shape[:-1], 3, 3)


class NVPSimplified(nn.Module):
    """Stack of affine coupling layers conditioned on per-frame codes (and an optional per-point
    affine warp of (x, y) from (t, depth)).

    ``forward(t [n,1], feat [n,C], x [n, ..., 3])`` maps frame-local points to canonical;
    ``inverse(t, feat, u)`` maps canonical points to the frames' local volumes.
    """

    def __init__(self, n_layers: int, feature_dims: int, hidden_size, proj_dims: int,
                 code_proj_hidden_size=(), proj_type: str = "simple", pe_freq: int = 4,
                 normalization: bool = True, affine: bool = False, activation=nn.LeakyReLU, device=None):
        super().__init__()
        self.affine = affine
        norm = nn.BatchNorm1d if normalization else None
        hidden = [hidden_size] if isinstance(hidden_size, int) else list(hidden_size)
        code_hidden = list(code_proj_hidden_size) or [feature_dims]
        self.layers1 = nn.ModuleList()
        self.code_projectors = nn.ModuleList()
        self.layer_idx = list(range(n_layers))
        transformed = torch.cat([torch.randperm(3) for _ in range(0, n_layers, 3)])
        for i in self.layer_idx:
            mask = torch.ones(3)
            mask[transformed[i]] = 0
            map_st = nn.Sequential(MLP(proj_dims + feature_dims, 2, hidden, act=activation, bn=norm))
            proj = get_projection_layer(proj_type, proj_dims=proj_dims, pe_freq=pe_freq)
            self.layers1.append(CouplingLayer(map_st, proj, mask[None, None, None]))
            self.code_projectors.append(MLP(feature_dims, feature_dims, code_hidden, act=activation, bn=norm))
        if affine:
            self.affine_mlp = AffineMLP(pe_freq=pe_freq)
        if device is not None:
            self.to(device)

    def set_masks(self, transformed: list[int]) -> None:
        """Set each layer's transformed coordinate (for checkpoints saved without mask buffers)."""
        if len(transformed) != len(self.layers1) or any(c not in (0, 1, 2) for c in transformed):
            raise ValueError(f"need one coordinate index in (0, 1, 2) per layer ({len(self.layers1)}), got {transformed}")
        for layer, c in zip(self.layers1, transformed):
            layer.mask.fill_(1)
            layer.mask[..., c] = 0

    def _affine(self, t: Tensor, x: Tensor, inverse: bool) -> Tensor:
        depth = x[..., 2]
        tt = t.reshape(t.shape[0], *([1] * (depth.dim() - 1))).expand_as(depth)
        mat = _affine_matrix(self.affine_mlp(torch.stack([tt, depth], dim=-1)), inverse)
        xy1 = torch.cat([x[..., :2], torch.ones_like(depth[..., None])], dim=-1)
        out = (mat @ xy1[..., None])[..., 0]
        return torch.cat([out[..., :2] / (out[..., 2:] + 1e-8), depth[..., None]], dim=-1)

    def forward(self, t: Tensor, feat: Tensor, x: Tensor) -> Tensor:
        """t: ``[n, 1]``; feat: ``[n, C]``; x: ``[n, ..., 3]`` local -> canonical ``[n, ..., 3]``."""
        y = self._affine(t, x, inverse=False) if self.affine else x
        for i in self.layer_idx:
            y = self.layers1[i].transform(self.code_projectors[i](feat), y, inverse=False)
        return y

    def inverse(self, t: Tensor, feat: Tensor, y: Tensor) -> Tensor:
        """Inverse of :meth:`forward`: canonical ``[n, ..., 3]`` -> local ``[n, ..., 3]``."""
        x = y
        for i in reversed(self.layer_idx):
            x = self.layers1[i].transform(self.code_projectors[i](feat), x, inverse=True)
        return self._affine(t, x, inverse=True) if self.affine else x
