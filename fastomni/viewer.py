"""A static browser viewer of the complete motion field (``fastomni view``).

:func:`write_viewer` turns a field export (:func:`fastomni.field.export_field`, ``fastomni export
RUN --all``) and its video into a folder that opens from disk, with no network and no build step:

* ``index.html``, ``viewer.js``, ``viewer.css`` (from ``fastomni/viewer_assets/``): plain HTML,
  JavaScript and canvas;
* ``frames/00000.jpg ...``: the video at the export's image size;
* ``depth/00000.png ...``: each frame's depth map from the occlusion tables (turbo colours, near
  is red);
* ``data/manifest.js``: sizes, frame count, the track grid and its encoding;
* ``data/q_00000.js ...``: one file per query frame, loaded when that frame is first clicked. Each
  calls ``fastomniQuery(i, tracks, occluded)`` with base64 little-endian arrays: ``tracks``
  int16 ``[N, T, 2]`` (x, y) in ``1 / scale`` pixels (``-32768``: no estimate), ``occluded`` uint8
  ``[N, T]``, for the ``N`` pixels of a grid of stride ``stride`` over the query frame.

The data sit in ``<script src>`` files rather than being fetched, because browsers block
``fetch()`` of ``file://`` URLs. A 100-frame 480p run with the default ``max_points`` (16384; stride 6 there) has
5.7 MB of data per query frame (7.6 MB as base64).

Example::

    >>> grid_stride(480, 854, 16384)  # 80 x 143 track pixels of a 480p frame
    6
"""
from __future__ import annotations

import base64
import json
import math
import os
import shutil

import cv2
import numpy as np
from tqdm import tqdm

from fastomni._atomic import atomic_output, write_atomic_text
from fastomni.inputs import InputError
from fastomni.io import load_video

__all__ = ["grid_stride", "write_viewer"]

ASSETS = os.path.join(os.path.dirname(__file__), "viewer_assets")
_MISSING = -32768


def grid_stride(h: int, w: int, max_points: int) -> int:
    """The smallest stride whose pixel grid over an ``h x w`` frame has at most ``max_points`` points."""
    if max_points < 1:
        raise InputError(f"max_points must be >= 1, got {max_points}")
    stride = max(1, math.ceil(math.sqrt(h * w / max_points)))
    while math.ceil(h / stride) * math.ceil(w / stride) > max_points:
        stride += 1
    return stride


def _track_scale(h: int, w: int) -> int:
    """Fixed-point steps per pixel: the largest power of two (at most 16) that keeps positions up
    to one image size outside the image within int16."""
    scale = 16
    while scale > 1 and 2 * max(h, w) * scale > 32767:
        scale //= 2
    return scale


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()).decode()


def _read_export(folder: str) -> dict:
    meta = os.path.join(folder, "field.json")
    if not os.path.isfile(meta):
        raise InputError(f"{folder} is not a field export (no field.json): run `fastomni export RUN --all` first")
    with open(meta, encoding="utf-8") as f:
        info = json.load(f)
    missing = [i for i in range(info["num_frames"]) if not os.path.isfile(os.path.join(folder, f"dense_{i:05d}.npz"))]
    if missing:
        raise InputError(f"{folder} lacks query frames {missing[:5]} of 0..{info['num_frames'] - 1}: the export "
                         "is incomplete (run `fastomni export RUN --all` again to finish it)")
    if not os.path.isfile(os.path.join(folder, "maps.npz")):
        raise InputError(f"{folder} has no maps.npz (depth maps): re-run the export")
    return info


def _depth_images(depth: np.ndarray, size: tuple[int, int]) -> list[np.ndarray]:
    """Depth maps ``[T, h, w]`` -> BGR turbo images at ``size`` (h, w), one scale for all frames."""
    finite = depth[np.isfinite(depth)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    scaled = np.clip((np.nan_to_num(depth, nan=hi) - lo) / max(hi - lo, 1e-12), 0, 1)
    images = []
    for d in scaled:
        gray = (255 * (1 - d)).astype(np.uint8)  # near is bright -> red in turbo
        colored = cv2.applyColorMap(gray, cv2.COLORMAP_TURBO)
        images.append(cv2.resize(colored, (size[1], size[0]), interpolation=cv2.INTER_NEAREST))
    return images


def write_viewer(export_dir: str, video, out_dir: str, max_points: int = 16384, fps: float = 10.0,
                 progress: bool = True) -> str:
    """Write the viewer of the field export ``export_dir`` for ``video`` (file or frame folder) into
    ``out_dir``. Query frames already written there are kept (a stopped run resumes). Returns the
    path of ``index.html``."""
    from fastomni.query import load_tracks

    if fps <= 0:
        raise InputError(f"fps must be positive, got {fps}")
    info = _read_export(export_dir)
    t = int(info["num_frames"])
    h, w = (int(v) for v in info["image_size"])
    mh, mw = (int(v) for v in info["model_size"])
    frames = load_video(video, max_frames=t, resize=(h, w))
    if len(frames) != t:
        raise InputError(f"{video} has {len(frames)} frames, the export spans {t}")
    stride = grid_stride(mh, mw, max_points)
    gy, gx = np.arange(0, mh, stride), np.arange(0, mw, stride)
    rows = (gy[:, None] * mw + gx[None, :]).ravel()
    scale = _track_scale(h, w)
    for sub in ("data", "frames", "depth"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    for name in ("index.html", "viewer.js", "viewer.css"):
        shutil.copyfile(os.path.join(ASSETS, name), os.path.join(out_dir, name))
    with np.load(os.path.join(export_dir, "maps.npz")) as maps:
        depth = maps["depth"]
    for j, (rgb, dimg) in enumerate(zip(frames, _depth_images(depth, (h, w)))):
        for sub, image in (("frames", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)), ("depth", dimg)):
            path = os.path.join(out_dir, sub, f"{j:05d}.{'jpg' if sub == 'frames' else 'png'}")
            with atomic_output(path) as tmp:
                if not cv2.imwrite(tmp, image):
                    raise OSError(f"OpenCV failed to write {tmp}")
    manifest = {"numFrames": t, "height": h, "width": w, "modelHeight": mh, "modelWidth": mw, "stride": stride,
                "gridRows": len(gy), "gridCols": len(gx), "trackScale": scale, "missing": _MISSING, "fps": fps,
                "occlusionThreshold": info["occlusion_th"], "occlusion": info["occlusion"]}
    todo = [i for i in range(t) if not os.path.isfile(os.path.join(out_dir, "data", f"q_{i:05d}.js"))]
    for i in tqdm(todo, desc="viewer data", unit="query frame", disable=not progress):
        data = load_tracks(os.path.join(export_dir, f"dense_{i:05d}.npz"))
        tracks, occluded = data["tracks"][rows], data["occluded"][rows]
        finite = np.isfinite(tracks).all(-1, keepdims=True)
        fixed = np.clip(np.round(np.nan_to_num(tracks) * scale), -32767, 32767).astype(np.int16)
        fixed = np.where(finite, fixed, np.int16(_MISSING))
        write_atomic_text(os.path.join(out_dir, "data", f"q_{i:05d}.js"),
                  f'fastomniQuery({i}, "{_b64(fixed)}", "{_b64(occluded.astype(np.uint8))}");\n')
    write_atomic_text(os.path.join(out_dir, "data", "manifest.js"),
                      f"window.FASTOMNI_MANIFEST = {json.dumps(manifest)};\n")
    return os.path.join(out_dir, "index.html")
