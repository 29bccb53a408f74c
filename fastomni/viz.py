"""Track visualisations drawn with OpenCV: an mp4 with point trails and a PNG of trajectories.

Points are coloured along the turbo colormap by their first visible position (top-to-bottom, then
left-to-right), so neighbours get similar colours and a tracking failure stands out as a colour
out of place. A non-finite position (no estimate, :func:`fastomni.metrics.no_estimate`) is not
drawn: neither the point nor a trail or path segment ending there. Frames smaller than 512 px on
their longer side are enlarged by an integer factor first, so the markers stay legible.

Example::

    >>> import numpy as np, tempfile, os
    >>> frames = np.zeros((4, 32, 32, 3), np.uint8)
    >>> tracks = np.tile(np.linspace(4, 28, 4, dtype=np.float32)[None, :, None], (3, 1, 2))
    >>> occluded = np.zeros((3, 4), bool)
    >>> out = plot_trajectories(frames, tracks, occluded, os.path.join(tempfile.mkdtemp(), "t.png"))
"""
from __future__ import annotations

import math
import os

import cv2
import numpy as np
from tqdm import tqdm

from fastomni.inputs import InputError, InputTypeError
from fastomni.io import atomic_output, check_frames, write_video
from fastomni.metrics import no_estimate

__all__ = ["render_trails", "plot_trajectories", "point_colors"]

MIN_SIDE = 512
_SHIFT = 4  # sub-pixel bits for OpenCV drawing


