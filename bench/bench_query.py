"""Dense query: every pixel of one frame tracked to every frame with occlusion, the fast path
(:func:`fastomni.query.dense_tracks`) against the straightforward one (the original's
``get_correspondences_and_occlusion_masks_for_pixels`` per target frame, i.e.
``OmniMotion.correspondences_and_occlusion``). Both must give the same tracks and occlusion.

Run: ``pytest bench/bench_query.py --benchmark-only -s`` (a minute or two on 2 CPU cores; the
speed-up is printed and stored in ``extra_info``).

The fast path's cost per pixel and target frame depends on how many samples lie in front of the
mapped point (those are the only ones the occlusion score needs), so the model here has an
opaque surface at a chosen depth (near, middle or far of the [0, 2] range) on top of its real
colour network; a trained model's surfaces lie at scene-dependent depths.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from fastomni.nn import OmniMotion
from fastomni.query import dense_tracks

SMALL = os.environ.get("FASTOMNI_BENCH_SMALL") == "1"
H, W, T, K = (6, 6, 4, 8) if SMALL else (12, 12, 6, 32)
QUERY_FRAME = 1
OCCLUSION_TH = 0.5


class SurfaceModel(OmniMotion):
    """OmniMotion whose density (after running the real colour network) is an opaque wavy surface
    at canonical depth ``surface``."""

    surface = 1.0

    def color_density(self, u, apply_contraction=True):
        rgb, density = super().color_density(u, apply_contraction)
        wave = 0.15 * torch.sin(5 * u[..., 0]) * torch.cos(4 * u[..., 1])
        return rgb, 0.01 * density + 40 * torch.sigmoid(25 * (u[..., 2] - self.surface - wave))


def _model(surface: float, use_affine: bool) -> SurfaceModel:
    torch.manual_seed(0)
    m = SurfaceModel(num_imgs=T, h=H, w=W, num_samples_ray=K, use_affine=use_affine).eval()
    m.surface = surface
    return m


@torch.no_grad()
def per_pair(model: OmniMotion, query_frame: int):
    """The straightforward path: one ``correspondences_and_occlusion`` call per target frame (the
    query frame itself is the query pixel, visible, as in the original's viz)."""
    ys, xs = np.mgrid[0:model.h, 0:model.w]
    px = torch.from_numpy(np.stack([xs.ravel(), ys.ravel()], -1)).float()
    tracks = np.zeros((len(px), model.num_imgs, 2), np.float32)
    scores = np.zeros((len(px), model.num_imgs), np.float32)
    for j in range(model.num_imgs):
        if j == query_frame:
            tracks[:, j] = px.numpy()
            continue
        px2, score, _ = model.correspondences_and_occlusion([query_frame], px[None], [j], use_max_loc=True)
        tracks[:, j], scores[:, j] = px2[0].numpy(), score[0, :, 0].numpy()
    return tracks, scores > OCCLUSION_TH, scores


def _timed(fn, rounds=2):
    best, out = float("inf"), None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


@pytest.mark.parametrize("surface", [0.25, 1.0, 1.75], ids=["near", "mid", "far"])
def test_dense_query(benchmark, surface):
    use_affine = True  # the original's default config
    model = _model(surface, use_affine)
    slow_s, (t_ref, o_ref, s_ref) = _timed(lambda: per_pair(model, QUERY_FRAME))
    tracks, occluded, scores = benchmark.pedantic(
        lambda: dense_tracks(model, QUERY_FRAME, use_max_loc=True, occlusion_th=OCCLUSION_TH),
        rounds=2, iterations=1)
    np.testing.assert_allclose(tracks, t_ref, atol=1e-3)
    np.testing.assert_allclose(scores, s_ref, atol=1e-4)
    near_th = np.abs(s_ref - OCCLUSION_TH) < 1e-4  # float32 ties at the threshold may flip
    assert (occluded == o_ref)[~near_th].all()
    fast_s = benchmark.stats.stats.min
    pixels = H * W * (T - 1)
    benchmark.extra_info.update(
        shape=f"{H}x{W}x{T} frames, K={K}", surface_depth=surface, use_affine=use_affine,
        per_pair_s=slow_s, fast_s=fast_s, speedup=slow_s / fast_s, pixel_frames_per_s=pixels / fast_s,
        occluded_fraction=float(o_ref.mean()), threads=torch.get_num_threads())
    print(f"\n[dense query] surface {surface}, affine={use_affine}: per-pair {slow_s:.2f} s, fast {fast_s:.2f} s, "
          f"x{slow_s / fast_s:.1f}, occluded {o_ref.mean():.2f}")
    assert fast_s < slow_s
