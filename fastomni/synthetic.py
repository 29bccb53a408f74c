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

Motions (``make_video(motion=...)``; each a different clip for the same seed):

* ``"objects"`` (the default): objects crossing the frame through its middle, rotating, pulsing in
  size and passing in front of one another, over a background that pans and zooms a little;
* ``"pan"``: the camera pans (20-35% of the frame) over a scene whose objects stand still;
* ``"zoom"``: the camera zooms in (to 1.35-1.6x) or out (to 0.7x) over a still scene;
* ``"rotation"``: the camera rolls (0.3-0.6 rad) while the objects spin (2-4 rad) in place;
* ``"nonrigid"``: every layer is warped smoothly, ``p = A_t u + a_t * sin(B u + phi_t)`` (per
  coordinate, ``a_t`` and ``phi_t`` varying over time), while the objects drift and the camera pans
  slowly. The map is a contraction plus an affine map (``|A_t^-1| |a_t B| <= 0.4``), so it is a
  bijection; rendering and ground truth invert it by fixed-point iteration, converged to 1e-6 px;
* ``"mixed"``: camera pan, zoom and roll, crossing and spinning objects, a warped background.

A layer's map from texture to screen is then ``C_t O_t`` (camera after object placement), plus the
warp; the ground truth follows the same maps, so it stays exact.

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

__all__ = ["MOTIONS", "SyntheticVideo", "make_video", "write_synthetic"]


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
    # Smooth non-rigid warp, added to the affine map: p = A_t u + amp[t] * sin(u @ freq.T + phase[t]),
    # amp [T, 2] and phase [T, 2] screen pixels / radians, freq [2, 2] radians per texture pixel.
    warp: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def to_screen(self, uv: np.ndarray, t) -> np.ndarray:
        """Screen points of texture points ``uv [..., 2]`` in frames ``t`` (an index, an index array
        or a slice, broadcast against ``uv``'s leading dimensions)."""
        xy = _apply(self.maps[t], uv)
        if self.warp is not None:
            amp, freq, phase = self.warp
            xy = xy + amp[t] * np.sin(uv @ freq.T + phase[t])
        return xy

    def to_texture(self, xy: np.ndarray, t) -> np.ndarray:
        """Texture points of screen points ``xy [..., 2]`` in frames ``t``: the inverse of
        :meth:`to_screen`, exact for affine layers, by fixed-point iteration
        ``u <- A_t^-1 (p - warp_t(u))`` for warped ones, until ``|to_screen(u) - p| < 1e-6`` px."""
        inv = _invert(self.maps[t])
        uv = _apply(inv, xy)
        if self.warp is None:
            return uv
        amp, freq, phase = self.warp
        amp, phase = amp[t], phase[t]
        previous = amp * np.sin(uv @ freq.T + phase)
        for _ in range(200):
            uv = _apply(inv, xy - previous)
            warp = amp * np.sin(uv @ freq.T + phase)
            # to_screen(uv) - xy = A uv + warp(uv) - xy = warp(uv) - warp(previous uv): the residual.
            if np.abs(warp - previous).max(initial=0.0) < 1e-6:
                return uv
            previous = warp
        raise RuntimeError("the inverse warp did not converge (the warp is not a contraction)")

    def jacobian(self, uv: np.ndarray, t) -> np.ndarray:
        """``d to_screen / d uv`` ``[..., 2, 2]`` at texture points ``uv [..., 2]`` in frames ``t``."""
        lin = self.maps[t][..., :2]
        if self.warp is None:
            return np.broadcast_to(lin, uv.shape + (2,))
        amp, freq, phase = self.warp
        return lin + (amp[t] * np.cos(uv @ freq.T + phase[t]))[..., None] * freq

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


MOTIONS = ("objects", "pan", "zoom", "rotation", "nonrigid", "mixed")

# Per motion: camera pan (fraction of the frame, range of its length), zoom at the last frame (range;
# "in_out": in to 1.35-1.6 or out to 0.7), camera roll (radians, range of its size), how the
# objects move, and which layers are warped.
_SCENES = {
    "pan": dict(pan=(0.2, 0.35), zoom=(1.0, 1.0), roll=(0.0, 0.0), objects="static", warp=()),
    "zoom": dict(pan=(0.0, 0.05), zoom="in_out", roll=(0.0, 0.0), objects="static", warp=()),
    "rotation": dict(pan=(0.0, 0.0), zoom=(1.0, 1.0), roll=(0.3, 0.6), objects="spin", warp=()),
    "nonrigid": dict(pan=(0.05, 0.1), zoom=(1.0, 1.0), roll=(0.0, 0.0), objects="drift",
                     warp=("background", "objects")),
    "mixed": dict(pan=(0.1, 0.2), zoom=(1.15, 1.35), roll=(0.15, 0.3), objects="cross_spin", warp=("background",)),
}


