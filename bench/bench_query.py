"""Dense query: every pixel of one frame tracked to every frame with occlusion, the fast path
(:func:`fastomni.query.dense_tracks`) against the straightforward one (the original's
``get_correspondences_and_occlusion_masks_for_pixels`` per target frame, i.e.
``OmniMotion.correspondences_and_occlusion``). Both must give the same tracks and occlusion.

Run: ``pytest bench/bench_query.py --benchmark-only -s`` (a minute or two on 2 CPU cores; the
speed-up is printed and stored in ``extra_info``).

The complete field (every pixel of every frame to every frame, :mod:`fastomni.field`: per-frame
occlusion tables) against the per-pair path on the same pixels and frames:
``python bench/bench_query.py --field --json OUT.json`` (24 frames of 8x8, K=32 by default; about
ten minutes on a loaded 2-core CPU) writes ``speedup`` (wall time; ``speedup_cpu_time`` from the
process's CPU time), ``occlusion_agreement`` (flags equal to the per-pair path's),
``track_identical_fraction`` (among the agreeing flags, tracks within 1e-3 px) and the FLOPs per
(pixel, target) of each path (GEMM FLOPs per point of each network, counted by
``torch.utils.flop_counter`` on the reference backend, times the network evaluations each path
makes).

The fast path's cost per pixel and target frame depends on how many samples lie in front of the
mapped point (those are the only ones the occlusion score needs), so the model here has an
opaque surface at a chosen depth (near, middle or far of the [0, 2] range) on top of its real
colour network; a trained model's surfaces lie at scene-dependent depths.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import pytest
import torch

from fastomni.field import OcclusionTables, field_tracks
from fastomni.nn import OmniMotion
from fastomni.ops import use_backend
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


def _model(surface: float, use_affine: bool, shape=(H, W, T, K)) -> SurfaceModel:
    torch.manual_seed(0)
    h, w, t, k = shape
    m = SurfaceModel(num_imgs=t, h=h, w=w, num_samples_ray=k, use_affine=use_affine).eval()
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


# -- the complete field ------------------------------------------------------------------------------
def complete_field(model: OmniMotion):
    """Every frame's pixels to every frame through the occlusion tables: ``[T, H*W, T, ...]``."""
    tables = OcclusionTables(model)
    out = [field_tracks(model, i, tables, occlusion_th=OCCLUSION_TH) for i in range(model.num_imgs)]
    return tuple(np.stack(a) for a in zip(*out))


def complete_per_pair(model: OmniMotion):
    """The same with the per-pair path, one query frame after another."""
    out = [per_pair(model, i) for i in range(model.num_imgs)]
    return tuple(np.stack(a) for a in zip(*out))


def flops_per_point(model: OmniMotion, n: int = 4096) -> dict[str, float]:
    """GEMM FLOPs per point of a mapping to the canonical volume, from it, and a colour query
    (``torch.utils.flop_counter`` on the reference backend)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, n, 3) - 0.5
    calls = {"to_canonical": lambda: model.map_to_canonical(x, [0]),
             "from_canonical": lambda: model.map_from_canonical(x, [0]), "color": lambda: model.color_density(x)}
    out = {}
    with torch.no_grad(), use_backend("reference"):
        for name, call in calls.items():
            with FlopCounterMode(display=False) as counter:
                call()
            out[name] = counter.get_total_flops() / n
    return out


def field_comparison(size: int = 8, frames: int = 24, samples: int = 32, surface: float = 1.0) -> dict:
    """Time both paths once each on the same model (the original's networks, ``use_affine``), and
    compare: flags, tracks, FLOPs per (pixel, target)."""
    model = _model(surface, True, (size, size, frames, samples))
    cpu0 = time.process_time()
    field_s, (tracks, occluded, scores) = _timed(lambda: complete_field(model), rounds=1)
    cpu1 = time.process_time()
    pair_s, (t_ref, o_ref, s_ref) = _timed(lambda: complete_per_pair(model), rounds=1)
    cpu2 = time.process_time()
    other = ~np.eye(frames, dtype=bool)[:, None, :].repeat(size * size, 1)  # (query, pixel, target), target != query
    o_ref = o_ref | ((t_ref < 0) | (t_ref > size - 1)).any(-1)  # both report tracks leaving the image occluded
    agree = (occluded == o_ref)[other]
    dist = np.abs(tracks - t_ref).max(-1)[other]
    f = flops_per_point(model)
    # per (pixel, target != query): per pair 2K to-canonical, K from-canonical, 2K colour queries; field: one
    # from-canonical per (pixel, target) (T per pixel, the query frame's own included), tables K to-canonical
    # and K colour queries per pixel and frame, shared by the T - 1 other frames' queries
    pairs_per_pixel = frames * (frames - 1)
    per_pair_flops = samples * (2 * f["to_canonical"] + f["from_canonical"] + 2 * f["color"])
    field_flops = (frames * frames * f["from_canonical"]
                   + frames * samples * (f["to_canonical"] + f["color"])) / pairs_per_pixel
    return {
        "shape": {"h": size, "w": size, "frames": frames, "samples_per_ray": samples, "surface_depth": surface,
                  "family": model.family, "use_affine": True},
        "pairs": int(other.sum()), "field_s": field_s, "per_pair_s": pair_s, "speedup": pair_s / field_s,
        # CPU time of this process: on a machine shared with other jobs, wall time also counts the time
        # the job waited for a core, which differs between the two paths' minutes
        "field_cpu_s": cpu1 - cpu0, "per_pair_cpu_s": cpu2 - cpu1, "speedup_cpu_time": (cpu2 - cpu1) / (cpu1 - cpu0),
        "occlusion_agreement": float(agree.mean()),
        "track_identical_fraction": float((dist[agree] <= 1e-3).mean()),
        "track_max_abs_diff_px": float(dist.max()), "score_max_abs_diff": float(np.abs(scores - s_ref)[other].max()),
        "occluded_fraction": float(o_ref[other].mean()),
        "flops_per_point": f, "flops_per_pixel_target": {"per_pair": per_pair_flops, "field": field_flops},
        "flops_ratio": per_pair_flops / field_flops, "threads": torch.get_num_threads(),
    }


def test_complete_field(benchmark):
    """The complete field beside the per-pair path (small: 6 frames of 6x6, K=16; the 24-frame figure
    comes from the ``--field`` command)."""
    result = benchmark.pedantic(lambda: field_comparison(6, 6, 16), rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in result.items() if not isinstance(v, dict)})
    print(f"\n[complete field] x{result['speedup']:.1f}, flags agree {result['occlusion_agreement']:.4f}, "
          f"tracks identical {result['track_identical_fraction']:.4f}")
    assert result["occlusion_agreement"] >= 0.98 and result["track_identical_fraction"] == 1.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="the complete motion field against the per-pair path")
    parser.add_argument("--field", action="store_true", help="run the complete-field comparison")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--size", type=int, default=8, help="image height and width")
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--samples", type=int, default=32, help="samples per ray (K)")
    parser.add_argument("--surface", type=float, default=1.0, help="depth of the opaque surface in [0, 2]")
    args = parser.parse_args(argv)
    if not args.field:
        parser.error("nothing to do: give --field (the pytest benchmarks run with pytest)")
    result = field_comparison(args.size, args.frames, args.samples, args.surface)
    text = json.dumps(result, indent=1)
    if args.json:
        from fastomni._atomic import write_atomic_text

        write_atomic_text(args.json, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
