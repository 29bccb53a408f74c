"""Refine a model's tracks against the preprocessed pairwise flow (the fast preset's first stage
after the model; :mod:`fastomni.refind` and :mod:`fastomni.subpixel` follow it).

A model trained for minutes takes frame-to-frame steps 2-3x less precise than the optical flow it
was fitted to (the rotation clip of docs/fast-preset.md: a median error of 0.20 px at one frame
against the flow's 0.09). This stage keeps the model's track as the starting point and the
prior, and pulls it onto the filtered flow of every pair of frames at most ``max_interval`` apart.
For one query point with positions ``x_t`` (pixels, the model's resolution) it minimises

    sum_{a -> b} w_ab |x_b - x_a - F_ab(x_a)|^2  +  prior * sum_t |x_t - m_t|^2
                                                +  smooth * sum_t |x_{t+1} - 2 x_t + x_{t-1}|^2

where ``m_t`` is the model's track, ``F_ab`` the flow a -> b read bilinearly at ``x_a``, and
``w_ab = [cycle-consistent at x_a] [x_a in the image] [a, b visible to the model] / |b - a|``,
times a Huber factor ``min(1, huber / residual)`` from the previous iterate (a flow that disagrees
with the others by more than ``huber`` pixels counts as an outlier, not as a quadratic pull). The
query frame is held at the query. The acceleration term (the original's training regulariser, on
the track, over triplets of frames in the query's shot) keeps frames that no flow reaches from
jumping to the model's position. The flow is re-read at the new positions and the quadratic
solved again, ``iterations`` times (a fixed-point iteration; each solve is a banded system of
bandwidth ``max(max_interval, 2)``, solved by a batched banded Cholesky over the points).

Occlusion: the model's flag; or the median residual of the cycle-consistent flows into and out of
the frame above ``residual_th`` pixels (the flows cannot agree on the position); or a colour at the
refined position (frames blurred with a Gaussian of sigma ``COLOR_SIGMA`` px) more than
``max_color_change`` (RGB distance, 0-255) from the query's (the track sits on another surface: an
occluder, or the surface it was lost to). A lost track reported visible is a false positive for
TAP-Vid's metrics; reported occluded, it costs only occlusion accuracy. Non-finite positions
(frames of another shot) stay non-finite. Flows across a shot cut do not exist, so no edge
crosses one.

Example::

    >>> import numpy as np
    >>> band = np.array([[[2.0], [0.0]], [[2.0], [-1.0]]])   # one matrix, A = [[2, -1], [-1, 2]]
    >>> banded_cholesky_solve(band, np.ones((2, 1, 1)))[:, 0, 0].round(6).tolist()
    [1.0, 1.0]
"""
from __future__ import annotations

import os

import cv2
import numpy as np
from tqdm import tqdm

from fastomni.inputs import InputError
from fastomni.io import frame_files
from fastomni.preprocess import edge_sample

__all__ = ["COLOR_SIGMA", "banded_cholesky_solve", "color_blur", "refine_tracks", "refiner", "refiner_settings",
           "run_refiner", "track_colors"]

COLOR_SIGMA = 1.5  # px: the blur of the frames before the colour test (docs/fast-preset.md, round 4)