def _compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """2x3 maps ``[..., 2, 3]``: ``outer`` after ``inner``."""
    lin = outer[..., :2] @ inner[..., :2]
    return np.concatenate([lin, (_apply(outer, inner[..., 2]))[..., None]], axis=-1)


def _warp(rng: np.random.Generator, tau: np.ndarray, maps: np.ndarray, wavelength: float, amplitude: float):
    """A smooth warp ``amp[t] * sin(u @ freq.T + phase[t])`` for a layer with affine ``maps``: waves of
    ``wavelength`` texture pixels in random directions, travelling and breathing over time, their
    amplitude (screen pixels, at most ``amplitude``) capped so that ``|A_t^-1| |amp_t freq| <= 0.4``
    in every frame (a contraction: the fixed-point inverse converges)."""
    angles = rng.uniform(0, 2 * np.pi, size=2)
    freq = (2 * np.pi / wavelength) * rng.uniform(0.8, 1.25, size=(2, 1)) * np.stack([np.cos(angles), np.sin(angles)], 1)
    breathe = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.5, 1.0) * tau[:, None] + rng.uniform(0, 2 * np.pi, 2))
    amp = amplitude * breathe                                                          # [T, 2]
    phase = rng.uniform(0, 2 * np.pi, 2) + np.outer(tau, rng.choice([-1, 1], 2) * rng.uniform(np.pi, 2 * np.pi, 2))
    inv_norm = np.linalg.norm(np.linalg.inv(maps[:, :, :2]), ord=2, axis=(1, 2))        # [T]
    bound = inv_norm * np.linalg.norm(amp[:, :, None] * freq[None], ord=2, axis=(1, 2))
    amp = amp * np.minimum(1.0, 0.4 / bound.max())
    return amp, freq, phase


def _build_scene(rng: np.random.Generator, motion: str, num_frames: int, h: int, w: int,
                 num_objects: int) -> list[_Layer]:
    """The layers of a motion other than ``"objects"`` (see ``_SCENES``): a camera ``C_t`` (world ->
    screen; the world is the first frame's screen) over a background and objects placed in the world."""
    spec = _SCENES[motion]
    tau = np.linspace(0.0, 1.0, num_frames)
    center = np.array([(w - 1) / 2, (h - 1) / 2])
    direction = rng.uniform(0, 2 * np.pi)
    pan = rng.uniform(*spec["pan"]) * np.array([np.cos(direction), np.sin(direction)]) * [w, h]
    if spec["zoom"] == "in_out":
        end_zoom = rng.uniform(1.35, 1.6) if rng.uniform() < 0.5 else 0.7
    else:
        end_zoom = rng.uniform(*spec["zoom"])
    roll = rng.choice([-1, 1]) * rng.uniform(*spec["roll"])
    camera = np.stack([_affine(end_zoom ** t, roll * t, center + pan * t, center) for t in tau])  # [T, 2, 3]

    side = min(h, w)
    bh, bw = 2 * h, 2 * w
    bg_maps = _compose(camera, _affine(1.0, 0.0, ((bw - 1) / 2, (bh - 1) / 2), center)[None])
    layers = [_Layer(_texture(rng, bh, bw), bg_maps, "full", (0.0, 0.0))]
    if "background" in spec["warp"]:
        layers[0].warp = _warp(rng, tau, bg_maps, rng.uniform(0.5, 0.9) * side, 0.035 * side)
    for k in range(num_objects):
        a, b = rng.uniform(0.12, 0.22, size=2) * side
        th, tw = int(np.ceil(2 * b)) + 3, int(np.ceil(2 * a)) + 3
        angle = rng.uniform(0, 2 * np.pi) + np.zeros_like(tau)
        scale = np.ones_like(tau)
        if spec["objects"] in ("static", "spin"):
            start = rng.uniform(0.2, 0.8, 2)
            end = start + (rng.uniform(-0.1, 0.1, 2) if spec["objects"] == "spin" else 0.0)
        else:  # crossing through the middle, as in "objects"; "drift" covers half the distance
            reach = 0.16 if spec["objects"] == "drift" else 0.32
            d = np.array([(1, 0), (-1, 0), (0, 1), (0, -1)][k % 4])
            start = 0.5 - reach * d + rng.uniform(-0.1, 0.1, 2)
            end = 0.5 + reach * d + rng.uniform(-0.1, 0.1, 2)
        if spec["objects"] in ("spin", "cross_spin"):
            angle = angle + rng.choice([-1, 1]) * rng.uniform(2.0, 4.0) * tau
            scale = 1.0 + 0.15 * np.sin(2 * np.pi * tau * rng.uniform(0.5, 1.5) + rng.uniform(0, 2 * np.pi))
        centers = (start[None] + (end - start)[None] * tau[:, None]) * np.array([w - 1, h - 1])
        placed = np.stack([_affine(s, ang, ((tw - 1) / 2, (th - 1) / 2), c) for s, ang, c in zip(scale, angle, centers)])
        layer = _Layer(_texture(rng, th, tw), _compose(camera, placed), "ellipse" if k % 2 == 0 else "square", (a, b))
        if "objects" in spec["warp"]:
            layer.warp = _warp(rng, tau, layer.maps, rng.uniform(1.0, 1.6) * max(a, b), 0.05 * side)
        layers.append(layer)
    order = rng.permutation(num_objects) + 1
    return [layers[0]] + [layers[i] for i in order]


