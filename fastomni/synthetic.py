"""Synthetic videos with exact ground-truth tracks and occlusions.

A textured background seen by a panning, zooming camera and textured foreground objects
(ellipses and rounded squares) that translate, rotate and scale and pass in front of one another.
Every layer ``L`` is a texture image plus, per frame ``t``, an affine map ``A_{L,t}`` from texture
pixels to screen pixels, so a surface point's position in any frame is exact: a query pixel ``p``
in frame ``q`` on layer ``L`` (the topmost there) is ``u = A_{L,q}^-1 p`` on the texture and
``A_{L,t} u`` in frame ``t``, visible where ``L`` is again the topmost layer and inside the image.

Coordinates: pixel centers at integers (``x`` in ``[0, w-1]``), the convention of the rest of
fastomni; normalized points are ``(x / w, y / h)`` as in TAP-Vid (``tapvid_metrics`` rescales them
with the same factors). Out-of-image points count as occluded, as in TAP-Vid.

Example::

    >>> v = make_video(num_frames=4, h=32, w=32, num_points=8)
    >>> v.frames.shape, v.points.shape, v.occluded.shape, v.query_points.shape
    ((4, 32, 32, 3), (8, 4, 2), (8, 4), (8, 3))
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np

from fastomni.io import atomic_output, check_frames, write_frames, write_video

__all__ = ["SyntheticVideo", "make_video", "write_synthetic"]


@dataclass
class SyntheticVideo:
    """A rendered video and its ground truth.

    frames: ``[T, H, W, 3]`` uint8 RGB. points: ``[N, T, 2]`` float32 ``(x / w, y / h)``.
    occluded: ``[N, T]`` bool (hidden behind another layer or outside the image).
    query_points: ``[N, 3]`` float32 ``(t, y, x)`` in pixels, ``t`` an integer frame index; the
    point is visible there.
    """

    frames: np.ndarray
    points: np.ndarray
    occluded: np.ndarray
    query_points: np.ndarray


@dataclass
class _Layer:
    texture: np.ndarray          # [th, tw, 3] float32, 0..255
    maps: np.ndarray             # [T, 2, 3] float64: texture pixel -> screen pixel
    shape: str                   # "full" (background), "ellipse" or "square" (rounded, superellipse)
    half_axes: tuple[float, float]  # (a, b) of the shape around the texture center, texture pixels

    def inside(self, uv: np.ndarray) -> np.ndarray:
        """Whether texture points ``uv [..., 2]`` lie on this layer's shape."""
        if self.shape == "full":
            return np.ones(uv.shape[:-1], bool)
        cx, cy = (self.texture.shape[1] - 1) / 2, (self.texture.shape[0] - 1) / 2
        dx, dy = np.abs(uv[..., 0] - cx) / self.half_axes[0], np.abs(uv[..., 1] - cy) / self.half_axes[1]
        power = 2 if self.shape == "ellipse" else 4
        return dx ** power + dy ** power <= 1.0


def _affine(scale: float, angle: float, tex_center, screen_pos) -> np.ndarray:
    """2x3 map ``p = R(angle) * scale * (u - tex_center) + screen_pos``."""
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    m = np.array([[c, -s], [s, c]])
    return np.concatenate([m, (np.asarray(screen_pos) - m @ np.asarray(tex_center))[:, None]], axis=1)


