"""The pipeline around the optimization: a video -> its preprocessed sequence -> a trained model
(:func:`fastomni.optimize.optimize`) -> tracks of query points in the video's pixels.

A pipeline run folder holds the optimization's files (see :mod:`fastomni.optimize`) and::

    RUN/seq/        the preprocessed sequence (frames at the model's size, pairwise flow)
    RUN/video.json  the input's size, the model's size, the frame count and the frames' sha256
    RUN/tracks.npz  the tracks (``fastomni.query.save_tracks``)

Example::

    >>> from fastomni.config import preset
    >>> out = track_video("clip.mp4", [[0, 40.0, 60.0]], "runs/clip", preset("cpu"))   # doctest: +SKIP
    >>> out["tracks"].shape                                                           # doctest: +SKIP
    (1, 24, 2)
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np

from fastomni._atomic import write_atomic_text
from fastomni.config import Config
from fastomni.inputs import InputError, check_query_points, read_json
from fastomni.optimize import optimize
from fastomni.query import rescale_points

__all__ = ["VIDEO_INFO_KEYS", "model_tracks", "prepare_sequence", "queries_to_model", "read_video_info", "track_video",
           "tracks_to_video"]

VIDEO_INFO_KEYS = ("video_size", "model_size", "num_frames", "sha256")


def read_video_info(run_dir: str) -> dict:
    """``run_dir/video.json`` (written by :func:`prepare_sequence`), checked: ``video_size`` and
    ``model_size`` as ``(h, w)`` tuples of positive ints. Raises ``FileNotFoundError`` or
    :class:`~fastomni.inputs.InputError`."""
    path = os.path.join(run_dir, "video.json")
    info = read_json(path, "video info", VIDEO_INFO_KEYS)
    for key in ("video_size", "model_size"):
        v = info[key]
        if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v)):
            raise InputError(f"video info {path}: {key} must be [h, w], positive integers, got {v!r}")
        info[key] = tuple(v)
    return info


def prepare_sequence(video, run_dir: str, cfg: Config, progress: bool = True, max_interval: int | None = None,
                     flow_preset: str | None = None) -> tuple[str, dict]:
    """Read ``video`` (a file, a frame folder or ``[T, H, W, 3]`` uint8), downscale it to
    ``cfg.max_side``, keep ``cfg.num_imgs`` frames and preprocess it into ``run_dir/seq``.

    Returns ``(seq_dir, info)`` with ``info = {"video_size": (h, w), "model_size": (h, w),
    "num_frames": T, "sha256": of the frames}``, also written to ``run_dir/video.json``. A second
    call with the same video reuses the stored frames and valid flows. ``flow_preset``: None for
    :func:`~fastomni.preprocess.default_flow_preset` of ``cfg``.
    """
    from fastomni.io import check_frames, load_video
    from fastomni.preprocess import default_flow_preset, preprocess

    if isinstance(video, np.ndarray):
        full = check_frames(video, "video", min_frames=2)[: cfg.num_imgs]
    else:
        full = load_video(video, max_frames=cfg.num_imgs)
    h, w = full.shape[1:3]
    frames = full
    if cfg.max_side and max(h, w) > cfg.max_side:
        scale = cfg.max_side / max(h, w)
        size = (max(2, round(h * scale)), max(2, round(w * scale)))
        import cv2

        frames = np.stack([cv2.resize(f, (size[1], size[0]), interpolation=cv2.INTER_AREA) for f in full])
    info = {"video_size": [int(h), int(w)], "model_size": [int(frames.shape[1]), int(frames.shape[2])],
            "num_frames": int(frames.shape[0]), "sha256": hashlib.sha256(frames.tobytes()).hexdigest()}
    os.makedirs(run_dir, exist_ok=True)
    seq_dir = os.path.join(run_dir, "seq")
    info_path = os.path.join(run_dir, "video.json")
    same = (os.path.isfile(info_path) and os.path.isdir(os.path.join(seq_dir, "color"))
            and read_video_info(run_dir)["sha256"] == info["sha256"])
    # The stored frames of this very video are reused as they are (a pixel-wise comparison with
    # fresh frames would have to allow for JPEG noise); another video is left to preprocess to refuse.
    preprocess(seq_dir if same else frames, seq_dir, max_interval=max_interval, progress=progress,
               flow_preset=flow_preset or default_flow_preset(cfg), pair_near=cfg.pair_near,
               frame_format=cfg.frame_format)
    write_atomic_text(info_path, json.dumps(info, indent=1) + "\n")
    return seq_dir, info


def queries_to_model(query_points, video_size, model_size) -> np.ndarray:
    """Query points ``[N, 3]`` (t, y, x) in the video's pixels -> the model's (float64); a border
    query stays on the border pixel."""
    q = np.asarray(query_points, np.float64).copy()
    q[:, [2, 1]] = rescale_points(q[:, [2, 1]], video_size, model_size)
    q[:, 2] = q[:, 2].clip(0, model_size[1] - 1)
    q[:, 1] = q[:, 1].clip(0, model_size[0] - 1)
    return q


def tracks_to_video(tracks, query_points, model_size, video_size) -> np.ndarray:
    """Tracks ``[N, T, 2]`` in the model's pixels -> the video's (float32), each query's own frame
    set to the query (``query_points [N, 3]`` (t, y, x), the video's pixels) exactly."""
    q = np.asarray(query_points)
    out = rescale_points(tracks, model_size, video_size).astype(np.float32)
    out[np.arange(len(q)), q[:, 0].astype(np.int64)] = q[:, [2, 1]]
    return out


def model_tracks(model, query_points, cfg: Config, seq_dir: str, progress: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`fastomni.query.track_points` of ``query_points [N, 3]`` (t, y, x) in the model's pixels,
    then, when ``cfg.refine_interval`` is set, the refinement on ``seq_dir``'s flow, the re-finding
    after occlusions and the alignment to the query (:func:`fastomni.refine.refiner`). Returns
    ``(tracks [N, T, 2], occluded [N, T], scores [N, T])``, model pixels."""
    from fastomni.query import track_points
    from fastomni.refine import refiner

    tracks, occluded, scores = track_points(model, query_points, cfg.use_max_loc, cfg.occlusion_th, cfg.chunk_size,
                                            progress=progress)
    refine = refiner(seq_dir, cfg)
    if refine is not None:
        tracks, occluded = refine(tracks, occluded, query_points, progress=progress)
    return tracks, occluded, scores


def track_video(video, query_points, run_dir: str, cfg: Config, half: bool = False, progress: bool = True,
                max_interval: int | None = None, flow_preset: str | None = None) -> dict:
    """The whole pipeline for query points of a video: :func:`prepare_sequence`, :func:`optimize`
    (resuming when ``run_dir`` holds checkpoints), :func:`model_tracks`, and
    ``run_dir/tracks.npz`` in the video's pixels.

    query_points: ``[N, 3]`` rows (t, y, x) in the video's pixels, ``N >= 1``, checked before any work.
    Returns ``{"path", "tracks" [N, T, 2], "occluded" [N, T], "scores" [N, T], "timings"}`` (seconds
    per stage).
    """
    from fastomni.io import check_frames, load_video
    from fastomni.query import save_tracks

    timings = {}
    start = time.perf_counter()
    frames = (check_frames(video, "video", min_frames=2) if isinstance(video, np.ndarray)
              else load_video(video, max_frames=cfg.num_imgs))[: cfg.num_imgs]
    q = check_query_points(query_points, len(frames), *frames.shape[1:3])
    seq_dir, info = prepare_sequence(frames, run_dir, cfg, progress, max_interval, flow_preset)
    timings["preprocess"] = time.perf_counter() - start
    result = optimize(seq_dir, run_dir, cfg, progress)
    timings["optimize"] = result.seconds
    start = time.perf_counter()
    video_size, model_size = tuple(info["video_size"]), tuple(info["model_size"])
    tracks, occluded, scores = model_tracks(result.model, queries_to_model(q, video_size, model_size), cfg, seq_dir,
                                            progress)
    tracks = tracks_to_video(tracks, q, model_size, video_size)
    path = save_tracks(os.path.join(run_dir, "tracks.npz"), tracks, occluded, q, scores, video_size, half=half)
    timings["track"] = time.perf_counter() - start
    return {"path": path, "tracks": tracks, "occluded": occluded, "scores": scores, "timings": timings}
