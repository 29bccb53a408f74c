"""Videos of the TAP-Vid benchmark (DeepMind's ``tapvid_davis.pkl``, ``tapvid_rgb_stacking.pkl``,
``tapvid_kinetics`` shards) as fastomni inputs: frames, query points and ground truth.

A TAP-Vid pickle holds a dict ``{name: entry}`` (DAVIS, RGB-Stacking) or a list of entries
(Kinetics); an entry has ``video`` (``[T, H, W, 3]`` uint8, or a list of frames or of JPEG bytes),
``points`` ``[N, T, 2]`` normalized (x, y) and ``occluded`` ``[N, T]`` bool. Queries are sampled as
TAP-Vid's evaluation does: ``first``, each point at its first visible frame; ``strided``, each
point at every 5th frame where it is visible (one row per query, the point's track repeated).

Only open pickles you trust: unpickling can run code.

Example::

    >>> video = load_tapvid("tapvid_davis.pkl", "bear", "first")   # doctest: +SKIP
    >>> write_synthetic(video, "bear")  # frames, video.mp4, gt.npz   # doctest: +SKIP
"""
from __future__ import annotations

import os
import pickle

import cv2
import numpy as np

from fastomni.io import check_frames
from fastomni.synthetic import SyntheticVideo

__all__ = ["QUERY_STRIDE", "load_tapvid", "sample_queries", "tapvid_names"]

QUERY_STRIDE = 5  # TAP-Vid's strided query sampling


def _read(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"TAP-Vid file not found: {path}")
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file to the user
        raise ValueError(f"{path} is not a readable TAP-Vid pickle: {exc}") from None


def _entries(data, path: str) -> dict:
    if isinstance(data, dict) and {"video", "points", "occluded"} <= set(data):
        return {"0": data}  # a single entry
    if isinstance(data, dict):
        return {str(k): v for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return {str(i): v for i, v in enumerate(data)}
    raise ValueError(f"{path} holds a {type(data).__name__}; a TAP-Vid pickle holds a dict or list of videos")


def tapvid_names(path: str) -> list[str]:
    """The video names of a TAP-Vid pickle (list indices as strings for Kinetics-style lists)."""
    return list(_entries(_read(path), path))


def _decode(video, name: str) -> np.ndarray:
    if isinstance(video, np.ndarray) and video.dtype == np.uint8 and video.ndim == 4:
        return check_frames(np.ascontiguousarray(video), f"video {name!r}", min_frames=2)
    if isinstance(video, (list, tuple)) and video and all(isinstance(f, np.ndarray) and f.ndim == 3 for f in video):
        return _decode(np.stack(video), name)  # decoded frames in a list
    if isinstance(video, (list, tuple)) and video and isinstance(video[0], (bytes, bytearray, np.ndarray)):
        frames = []
        for k, item in enumerate(video):
            img = cv2.imdecode(np.frombuffer(bytes(item) if not isinstance(item, np.ndarray) else item.tobytes(),
                                             np.uint8), cv2.IMREAD_COLOR)
            if img is None:
                raise ValueError(f"video {name!r}: frame {k} is not a decodable image")
            frames.append(img[..., ::-1])
        return check_frames(np.ascontiguousarray(np.stack(frames)), f"video {name!r}", min_frames=2)
    raise ValueError(f"video {name!r}: 'video' must be [T, H, W, 3] uint8 or a list of encoded frames")


def sample_queries(points: np.ndarray, occluded: np.ndarray, h: int, w: int, mode: str = "first"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """TAP-Vid's query sampling. ``points [N, T, 2]`` normalized (x, y), ``occluded [N, T]``.

    Returns ``(rows [M], query_points [M, 3])``: the track each query belongs to and the query
    ``(t, y, x)`` in pixels of an ``h x w`` frame. Points never visible get no query."""
    if mode not in ("first", "strided"):
        raise ValueError(f"query mode must be 'first' or 'strided', got {mode!r}")
    visible = ~occluded
    if mode == "first":
        rows = np.flatnonzero(visible.any(axis=1))
        frames = visible[rows].argmax(axis=1)
    else:
        starts = np.arange(0, points.shape[1], QUERY_STRIDE)
        frames_grid, rows_grid = np.nonzero(visible[:, starts].T)  # frame-major, as TAP-Vid orders them
        rows, frames = rows_grid, starts[frames_grid]
    xy = points[rows, frames] * np.array([w, h], np.float64)
    x, y = np.clip(xy[:, 0], 0, w - 1), np.clip(xy[:, 1], 0, h - 1)
    return rows, np.stack([frames, y, x], axis=1).astype(np.float32)


def load_tapvid(path: str, name: str, mode: str = "first") -> SyntheticVideo:
    """Video ``name`` of the TAP-Vid pickle ``path`` with its queries sampled in ``mode``
    (``first`` or ``strided``): frames ``[T, H, W, 3]``, ``points [M, T, 2]`` normalized,
    ``occluded [M, T]`` and ``query_points [M, 3]`` (t, y, x) pixels, one row per query; ready for
    :func:`fastomni.synthetic.write_synthetic`, ``fastomni track`` and ``fastomni eval``."""
    entries = _entries(_read(path), path)
    if name not in entries:
        shown = ", ".join(list(entries)[:20]) + (", ..." if len(entries) > 20 else "")
        raise KeyError(f"{path} has no video {name!r}; it has: {shown}")
    entry = entries[name]
    if not isinstance(entry, dict) or not {"video", "points", "occluded"} <= set(entry):
        raise ValueError(f"video {name!r} of {path} lacks 'video', 'points' or 'occluded'")
    frames = _decode(entry["video"], name)
    t, h, w = frames.shape[:3]
    points = np.asarray(entry["points"], dtype=np.float32)
    occluded = np.asarray(entry["occluded"]).astype(bool)
    if points.ndim != 3 or points.shape[1:] != (t, 2) or occluded.shape != points.shape[:2]:
        raise ValueError(f"video {name!r}: points {points.shape} and occluded {occluded.shape} must be "
                         f"[N, {t}, 2] and [N, {t}] for its {t} frames")
    if not np.isfinite(points).all():
        raise ValueError(f"video {name!r}: points contain NaN or inf")
    rows, queries = sample_queries(points, occluded, h, w, mode)
    if len(rows) == 0:
        raise ValueError(f"video {name!r}: no point is ever visible, so there is nothing to query")
    return SyntheticVideo(frames=frames, points=points[rows], occluded=occluded[rows], query_points=queries)
