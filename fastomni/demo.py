"""``fastomni demo``: the whole method on a synthetic clip with exact ground truth, in minutes on a CPU.

1. :func:`fastomni.synthetic.make_video` renders the clip (textured objects passing in front of
   one another over a panning background) with its ground-truth tracks, occlusions and query
   points; written to ``OUT/data`` (frames, ``video.mp4``, ``gt.npz``).
2. :func:`fastomni.pipeline.track_video`: preprocess (pairwise flow), optimize (the ``fast``
   preset by default without a GPU), track the ground-truth query points -> ``OUT/tracks.npz``.
3. The chained-flow baseline tracks the same points -> ``OUT/baseline_tracks.npz``.
4. TAP-Vid metrics (query-first and strided) and temporal coherence of both, printed side by side
   and written to ``OUT/metrics.json``; trails of OmniMotion's tracks -> ``OUT/trails.mp4``.

Interrupted (Ctrl-C), it saves a checkpoint; the same command resumes.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from fastomni.config import Config
from fastomni.inputs import InputError, as_input_errors

__all__ = ["PRESET_DEFAULTS", "format_table", "run_demo"]

DEFAULT_SIZE = 64  # the demo clip: 24 frames of 64 x 64 (a few minutes on one CPU thread)
# The demo's own steps per preset, unless a flag or config file sets them: with the refinement, the
# fast preset's tracks of this clip score the same at 1,800 steps as at 2,400 (README, the demo).
PRESET_DEFAULTS = {"fast": {"num_iters": 1800}}
ROWS = ("average_jaccard", "average_pts_within_thresh", "occlusion_accuracy")


def format_table(metrics: dict) -> str:
    """The demo's comparison as text: one row per metric and query mode, a column per method."""
    methods = list(metrics)
    lines = [f"{'metric':<34}" + "".join(f"{m:>14}" for m in methods)]
    for mode in ("first", "strided"):
        for row in ROWS:
            lines.append(f"{row + ' (' + mode + ')':<34}" + "".join(f"{metrics[m][mode][row]:>14.3f}" for m in methods))
    lines.append(f"{'temporal_coherence (lower better)':<34}"
                 + "".join(f"{metrics[m]['temporal_coherence']:>14.3f}" for m in methods))
    return "\n".join(lines)


def run_demo(out_dir: str, cfg: Config, size: int | None = None, num_frames: int = 24, num_points: int = 256,
             seed: int = 0, progress: bool = True) -> dict:
    """Run the demo into ``out_dir`` (see the module docstring). ``size``: frame height and width
    (default 64). Returns ``{"metrics": {method: {...}}, "timings":
    {stage: seconds}, "paths": {...}}``."""
    from fastomni._atomic import write_atomic_text
    from fastomni.baseline import chained_flow_tracks
    from fastomni.metrics import evaluate_tracks
    from fastomni.pipeline import track_video
    from fastomni.query import save_tracks
    from fastomni.synthetic import make_video, write_synthetic
    from fastomni.viz import render_trails

    size = size if size is not None else DEFAULT_SIZE
    if num_frames < 3:
        raise InputError(f"num_frames must be >= 3 (temporal coherence compares 3 frames), got {num_frames}")
    if num_frames > cfg.num_imgs:
        raise InputError(f"num_frames ({num_frames}) exceeds num_imgs ({cfg.num_imgs}) of the config")
    start = time.perf_counter()
    timings = {}
    with as_input_errors():
        video = make_video(num_frames=num_frames, h=size, w=size, num_points=num_points, seed=seed)
    os.makedirs(out_dir, exist_ok=True)
    write_synthetic(video, os.path.join(out_dir, "data"))
    timings["synthesize"] = time.perf_counter() - start

    cfg = cfg.replace(max_side=0)  # the clip is rendered at the working size
    result = track_video(video.frames, video.query_points, out_dir, cfg, progress=progress)
    timings.update(result["timings"])

    t0 = time.perf_counter()
    b_tracks, b_occluded = chained_flow_tracks(video.frames, video.query_points)
    save_tracks(os.path.join(out_dir, "baseline_tracks.npz"), b_tracks, b_occluded, video.query_points,
                image_size=(size, size))
    timings["baseline"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    metrics = {}
    for name, (tracks, occluded) in {"omnimotion": (result["tracks"], result["occluded"]),
                                     "chained_flow": (b_tracks, b_occluded)}.items():
        metrics[name] = evaluate_tracks(tracks, occluded, video.points, video.occluded, video.query_points,
                                        (size, size))
    trails = render_trails(video.frames, result["tracks"], result["occluded"], os.path.join(out_dir, "trails.mp4"))
    timings["evaluate"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
    summary = {"metrics": metrics, "timings": timings,
               "paths": {"tracks": result["path"], "trails": trails, "ground_truth": os.path.join(out_dir, "data", "gt.npz")},
               "setup": {"size": size, "num_frames": num_frames, "num_points": num_points, "seed": seed,
                         "num_iters": cfg.num_iters, "occluded_gt_fraction": float(np.mean(video.occluded))}}
    write_atomic_text(os.path.join(out_dir, "metrics.json"), json.dumps(summary, indent=1) + "\n")
    return summary