def _check_tracks(frames, tracks, occluded) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(frames, tracks float64 with non-finite entries set to 0, occluded or missing, missing
    [N, T] bool)``."""
    frames = check_frames(frames)
    t = frames.shape[0]
    tracks = np.asarray(tracks)
    if tracks.ndim != 3 or tracks.shape[1:] != (t, 2):
        raise InputError(f"tracks must have shape [N, {t}, 2] (x, y) for {t} frames, got {tracks.shape}")
    if tracks.dtype.kind not in "fiu":
        raise InputTypeError(f"tracks must be numeric, got {tracks.dtype}")
    occluded = np.asarray(occluded)
    if occluded.dtype != bool:
        raise InputTypeError(f"occluded must be a bool array, got {occluded.dtype}")
    if occluded.shape != tracks.shape[:2]:
        raise InputError(f"occluded must have shape {tracks.shape[:2]} (like tracks[..., 0]), got {occluded.shape}")
    missing = no_estimate(tracks)
    tracks = np.where(missing[..., None], 0.0, tracks.astype(np.float64))
    return frames, tracks, occluded | missing, missing


def _check_out(path, ext: str) -> str:
    path = os.fspath(path)
    if not path.lower().endswith(ext):
        raise InputError(f"output {path} must end in {ext}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder {folder} does not exist")
    return path


def point_colors(tracks: np.ndarray, occluded: np.ndarray) -> np.ndarray:
    """RGB uint8 colours ``[N, 3]`` along the turbo colormap, ordered by each point's first visible
    position (row-major; the frame-0 position for points never visible). ``tracks [N, T, 2]``,
    ``occluded [N, T]`` bool."""
    n = len(tracks)
    first = np.where((~occluded).any(axis=1), np.argmax(~occluded, axis=1), 0)
    start = tracks[np.arange(n), first]
    order = np.lexsort((start[:, 0], start[:, 1]))
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    # Turbo's darkest ends (near-black purple and maroon) vanish on dark footage: use 10%..90%.
    levels = np.round(26 + rank * 204 / max(n - 1, 1)).astype(np.uint8)
    bgr = cv2.applyColorMap(levels[:, None], cv2.COLORMAP_TURBO)[:, 0]
    return bgr[:, ::-1].copy()


def _scale(h: int, w: int) -> int:
    return max(1, math.ceil(MIN_SIDE / max(h, w)))


def _fixed(xy: np.ndarray, scale: int) -> tuple[int, int]:
    # Pixel centers at integers: x_big = (x + 0.5) * scale - 0.5, in OpenCV's fixed-point units.
    big = ((xy + 0.5) * scale - 0.5) * (1 << _SHIFT)
    return int(round(big[0])), int(round(big[1]))


def _enlarge(rgb: np.ndarray, scale: int) -> np.ndarray:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    return bgr if scale == 1 else cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)


def render_trails(frames: np.ndarray, tracks: np.ndarray, occluded: np.ndarray, out_path, trail: int = 10,
                  fps: float = 10, progress: bool = False) -> str:
    """Write an mp4 of ``frames [T, H, W, 3]`` uint8 RGB with each point of ``tracks [N, T, 2]``
    (x, y) pixels drawn at its current position, filled when visible and hollow when ``occluded
    [N, T]`` bool, trailing the segments of its last ``trail`` frames in which it is visible at
    both ends. Returns ``out_path``."""
    frames, tracks, occluded, missing = _check_tracks(frames, tracks, occluded)
    out_path = _check_out(out_path, ".mp4")
    if not isinstance(trail, (int, np.integer)) or isinstance(trail, bool) or trail < 0:
        raise InputError(f"trail must be an int >= 0, got {trail!r}")
    t_count, h, w = frames.shape[:3]
    scale = _scale(h, w)
    colors = [tuple(int(c) for c in rgb[::-1]) for rgb in point_colors(tracks, occluded)]
    radius_px = max(3, round(scale * min(h, w) / 80))
    radius, thick, ring = radius_px << _SHIFT, max(1, radius_px // 2), max(1, radius_px // 3)
    out = []
    for t in tqdm(range(t_count), desc="render trails", disable=not progress):
        img = _enlarge(frames[t], scale)
        for n, color in enumerate(colors):
            for s in range(max(0, t - trail), t):
                if not (occluded[n, s] or occluded[n, s + 1]):
                    cv2.line(img, _fixed(tracks[n, s], scale), _fixed(tracks[n, s + 1], scale), color, thick,
                             cv2.LINE_AA, _SHIFT)
        for n, color in enumerate(colors):
            if missing[n, t]:
                continue
            center = _fixed(tracks[n, t], scale)
            if occluded[n, t]:
                cv2.circle(img, center, radius, color, ring, cv2.LINE_AA, _SHIFT)
            else:
                cv2.circle(img, center, radius, color, -1, cv2.LINE_AA, _SHIFT)
                cv2.circle(img, center, radius, (0, 0, 0), 1, cv2.LINE_AA, _SHIFT)
        out.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    return write_video(np.stack(out), out_path, fps=fps)


def plot_trajectories(frames: np.ndarray, tracks: np.ndarray, occluded: np.ndarray, out_png) -> str:
    """Write a PNG of every trajectory of ``tracks [N, T, 2]`` (x, y) pixels over the first frame
    of ``frames [T, H, W, 3]`` uint8 RGB (dimmed): solid where the point is visible at both ends of
    a step, dotted where ``occluded [N, T]`` bool at either end, a filled dot at its first visible
    position. Returns ``out_png``."""
    frames, tracks, occluded, missing = _check_tracks(frames, tracks, occluded)
    out_png = _check_out(out_png, ".png")
    h, w = frames.shape[1:3]
    scale = _scale(h, w)
    img = cv2.addWeighted(_enlarge(frames[0], scale), 0.5, np.full((h * scale, w * scale, 3), 40, np.uint8), 0.5, 0)
    colors = [tuple(int(c) for c in rgb[::-1]) for rgb in point_colors(tracks, occluded)]
    thick = max(1, scale // 2)
    dot = max(1, scale // 2) << _SHIFT
    for n, color in enumerate(colors):
        for s in range(tracks.shape[1] - 1):
            a, b = tracks[n, s], tracks[n, s + 1]
            if missing[n, s] or missing[n, s + 1]:
                continue
            if occluded[n, s] or occluded[n, s + 1]:
                steps = max(2, int(np.hypot(*(b - a)) * scale / 4))
                for f in np.linspace(0, 1, steps)[::2]:
                    cv2.circle(img, _fixed(a + f * (b - a), scale), dot // 2, color, -1, cv2.LINE_AA, _SHIFT)
            else:
                cv2.line(img, _fixed(a, scale), _fixed(b, scale), color, thick, cv2.LINE_AA, _SHIFT)
        visible = np.flatnonzero(~occluded[n])
        if len(visible):
            cv2.circle(img, _fixed(tracks[n, visible[0]], scale), 2 * dot, color, -1, cv2.LINE_AA, _SHIFT)
    with atomic_output(out_png) as tmp:
        if not cv2.imwrite(tmp, img):
            raise OSError(f"OpenCV failed to write {tmp}")
    return out_png