def banded_cholesky_solve(band: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve ``A x = rhs`` for a batch of ``N`` symmetric positive definite banded matrices, frames
    first and points last (every step is then one contiguous vector operation over the points).

    ``band [T, k + 1, N]`` float64: ``band[i, d, n] = A_n[i, i - d]`` (the lower band; entries with
    ``i - d < 0`` are ignored); ``rhs [T, N, C]``. Returns ``x [T, N, C]``. Costs ``O(T k^2 N)``.
    """
    t, k1 = band.shape[:2]
    k = k1 - 1
    low = np.zeros_like(band)  # low[i, d] = L[i, i - d], A = L L^T
    for i in range(t):
        for d in range(min(i, k), -1, -1):
            j = i - d
            s = band[i, d].copy()
            for e in range(d + 1, min(i, k) + 1):  # L[i, m] L[j, m] for m = i - e < j
                s -= low[i, e] * low[j, e - d]
            low[i, d] = np.sqrt(s) if d == 0 else s / low[j, 0]
    y = np.empty_like(rhs)
    for i in range(t):
        s = rhs[i].copy()
        for d in range(1, min(i, k) + 1):
            s -= low[i, d, :, None] * y[i - d]
        y[i] = s / low[i, 0, :, None]
    x = np.empty_like(rhs)
    for i in range(t - 1, -1, -1):
        s = y[i].copy()
        for d in range(1, min(t - 1 - i, k) + 1):
            s -= low[i + d, d, :, None] * x[i + d]
        x[i] = s / low[i, 0, :, None]
    return x


def _frame_paths(seq_dir: str, num_frames: int) -> list[str]:
    """The ``num_frames`` frame files of ``seq_dir/color``, in order; raises when there are others."""
    paths = frame_files(os.path.join(seq_dir, "color"))
    if len(paths) != num_frames:
        raise InputError(f"{seq_dir} holds {len(paths)} frames but the tracks have {num_frames}")
    return paths


def _flow_pairs(seq_dir: str, frame_paths: list[str], max_interval: int) -> list[tuple[int, int, str, str]]:
    """``(a, b, flow path, mask path)`` of every stored pair with ``0 < |a - b| <= max_interval``."""
    names = [os.path.basename(p) for p in frame_paths]
    num_frames = len(names)
    pairs = []
    for a in range(num_frames):
        for b in range(max(0, a - max_interval), min(num_frames, a + max_interval + 1)):
            flow = os.path.join(seq_dir, "raft_exhaustive", f"{names[a]}_{names[b]}.npy")
            mask = os.path.join(seq_dir, "raft_masks", f"{names[a]}_{names[b]}.png")
            if a != b and os.path.isfile(flow) and os.path.isfile(mask):
                pairs.append((a, b, flow, mask))
    return pairs


def color_blur(image: np.ndarray) -> np.ndarray:
    """``image [H, W, 3]`` as the colour test reads it: float32, blurred by :data:`COLOR_SIGMA`."""
    return cv2.GaussianBlur(image.astype(np.float32), (0, 0), COLOR_SIGMA)


def _read_color_blur(frame_paths: list[str]):
    """``t -> color_blur`` of the file ``frame_paths[t]`` (its channel order), read on each call."""
    def color_frame(f: int) -> np.ndarray:
        image = cv2.imread(frame_paths[f], cv2.IMREAD_COLOR)
        if image is None:
            raise InputError(f"cannot read frame {frame_paths[f]}")
        return color_blur(image)

    return color_frame


def track_colors(color_frame, x: np.ndarray) -> np.ndarray:
    """Colours ``[T, N, 3]`` (0-255) of positions ``x [T, N, 2]`` (pixels; clamped to the image,
    non-finite read as 0) in the frames ``color_frame(t)`` (``[H, W, 3]``, blurred by
    :func:`color_blur`), one frame at a time."""
    out = np.empty(x.shape[:2] + (3,), np.float32)
    for f in range(len(x)):
        out[f] = edge_sample(color_frame(f), np.nan_to_num(x[f]).astype(np.float32))
    return out


def refine_tracks(tracks, occluded, query_points, seq_dir: str, max_interval: int = 4, prior: float = 0.005,
                  huber: float = 1.0, iterations: int = 6, residual_th: float = 1.0,
                  smooth: float = 0.5, max_color_change: float = 40.0, color_frame=None,
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Refine ``tracks [N, T, 2]`` (x, y) pixels at the resolution of ``seq_dir``'s frames, with
    ``occluded [N, T]`` bool and ``query_points [N, 3]`` (t, y, x), against ``seq_dir``'s filtered
    flow (see the module docstring). ``color_frame``: ``t ->`` frame ``t`` blurred by
    :func:`color_blur` for the colour test (a cache such as
    :meth:`fastomni.refind.FrameFeatures.color`); default: read from ``seq_dir``'s files on each
    call. Returns ``(tracks [N, T, 2] float32, occluded [N, T] bool)``.
    """
    tracks = np.asarray(tracks, np.float64)
    occluded = np.asarray(occluded, bool)
    q = np.asarray(query_points, np.float64)
    if tracks.ndim != 3 or tracks.shape[2] != 2 or occluded.shape != tracks.shape[:2] or q.shape != (len(tracks), 3):
        raise InputError(f"tracks [N, T, 2], occluded [N, T] and query_points [N, 3] expected, got "
                         f"{tracks.shape}, {occluded.shape} and {q.shape}")
    if (max_interval < 1 or iterations < 1
            or not min(prior, huber, residual_th, max_color_change) > 0 or not smooth >= 0):
        raise InputError("refine_tracks needs max_interval >= 1, iterations >= 1, positive prior, huber, residual_th "
                         f"and max_color_change and smooth >= 0; got {max_interval}, {iterations}, {prior}, {huber}, "
                         f"{residual_th}, {max_color_change}, {smooth}")
    n, t = occluded.shape
    frame_paths = _frame_paths(seq_dir, t)
    pairs = _flow_pairs(seq_dir, frame_paths, max_interval)
    if not pairs:
        return tracks.astype(np.float32), occluded.copy()
    h, w = np.load(pairs[0][2], mmap_mode="r").shape[:2]
    # Frames first, points last ([T, N, ...]): each frame's positions are one contiguous block.
    rows, qt = np.arange(n), q[:, 0].astype(np.int64)
    known = np.isfinite(tracks).all(-1).T
    model = np.where(known[..., None], tracks.transpose(1, 0, 2), 0.0)
    model[qt, rows] = q[:, [2, 1]]
    visible = ~occluded.T & known
    visible[qt, rows] = True
    x = model.copy()
    for it in tqdm(range(iterations + 1), desc="refine tracks", disable=not progress):
        last = it == iterations  # the last pass only measures the residuals of the final positions
        if last:
            residuals = np.full((t, 4 * max_interval, n), np.nan)  # each frame's incident edges; NaN: not valid
            slot = np.zeros(t, np.int64)
        else:
            band, rhs = np.zeros((t, max(max_interval, 2) + 1, n)), np.zeros((t, n, 2))
        for a, b, flow_path, mask_path in pairs:
            flow = np.load(flow_path)
            mask = cv2.imread(mask_path, cv2.IMREAD_COLOR)[..., 2:3].astype(np.float32)  # R: cycle-consistent
            xa = x[a].astype(np.float32)
            step = edge_sample(flow, xa).astype(np.float64)
            inside = (xa[:, 0] >= 0) & (xa[:, 0] <= w - 1) & (xa[:, 1] >= 0) & (xa[:, 1] <= h - 1)
            valid = (edge_sample(mask, xa)[:, 0] > 127.5) & inside & known[a] & known[b]
            residual = np.linalg.norm(x[b] - x[a] - step, axis=-1)
            if last:
                for f in (a, b):
                    residuals[f, slot[f]] = np.where(valid, residual, np.nan)
                    slot[f] += 1
                continue
            weight = valid * visible[a] * visible[b] / abs(b - a)
            if it > 0:
                weight *= np.minimum(1.0, huber / np.maximum(residual, 1e-12))
            band[a, 0] += weight
            band[b, 0] += weight
            band[max(a, b), abs(b - a)] -= weight
            rhs[b] += weight[:, None] * step
            rhs[a] -= weight[:, None] * step
        if last:
            break
        band[:, 0] += prior
        rhs += prior * model
        if t >= 3:  # smooth * |x_{c-1} - 2 x_c + x_{c+1}|^2 for c = 1 .. T-2, over known frames only
            trio = smooth * (known[:-2] & known[1:-1] & known[2:])  # [T-2, N]
            band[:-2, 0] += trio
            band[1:-1, 0] += 4 * trio
            band[2:, 0] += trio
            band[1:-1, 1] -= 2 * trio
            band[2:, 1] -= 2 * trio
            band[2:, 2] += trio
        band[qt, 0, rows] += 1e6  # the query frame stays at the query
        rhs[qt, rows] += 1e6 * model[qt, rows]
        x = banded_cholesky_solve(band, rhs)
        x[qt, rows] = model[qt, rows]
    count = np.isfinite(residuals).sum(1, keepdims=True)
    ordered = np.sort(residuals, axis=1)  # NaN last
    median = 0.5 * (np.take_along_axis(ordered, np.maximum(count - 1, 0) // 2, 1)
                    + np.take_along_axis(ordered, count // 2, 1))[:, 0]
    outside = (x[..., 0] < 0) | (x[..., 0] > w - 1) | (x[..., 1] < 0) | (x[..., 1] > h - 1)
    colors = track_colors(color_frame or _read_color_blur(frame_paths), x)
    recolored = np.linalg.norm(colors - colors[qt, rows][None], axis=-1) > max_color_change
    out_occluded = occluded | (outside | recolored | (count[:, 0] > 0) & (median > residual_th)).T
    out_occluded[rows, qt] = False
    x[~known] = np.nan
    return x.transpose(1, 0, 2).astype(np.float32), out_occluded


def refiner(seq_dir: str, cfg):
    """:func:`refine_tracks` bound to ``seq_dir`` and ``cfg.refine_interval``, then, when set,
    :func:`fastomni.refind.refind_lost` with ``cfg.refind_radius`` and
    :func:`fastomni.subpixel.align_to_query` with ``cfg.align_radius`` (one
    :class:`~fastomni.refind.FrameFeatures` of the sequence for every call, whose blurred frames the
    refinement's colour test reads too), as ``refine(tracks, occluded, query_points, progress=False)``;
    None when the config does not refine."""
    if not cfg.refine_interval:
        return None
    from fastomni.io import load_video
    from fastomni.refind import FrameFeatures, refind_lost
    from fastomni.subpixel import align_to_query

    features = (FrameFeatures(load_video(os.path.join(seq_dir, "color")))
                if cfg.refind_radius or cfg.align_radius else None)

    def refine(tracks, occluded, query_points, progress: bool = False):
        tracks, occluded = refine_tracks(tracks, occluded, query_points, seq_dir, cfg.refine_interval,
                                         color_frame=None if features is None else features.color, progress=progress)
        if cfg.refind_radius:
            tracks, occluded = refind_lost(tracks, occluded, query_points, features, cfg.refind_radius)
        if cfg.align_radius:
            tracks = align_to_query(tracks, occluded, query_points, features, cfg.align_radius)
        return tracks, occluded

    return refine


def refiner_settings(cfg) -> dict:
    """The settings of ``cfg`` that :func:`refiner` reads, by name."""
    return {name: getattr(cfg, name) for name in ("refine_interval", "refind_radius", "align_radius")}


def run_refiner(run_dir: str, cfg):
    """:func:`refiner` of a run's sequence folder (``RUN/seq``, else the config's ``data_dir``); None
    when the config does not refine. Raises :class:`InputError` when the folder is not there."""
    if not cfg.refine_interval:
        return None
    seq_dir = next((d for d in (os.path.join(run_dir, "seq"), cfg.data_dir) if d and os.path.isdir(d)), None)
    if seq_dir is None:
        raise InputError(f"{run_dir}'s config refines tracks on its flow (refine_interval {cfg.refine_interval}) but "
                         f"its sequence folder is not there ({os.path.join(run_dir, 'seq')} or {cfg.data_dir!r}); "
                         "--no_refine exports the model's tracks as they are")
    return refiner(seq_dir, cfg)