def _top_layer(layers: list[_Layer], t: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Index of the topmost layer at screen points ``xy [M, 2]`` in frames ``t [M]``."""
    top = np.zeros(len(xy), np.int64)
    for i, layer in enumerate(layers[1:], start=1):
        top[layer.inside(layer.to_texture(xy, t))] = i
    return top


def _render(layers: list[_Layer], t: int, h: int, w: int) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    screen = np.stack([xs, ys], axis=-1)
    out = np.zeros((h, w, 3), np.float32)
    # 4x4 sub-pixel samples give each object's edge a coverage (antialiased) alpha.
    sub = (np.arange(4) + 0.5) / 4 - 0.5
    for layer in layers:
        uv = layer.to_texture(screen, t)
        uv32 = uv.astype(np.float32)
        colour = cv2.remap(layer.texture, uv32[..., 0], uv32[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        if layer.shape == "full":
            out = colour
            continue
        alpha = np.zeros((h, w), np.float32)
        # Sub-pixel samples: exact for affine layers; a warped layer's are placed by the local
        # inverse Jacobian (an error of about |d2 warp| / 8 ~ 0.01 px, for the edge's alpha only).
        step = np.linalg.inv(layer.jacobian(uv, t)) if layer.warp is not None else None
        for dy in sub:
            for dx in sub:
                d = np.array([dx, dy])
                alpha += layer.inside(layer.to_texture(screen + d, t) if step is None else uv + step @ d)
        alpha = (alpha / sub.size ** 2)[..., None]
        out = alpha * colour + (1 - alpha) * out
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def make_video(num_frames: int = 24, h: int = 128, w: int = 128, num_points: int = 256, seed: int = 0,
               num_objects: int = 3, motion: str = "objects") -> SyntheticVideo:
    """Render a synthetic video with exact ground-truth tracks (see the module docstring).

    Half of the query points (on average) lie on foreground objects at their query frame, the rest
    anywhere. Query frames are uniform over the video, not each point's first visible frame, so
    evaluate with ``tapvid_metrics(..., query_mode="strided")``. Deterministic in ``seed``.
    ``motion``: one of :data:`MOTIONS` (see the module docstring); the default, ``"objects"``,
    renders the same clip for a seed as before the other motions existed.
    """
    for name, value, low in (("num_frames", num_frames, 2), ("h", h, 16), ("w", w, 16),
                             ("num_points", num_points, 1), ("num_objects", num_objects, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if motion not in MOTIONS:
        raise ValueError(f"motion must be one of {MOTIONS}, got {motion!r}")
    rng = np.random.default_rng(seed)
    layers = (_build_layers(rng, num_frames, h, w, num_objects) if motion == "objects"
              else _build_scene(rng, motion, num_frames, h, w, num_objects))
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
        uv = layer.to_texture(q_xy[sel], q_t[sel])             # [n, 2] texture coordinates
        points[sel] = layer.to_screen(uv[:, None], slice(None))  # [n, T, 2]
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