def _apply(maps: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Apply 2x3 maps ``[..., 2, 3]`` to points ``[..., 2]`` (broadcast)."""
    return np.einsum("...ij,...j->...i", maps[..., :2], xy) + maps[..., 2]


def _invert(maps: np.ndarray) -> np.ndarray:
    inv_lin = np.linalg.inv(maps[..., :2])
    return np.concatenate([inv_lin, -np.einsum("...ij,...j->...i", inv_lin, maps[..., 2])[..., None]], axis=-1)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A colourful texture ``[h, w, 3]`` float32: multi-octave smooth colour noise plus random
    antialiased circles, boxes and lines (corners and edges for optical flow to lock on)."""
    base = rng.uniform(40, 215, size=3)
    tex = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((3, 50.0), (7, 30.0), (17, 24.0), (41, 18.0)):
        noise = rng.normal(size=(cells, cells, 3)).astype(np.float32)
        tex += amp * cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
    tex = np.clip(tex + base, 0, 255)
    for _ in range(max(6, h * w // 500)):
        colour = tuple(float(c) for c in rng.uniform(0, 255, size=3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        size = int(rng.integers(2, max(3, min(h, w) // 12)))
        kind = rng.integers(3)
        if kind == 0:
            cv2.circle(tex, (x, y), size, colour, -1, cv2.LINE_AA)
        elif kind == 1:
            cv2.rectangle(tex, (x, y), (x + size, y + int(rng.integers(2, size + 2))), colour, -1, cv2.LINE_AA)
        else:
            x2, y2 = x + int(rng.integers(-3 * size, 3 * size)), y + int(rng.integers(-3 * size, 3 * size))
            cv2.line(tex, (x, y), (x2, y2), colour, int(rng.integers(1, 3)), cv2.LINE_AA)
    return cv2.GaussianBlur(tex, (0, 0), 0.6)


def _build_layers(rng: np.random.Generator, num_frames: int, h: int, w: int, num_objects: int) -> list[_Layer]:
    tau = np.linspace(0.0, 1.0, num_frames)
    # Background: a texture twice the frame's size, zooming in (1 -> up to 1.3) while panning by
    # up to a quarter frame, so the visible window always stays on the texture.
    bh, bw = 2 * h, 2 * w
    zoom = 1.0 + rng.uniform(0.1, 0.3) * tau
    pan = rng.uniform(-0.25, 0.25, size=2) * np.array([w, h])
    bg_maps = np.stack([_affine(z, 0.0, ((bw - 1) / 2 + pan[0] * t, (bh - 1) / 2 + pan[1] * t),
                                ((w - 1) / 2, (h - 1) / 2)) for z, t in zip(zoom, tau)])
    layers = [_Layer(_texture(rng, bh, bw), bg_maps, "full", (0.0, 0.0))]
    # Objects cross the frame along paths through its middle (left->right, right->left,
    # top->bottom, ...), so they pass in front of each other around mid-video.
    side = min(h, w)
    for k in range(num_objects):
        a, b = rng.uniform(0.12, 0.22, size=2) * side
        th, tw = int(np.ceil(2 * b)) + 3, int(np.ceil(2 * a)) + 3
        direction = [(1, 0), (-1, 0), (0, 1), (0, -1)][k % 4]
        start = np.array([0.5 - 0.32 * direction[0], 0.5 - 0.32 * direction[1]]) + rng.uniform(-0.1, 0.1, 2)
        end = np.array([0.5 + 0.32 * direction[0], 0.5 + 0.32 * direction[1]]) + rng.uniform(-0.1, 0.1, 2)
        centers = (start[None] + (end - start)[None] * tau[:, None]) * np.array([w - 1, h - 1])
        angle = rng.uniform(0, 2 * np.pi) + rng.uniform(-1.5, 1.5) * tau
        scale = 1.0 + 0.15 * np.sin(2 * np.pi * tau * rng.uniform(0.5, 1.5) + rng.uniform(0, 2 * np.pi))
        maps = np.stack([_affine(s, ang, ((tw - 1) / 2, (th - 1) / 2), c) for s, ang, c in zip(scale, angle, centers)])
        layers.append(_Layer(_texture(rng, th, tw), maps, "ellipse" if k % 2 == 0 else "square", (a, b)))
    # Random depth order of the objects (the background stays at the back).
    order = rng.permutation(num_objects) + 1
    return [layers[0]] + [layers[i] for i in order]


def _top_layer(layers: list[_Layer], t: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Index of the topmost layer at screen points ``xy [M, 2]`` in frames ``t [M]``."""
    top = np.zeros(len(xy), np.int64)
    for i, layer in enumerate(layers[1:], start=1):
        uv = _apply(_invert(layer.maps[t]), xy)
        top[layer.inside(uv)] = i
    return top


def _render(layers: list[_Layer], t: int, h: int, w: int) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    screen = np.stack([xs, ys], axis=-1)
    out = np.zeros((h, w, 3), np.float32)
    # 4x4 sub-pixel samples give each object's edge a coverage (antialiased) alpha.
    sub = (np.arange(4) + 0.5) / 4 - 0.5
    for layer in layers:
        inv = _invert(layer.maps[t])
        uv = _apply(inv, screen).astype(np.float32)
        colour = cv2.remap(layer.texture, uv[..., 0], uv[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        if layer.shape == "full":
            out = colour
            continue
        alpha = np.zeros((h, w), np.float32)
        for dy in sub:
            for dx in sub:
                alpha += layer.inside(_apply(inv, screen + np.array([dx, dy])))
        alpha = (alpha / sub.size ** 2)[..., None]
        out = alpha * colour + (1 - alpha) * out
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def make_video(num_frames: int = 24, h: int = 128, w: int = 128, num_points: int = 256, seed: int = 0,
               num_objects: int = 3) -> SyntheticVideo:
    """Render a synthetic video with exact ground-truth tracks (see the module docstring).

    Half of the query points (on average) lie on foreground objects at their query frame, the rest
    anywhere. Query frames are uniform over the video, not each point's first visible frame, so
    evaluate with ``tapvid_metrics(..., query_mode="strided")``. Deterministic in ``seed``.
    """
    for name, value, low in (("num_frames", num_frames, 2), ("h", h, 16), ("w", w, 16),
                             ("num_points", num_points, 1), ("num_objects", num_objects, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    rng = np.random.default_rng(seed)
    layers = _build_layers(rng, num_frames, h, w, num_objects)
    frames = np.stack([_render(layers, t, h, w) for t in range(num_frames)])

    # Query points: frame uniform; position uniform, or (half the time) on an object's pixel.
    q_t = rng.integers(0, num_frames, size=num_points)
    q_xy = rng.uniform(0, 1, size=(num_points, 2)) * np.array([w - 1, h - 1])
    want_fg = rng.uniform(size=num_points) < 0.5
    ys, xs = np.mgrid[0:h, 0:w]
    grid = np.stack([xs.ravel(), ys.ravel()], axis=-1).astype(np.float64)
    for t in np.unique(q_t[want_fg]):
        idx = np.flatnonzero(want_fg & (q_t == t))
        fg = grid[_top_layer(layers, np.full(len(grid), t), grid) > 0]
        if len(fg):
            q_xy[idx] = np.clip(fg[rng.integers(0, len(fg), size=len(idx))] + rng.uniform(-0.5, 0.5, (len(idx), 2)),
                                0, [w - 1, h - 1])
    q_layer = _top_layer(layers, q_t, q_xy)

    points = np.zeros((num_points, num_frames, 2))
    for li, layer in enumerate(layers):
        sel = np.flatnonzero(q_layer == li)
        if len(sel) == 0:
            continue
        uv = _apply(_invert(layer.maps[q_t[sel]]), q_xy[sel])  # [n, 2] texture coordinates
        points[sel] = _apply(layer.maps[None], uv[:, None])       # [n, T, 2]
    frame_ids = np.broadcast_to(np.arange(num_frames), (num_points, num_frames))
    on_top = _top_layer(layers, frame_ids.ravel(), points.reshape(-1, 2)).reshape(num_points, num_frames)
    in_image = ((points[..., 0] >= 0) & (points[..., 0] <= w - 1) & (points[..., 1] >= 0) & (points[..., 1] <= h - 1))
    occluded = ~(in_image & (on_top == q_layer[:, None]))
    occluded[np.arange(num_points), q_t] = False  # the query itself (floating-point round trip)

    return SyntheticVideo(
        frames=frames,
        points=(points / np.array([w, h])).astype(np.float32),
        occluded=occluded,
        query_points=np.stack([q_t, q_xy[:, 1], q_xy[:, 0]], axis=-1).astype(np.float32),
    )


def write_synthetic(video: SyntheticVideo, out_dir, frames: bool = True, mp4: bool = True, fps: float = 10) -> str:
    """Write ``video`` to ``out_dir``: ``color/00000.jpg ...`` (if ``frames``), ``video.mp4`` (if
    ``mp4``) and ``gt.npz`` in TAP-Vid's layout: ``video [T,H,W,3]`` uint8, ``points [N,T,2]``
    normalized (x, y), ``occluded [N,T]`` bool, plus ``query_points [N,3]`` (t, y, x) pixels.
    Returns ``out_dir``."""
    if not isinstance(video, SyntheticVideo):
        raise TypeError(f"video must be a SyntheticVideo, got {type(video).__name__}")
    check_frames(video.frames, "video.frames", min_frames=2)
    t = video.frames.shape[0]
    n = video.query_points.shape[0] if video.query_points.ndim == 2 else -1
    if video.points.shape != (n, t, 2) or video.occluded.shape != (n, t) or video.query_points.shape != (n, 3):
        raise ValueError(f"inconsistent ground truth: points {video.points.shape}, occluded {video.occluded.shape}, "
                         f"query_points {video.query_points.shape} for {t} frames")
    if not np.isfinite(video.points).all() or not np.isfinite(video.query_points).all():
        raise ValueError("ground-truth points contain NaN or inf")
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"{out_dir} exists and is not a folder")
    os.makedirs(out_dir, exist_ok=True)
    if frames:
        write_frames(video.frames, out_dir)
    if mp4:
        write_video(video.frames, os.path.join(out_dir, "video.mp4"), fps=fps)
    with atomic_output(os.path.join(out_dir, "gt.npz")) as tmp:
        np.savez(tmp, video=video.frames, points=video.points.astype(np.float32),
                 occluded=video.occluded.astype(bool), query_points=video.query_points.astype(np.float32))
    return out_dir
