"""The OmniMotion representation: canonical volume, per-frame bijections and ray rendering.

``OmniMotion`` holds ``feature_mlp``, ``deform_mlp`` and ``color_mlp`` with the original's defaults
and names (an original checkpoint's three state dicts load into them), plus the camera geometry
(image size, samples per ray, depth range) as plain attributes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastomni.nn.mfn import GaborNet
from fastomni.nn.nvp import NVPSimplified
from fastomni.ops.composite import composite
from fastomni.ops.stratified_sample import stratified_sample
from fastomni.reference.stratified_sample import denormalize_coords

__all__ = ["OmniMotion", "RayModel", "Blend", "contract"]


def contract(u: Tensor) -> Tensor:
    """mip-NeRF 360 contraction ``[..., 3] -> [..., 3]``: identity inside the unit ball,
    ``(2 - 1/|u|) u/|u|`` outside."""
    norm = u.norm(dim=-1, keepdim=True)
    safe = norm.clamp_min(1.0)
    return torch.where(norm <= 1, u, (2.0 - 1.0 / safe) * (u / safe))


@dataclass
class Blend:
    """Canonical query of ray samples ``[..., K]``: colors ``[..., K, 3]``, weights and alphas
    ``[..., K]``, rendered rgb ``[..., 3]``; with points given, their composite ``[..., D]``
    (``sum_k w_k m_k p_k``, ``m`` the points mask)."""

    colors: Tensor
    weights: Tensor
    alphas: Tensor
    rendered_rgbs: Tensor
    point: Tensor | None = None


def _check_ids(ids, num_imgs: int, name: str) -> Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() != 1:
        raise ValueError(f"{name} must be a 1-D list of frame ids, got shape {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_imgs):
        raise IndexError(f"{name} has frame ids in [{int(ids.min())}, {int(ids.max())}] but the video "
                         f"has {num_imgs} frames (valid: 0..{num_imgs - 1})")
    return ids


def _check_points(x: Tensor, n: int, last: int, name: str) -> None:
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2 or x.shape[0] != n or x.shape[-1] != last:
        raise ValueError(f"{name} must have shape [{n}, ..., {last}] (one row per frame id), got {tuple(x.shape)}")
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN")


class RayModel(nn.Module):
    """What every model family shares: an ``h x w`` orthographic camera over ``num_imgs`` frames,
    ``num_samples_ray`` samples per ray in ``[min_depth, max_depth]``, rendering and correspondences.

    A family supplies the representation: :meth:`map_to_canonical`, :meth:`map_from_canonical`
    and a ``color_mlp`` (canonical point -> 3 colour logits and a density logit).
    """

    family = ""

    def __init__(self, num_imgs: int, h: int, w: int, num_samples_ray: int = 32, min_depth: float = 0.0,
                 max_depth: float = 2.0):
        super().__init__()
        if num_imgs < 2:
            raise ValueError(f"OmniMotion needs at least 2 frames, got num_imgs={num_imgs}")
        if h < 2 or w < 2:
            raise ValueError(f"image size must be at least 2x2, got h={h}, w={w}")
        if num_samples_ray < 1:
            raise ValueError(f"num_samples_ray must be >= 1, got {num_samples_ray}")
        if not max_depth > min_depth:
            raise ValueError(f"max_depth ({max_depth}) must exceed min_depth ({min_depth})")
        self.num_imgs, self.h, self.w = num_imgs, h, w
        self.num_samples_ray, self.min_depth, self.max_depth = num_samples_ray, float(min_depth), float(max_depth)
        # [num_imgs] shot index per frame (numpy int) for a video with shot cuts, None for one shot:
        # set from the sequence's shots.json by training, kept in checkpoints; queries honour it.
        self.shots = None

    def map_to_canonical(self, x: Tensor, ids) -> Tensor:
        """Local points ``x [n, ..., 3]`` of frames ``ids [n]`` -> canonical ``[n, ..., 3]``."""
        raise NotImplementedError

    def map_from_canonical(self, u: Tensor, ids) -> Tensor:
        """Canonical points ``u [n, ..., 3]`` -> local points of frames ``ids [n]``."""
        raise NotImplementedError

    def color_density(self, u: Tensor, apply_contraction: bool = True) -> tuple[Tensor, Tensor]:
        """Canonical points ``[..., 3]`` -> ``(rgb [..., 3] in (0, 1), density [...] >= 0)``: the
        family's ``color_mlp`` on the contracted points, rgb ``sigmoid(out[:3])``, density
        ``softplus(out[3] - 1)``."""
        out = self.color_mlp(contract(u) if apply_contraction else u)
        return torch.sigmoid(out[..., :3]), F.softplus(out[..., -1] - 1.0)

    def map_between(self, x1: Tensor, ids1, ids2) -> tuple[Tensor, Tensor]:
        """Points of frames ``ids1`` mapped to frames ``ids2``: ``(x2 [n, ..., 3], canonical)``."""
        u = self.map_to_canonical(x1, ids1)
        return self.map_from_canonical(u, ids2), u

    # -- rays -----------------------------------------------------------------------------------
    def sample_rays(self, px: Tensor, det: bool = True, generator: torch.Generator | None = None,
                    noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Samples on the rays of pixels ``px [n, P, 2]``: ``(points [n, P, K, 3], depths [n, P, K, 1])``.

        ``det=False`` jitters the depths inside their intervals with ``generator``'s uniform noise;
        an explicit ``noise [n, P, K]`` in [0, 1) jitters them by that.
        """
        return stratified_sample(px, self.h, self.w, self.num_samples_ray, self.min_depth, self.max_depth,
                                 det=det, generator=generator, noise=noise)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Orthographic projection ``[..., 3]`` -> ``(pixels [..., 2], depth [..., 1])``."""
        return denormalize_coords(x[..., :2], self.h, self.w), x[..., 2:]

    def blend(self, u: Tensor, mask_near: bool = False, points: Tensor | None = None,
              points_mask: Tensor | None = None) -> Blend:
        """Query canonical ray samples ``u [..., K, 3]`` and alpha-composite their colors.

        ``mask_near`` zeroes the alphas of the nearest 20% of samples (the original's early-training
        trick; a zero density gives alpha exactly 0). ``points [..., K, D]`` (e.g. the samples mapped
        to another frame) are composited in the same call with the weights masked by the bool
        ``points_mask [..., K]`` (the original's training keeps mapped depths inside the range)."""
        colors, density = self.color_density(u)
        if mask_near:
            near = torch.zeros_like(density, dtype=torch.bool)
            near[..., : int(u.shape[-2] * 0.2)] = True
            density = density.masked_fill(near, 0.0)
        out = composite(density, colors, points, points_mask)
        return Blend(colors, out.weights, out.alphas, out.rgb, None if points is None else out.point)

    # -- correspondences ------------------------------------------------------------------------
    def correspondences(self, ids1, px1: Tensor, ids2, use_max_loc: bool = False) -> tuple[Tensor, Tensor]:
        """Pixels ``px1 [n, P, 2]`` of frames ``ids1`` tracked to frames ``ids2``.

        Returns ``(px2 [n, P, 2], depth [n, P, 1])``: the weight-composited mapped point, or with
        ``use_max_loc`` the mapped sample of largest weight.
        """
        _check_points(px1, len(ids1), 2, "px1")
        x1, _ = self.sample_rays(px1)
        x2, u = self.map_between(x1, ids1, ids2)
        _, density = self.color_density(u)
        return self.project(composite(density, points=x2, select_max=use_max_loc).point)

    @property
    def occlusion_eps(self) -> float:
        """The margin in front of the predicted depth that the occlusion score ignores: ``1.1 (max -
        min) / K``, a little over one sample spacing (the original's)."""
        return 1.1 * (self.max_depth - self.min_depth) / self.num_samples_ray

    def correspondences_and_occlusion(self, ids1, px1: Tensor, ids2, use_max_loc: bool = True
                                      ) -> tuple[Tensor, Tensor, Tensor]:
        """As :meth:`correspondences`, plus the occlusion score ``[n, P, 1]``: the weight that the
        target frame's own ray at the predicted pixel puts in front of the predicted depth
        (minus :attr:`occlusion_eps`). Returns ``(px2, score, depth)``."""
        px2, depth = self.correspondences(ids1, px1, ids2, use_max_loc)
        x2, depths2 = self.sample_rays(px2)
        _, density = self.color_density(self.map_to_canonical(x2, ids2))
        return px2, composite(density, mask=depths2[..., 0] < depth - self.occlusion_eps).opacity, depth


class OmniMotion(RayModel):
    """OmniMotion (the original's networks) for a video of ``num_imgs`` frames of ``h x w`` pixels.

    Frame ``i`` has time ``t_i = (i + 1) / num_imgs``; its latent code is ``feature_mlp(t_i)``.

    Example::

        >>> import torch
        >>> m = OmniMotion(num_imgs=4, h=16, w=16, num_samples_ray=8)
        >>> px2, depth = m.correspondences([0], torch.tensor([[[3.0, 5.0]]]), [2])
        >>> px2.shape, depth.shape
        (torch.Size([1, 1, 2]), torch.Size([1, 1, 1]))
    """

    family = "original"

    def __init__(self, num_imgs: int, h: int, w: int, num_samples_ray: int = 32, min_depth: float = 0.0,
                 max_depth: float = 2.0, pe_freq: int = 4, use_affine: bool = False):
        super().__init__(num_imgs, h, w, num_samples_ray, min_depth, max_depth)
        self.feature_mlp = GaborNet(in_size=1, hidden_size=256, n_layers=2, alpha=4.5, out_size=128)
        self.deform_mlp = NVPSimplified(n_layers=6, feature_dims=128, hidden_size=[256, 256, 256], proj_dims=256,
                                        code_proj_hidden_size=[], proj_type="fixed_positional_encoding",
                                        pe_freq=pe_freq, normalization=False, affine=use_affine)
        self.color_mlp = GaborNet(in_size=3, hidden_size=512, n_layers=3, alpha=3, out_size=4)
        times = torch.linspace(1, num_imgs, num_imgs)[:, None] / num_imgs
        self.register_buffer("time_steps", times, persistent=False)

    # -- mapping --------------------------------------------------------------------------------
    def frame_codes(self, ids) -> tuple[Tensor, Tensor]:
        """Times ``[n, 1]`` and latent codes ``[n, 128]`` of frames ``ids [n]``."""
        ids = _check_ids(ids, self.num_imgs, "ids").to(self.time_steps.device)
        t = self.time_steps[ids]
        return t, self.feature_mlp(t)

    def map_to_canonical(self, x: Tensor, ids) -> Tensor:
        """Local points ``x [n, ..., 3]`` of frames ``ids [n]`` -> canonical ``[n, ..., 3]``."""
        t, feat = self.frame_codes(ids)
        _check_points(x, t.shape[0], 3, "x")
        return self.deform_mlp.forward(t, feat, x)

    def map_from_canonical(self, u: Tensor, ids) -> Tensor:
        """Canonical points ``u [n, ..., 3]`` -> local points of frames ``ids [n]``."""
        t, feat = self.frame_codes(ids)
        _check_points(u, t.shape[0], 3, "u")
        return self.deform_mlp.inverse(t, feat, u)
