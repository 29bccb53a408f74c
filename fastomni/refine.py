"""Refine a model's tracks against the preprocessed pairwise flow (the fast preset's first stage
after the model; :mod:`fastomni.refind` and :mod:`fastomni.subpixel` follow it).

A model trained for minutes takes frame-to-frame steps 2-3x less precise than the optical flow it
was fitted to (the rotation clip of docs/fast-preset.md: a median error of 0.20 px at one frame
against the flow's 0.09). This stage keeps the model's track as the starting point and the
prior, and pulls it onto the filtered flow of every pair of frames at most ``max_interval`` apart.
For one query point with positions ``x_t`` (pixels, the model's resolution) it minimises

    sum_{a -> b} w_ab |x_b - x_a - F_ab(x_a)|^2  +  prior * sum_t |x_t - m_t|^2
                                                +  smooth * sum_t |x_{t+1} - 2 x_t + x_{t-1}|^2

where ``m_t`` is the model's track, ``F_ab(x_a)`` the flow a -> b at ``x_a`` (below), and
``w_ab = [cycle-consistent at x_a] [x_a in the image] [a, b visible to the model] / |b - a|``,
times a Huber factor ``min(1, huber / residual)`` from the previous iterate (a flow that disagrees
with the others by more than ``huber`` pixels counts as an outlier, not as a quadratic pull). The
query frame is held at the query. The acceleration term (the original's training regulariser, on
the track, over triplets of frames in the query's shot) keeps frames that no flow reaches from
jumping to the model's position. The flow is re-read at the new positions and the quadratic
solved again, ``iterations`` times (a fixed-point iteration; each solve is a banded system of
bandwidth ``max(max_interval, 2)``, solved by a batched banded Cholesky over the points).

The flow at a point near an object's edge is a blend of the two surfaces' motions (DIS's patches
and smoothing straddle the edge): on the benchmark's hard clips the adjacent flow read bilinearly
within 2 px of an edge is more than 1 px off for 17% of the points, against 0.5% further than
4 px. So ``F_ab(x_a)`` is chosen (:func:`select_flow`): the bilinear vector competes with the flow
vectors of the ``(2 r + 1)^2`` pixels around ``x_a`` (``r = candidate_radius``), and the one whose
end in frame b has the colour closest to ``x_a``'s in frame a wins, when it is closer than the
bilinear vector's by more than the pair's colour noise (:func:`flow_noise`). Its
cycle-consistency flag is the one of the pixel it came from. Where the flow varies by at most
``SPREAD_TH`` px over the neighbourhood, every candidate is that close to the bilinear vector,
and the bilinear vector is kept untested. On the benchmark this raised the fast preset's mean AJ
from 0.837 to 0.851 (docs/fast-preset.md, round 8).

Occlusion: the model's flag; or the median residual of the cycle-consistent flows into and out of
the frame above ``residual_th`` pixels (the flows cannot agree on the position); or a colour at the
refined position (frames blurred with a Gaussian of sigma ``COLOR_SIGMA`` px) more than
``max_color_change`` (RGB distance, 0-255) from the query's (the track sits on another surface: an
occluder, or the surface it was lost to). The blur is light (0.5 px): a point within a pixel or two of an
object's edge read through a wider blur (1.5 px) takes in the surface behind it, whose colour
changes as the object moves, and the test flagged points that had been tracked right
(docs/fast-preset.md, round 11). A lost track reported visible is a false positive for
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

__all__ = ["CANDIDATE_RADIUS", "COLOR_SIGMA", "SPREAD_TH", "SUPPORT_TH", "banded_cholesky_solve", "color_blur",
           "flow_noise", "flow_spread", "refine_tracks", "refiner", "refiner_settings", "run_refiner", "select_flow",
           "surface_support", "track_colors"]

COLOR_SIGMA = 0.5  # px: the blur of the frames before the colour test (docs/fast-preset.md, rounds 4 and 11)
CANDIDATE_RADIUS = 3  # px: the neighbourhood whose flow vectors compete in select_flow (docs/fast-preset.md, round 8)
SPREAD_TH = 0.25  # px: select_flow keeps the bilinear vector where the flow varies less than this in the neighbourhood
SUPPORT_TH = 0.5  # px: surface_support's largest flow difference from the track's step (docs/fast-preset.md, round 9)


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


def _read_frame(path: str) -> np.ndarray:
    """The frame file ``path`` ``[H, W, 3]`` uint8 (OpenCV's channel order)."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise InputError(f"cannot read frame {path}")
    return image


def track_colors(color_frame, x: np.ndarray) -> np.ndarray:
    """Colours ``[T, N, 3]`` (0-255) of positions ``x [T, N, 2]`` (pixels; clamped to the image,
    non-finite read as 0) in the frames ``color_frame(t)`` (``[H, W, 3]``, blurred by
    :func:`color_blur`), one frame at a time."""
    out = np.empty(x.shape[:2] + (3,), np.float32)
    for f in range(len(x)):
        out[f] = edge_sample(color_frame(f), np.nan_to_num(x[f]).astype(np.float32))
    return out


def flow_noise(flow: np.ndarray, cycle_ok: np.ndarray, frame_a: np.ndarray, frame_b: np.ndarray) -> float:
    """A pair's colour noise: the median, over the pixels whose flow ``[H, W, 2]`` is
    cycle-consistent (``cycle_ok [H, W]`` bool; all pixels when none is), of the squared colour
    difference (mean over channels) between ``frame_a`` and ``frame_b`` (``[H, W, 3]`` float32) read
    at the flow's end."""
    h, w = flow.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    warped = cv2.remap(frame_b, xs + flow[..., 0], ys + flow[..., 1], cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REPLICATE)
    diff = ((warped - frame_a) ** 2).mean(-1)
    return float(np.median(diff[cycle_ok] if cycle_ok.any() else diff))


def flow_spread(flow: np.ndarray, radius: int = CANDIDATE_RADIUS) -> np.ndarray:
    """How much ``flow [H, W, 2]`` varies around each pixel: the larger channel's range (max - min)
    over the ``(2 r + 1)^2`` square centred there (``r = radius``), ``[H, W]``."""
    window = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    return (cv2.dilate(flow, window) - cv2.erode(flow, window)).max(-1)


def select_flow(flow: np.ndarray, cycle_ok: np.ndarray, frame_a: np.ndarray, frame_b: np.ndarray, xa: np.ndarray,
                noise: float, radius: int = CANDIDATE_RADIUS, spread: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """The flow a -> b at points ``xa [N, 2]`` (x, y pixels), chosen as the module docstring says:
    the bilinear vector of ``flow [H, W, 2]``, unless the vector of a pixel within ``radius`` (a
    square) ends on a colour of ``frame_b`` closer to ``frame_a``'s at ``xa`` (``[H, W, 3]`` float32,
    squared difference, mean over channels) by more than ``noise``. ``cycle_ok [H, W]`` float32,
    255 where the flow is cycle-consistent. Points where the flow varies by at most
    :data:`SPREAD_TH` px over the square (``spread``: :func:`flow_spread` of ``flow`` and
    ``radius``, computed when not given) keep the bilinear vector untested. Returns the vectors
    ``[N, 2]`` and their pixels' ``cycle_ok`` ``[N]`` (read bilinearly for the bilinear vector).
    ``radius`` 0: bilinear only."""
    step = edge_sample(flow, xa)
    consistent = edge_sample(cycle_ok[..., None], xa)[:, 0]
    if radius == 0 or len(xa) == 0:
        return step, consistent
    h, w = flow.shape[:2]
    if spread is None:
        spread = flow_spread(flow, radius)
    centre = np.rint(np.nan_to_num(xa)).astype(np.int32)
    cx, cy = np.clip(centre[:, 0], 0, w - 1), np.clip(centre[:, 1], 0, h - 1)
    rows = np.flatnonzero(spread[cy, cx] > SPREAD_TH)
    offsets = np.arange(-radius, radius + 1, dtype=np.int32)
    px = np.clip(cx[rows, None] + offsets, 0, w - 1)  # [M, 2 r + 1] the candidates' columns and rows
    py = np.clip(cy[rows, None] + offsets, 0, h - 1)
    pixel = (py[:, :, None] * w + px[:, None, :]).reshape(len(rows), px.shape[1] ** 2)  # [M, K] flat indices
    steps = np.empty((len(rows), 1 + pixel.shape[1], 2), np.float32)  # the bilinear vector first
    steps[:, 0] = step[rows]
    steps[:, 1:] = flow.reshape(-1, 2)[pixel]
    diff = edge_sample(frame_b, xa[rows, None] + steps) - edge_sample(frame_a, xa[rows])[:, None]
    error = np.einsum("mkc,mkc->mk", diff, diff) / diff.shape[-1]
    best = error.argmin(1)
    m = np.arange(len(rows))
    chosen = np.flatnonzero(error[m, 0] > error[m, best] + noise)
    k = best[chosen]
    step[rows[chosen]] = steps[chosen, k]
    consistent[rows[chosen]] = cycle_ok.reshape(-1)[pixel[chosen, k - 1]]
    return step, consistent


def refine_tracks(tracks, occluded, query_points, seq_dir: str, max_interval: int = 4, prior: float = 0.005,
                  huber: float = 1.0, iterations: int = 6, residual_th: float = 1.0,
                  smooth: float = 0.5, max_color_change: float = 40.0, color_frame=None, frames=None,
                  candidate_radius: int = CANDIDATE_RADIUS, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Refine ``tracks [N, T, 2]`` (x, y) pixels at the resolution of ``seq_dir``'s frames, with
    ``occluded [N, T]`` bool and ``query_points [N, 3]`` (t, y, x), against ``seq_dir``'s filtered
    flow (see the module docstring). ``color_frame``: ``t ->`` frame ``t`` blurred by
    :func:`color_blur` for the colour test (a cache such as
    :meth:`fastomni.refind.FrameFeatures.color`); default: :func:`color_blur` of ``frames``.
    ``frames``: ``seq_dir``'s frames ``[T, H, W, 3]`` uint8 (any channel order) for
    :func:`select_flow` and the colour test; default: read from its files, once.
    ``candidate_radius``: :func:`select_flow`'s ``radius`` (0: the bilinear flow only). Returns
    ``(tracks [N, T, 2] float32, occluded [N, T] bool)``.
    """
    tracks = np.asarray(tracks, np.float64)
    occluded = np.asarray(occluded, bool)
    q = np.asarray(query_points, np.float64)
    if tracks.ndim != 3 or tracks.shape[2] != 2 or occluded.shape != tracks.shape[:2] or q.shape != (len(tracks), 3):
        raise InputError(f"tracks [N, T, 2], occluded [N, T] and query_points [N, 3] expected, got "
                         f"{tracks.shape}, {occluded.shape} and {q.shape}")
    if (max_interval < 1 or iterations < 1 or candidate_radius < 0
            or not min(prior, huber, residual_th, max_color_change) > 0 or not smooth >= 0):
        raise InputError("refine_tracks needs max_interval >= 1, iterations >= 1, candidate_radius >= 0, positive "
                         "prior, huber, residual_th and max_color_change and smooth >= 0; got "
                         f"{max_interval}, {iterations}, {candidate_radius}, {prior}, {huber}, {residual_th}, "
                         f"{max_color_change}, {smooth}")
    n, t = occluded.shape
    frame_paths = _frame_paths(seq_dir, t)
    pairs = _flow_pairs(seq_dir, frame_paths, max_interval)
    if not pairs:
        return tracks.astype(np.float32), occluded.copy()
    h, w = np.load(pairs[0][2], mmap_mode="r").shape[:2]
    if frames is None:
        frames = [_read_frame(path) for path in frame_paths]
    if np.shape(frames) != (t, h, w, 3):
        raise InputError(f"frames [{t}, {h}, {w}, 3] expected, got {np.shape(frames)}")
    frames = [np.asarray(f, np.float32) for f in frames]
    pair_stats = {}  # (a, b) -> (flow_noise, flow_spread), once per pair
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
            mask = cv2.imread(mask_path, cv2.IMREAD_COLOR)[..., 2].astype(np.float32)  # R: cycle-consistent
            if candidate_radius and (a, b) not in pair_stats:
                pair_stats[a, b] = (flow_noise(flow, mask > 127.5, frames[a], frames[b]),
                                    flow_spread(flow, candidate_radius))
            noise, spread = pair_stats.get((a, b), (0.0, None))
            xa = x[a].astype(np.float32)
            step, consistent = select_flow(flow, mask, frames[a], frames[b], xa, noise, candidate_radius, spread)
            step = step.astype(np.float64)
            inside = (xa[:, 0] >= 0) & (xa[:, 0] <= w - 1) & (xa[:, 1] >= 0) & (xa[:, 1] <= h - 1)
            valid = (consistent > 127.5) & inside & known[a] & known[b]
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
    colors = track_colors(color_frame or (lambda f: color_blur(frames[f])), x)
    recolored = np.linalg.norm(colors - colors[qt, rows][None], axis=-1) > max_color_change
    out_occluded = occluded | (outside | recolored | (count[:, 0] > 0) & (median > residual_th)).T
    out_occluded[rows, qt] = False
    x[~known] = np.nan
    return x.transpose(1, 0, 2).astype(np.float32), out_occluded


def surface_support(tracks, query_points, seq_dir: str, radius: int, threshold: float = SUPPORT_TH) -> np.ndarray:
    """Which pixels around each query lie on the query's surface, judged by motion: ``[N, 2 r + 1,
    2 r + 1]`` float32 (``r = radius``; rows y, columns x, centred on the query), 1 where the flow
    from the query's frame ``q`` to ``q - 1`` and to ``q + 1`` (the pairs ``seq_dir`` holds) at the
    pixel differs from the track's step ``tracks[q +- 1] - tracks[q]`` by at most ``threshold`` px,
    else 0; the query's own pixel is always 1, and a query with no such pair or step is all 1.
    ``tracks [N, T, 2]`` (x, y pixels of ``seq_dir``'s frames, refined), ``query_points [N, 3]``
    (t, y, x). Within a few pixels of an object's edge a patch around the query holds two surfaces;
    :func:`fastomni.refind.refind_lost` and :func:`fastomni.subpixel.align_to_query` weight their
    patches by this (docs/fast-preset.md, round 9)."""
    x = np.asarray(tracks, np.float64)
    q = np.asarray(query_points, np.float64)
    if x.ndim != 3 or x.shape[2] != 2 or q.shape != (len(x), 3) or not int(radius) == radius >= 0:
        raise InputError(f"tracks [N, T, 2], query_points [N, 3] and an integer radius >= 0 expected, got "
                         f"{x.shape}, {q.shape} and {radius}")
    radius = int(radius)
    side = np.arange(-radius, radius + 1, dtype=np.float32)
    grid = np.stack(np.meshgrid(side, side, indexing="xy"), -1).reshape(-1, 2)  # [P, 2]
    deviation = np.zeros((len(x), len(grid)))  # the largest flow difference from the step, per pixel
    pairs = {(a, b): flow for a, b, flow, _ in _flow_pairs(seq_dir, _frame_paths(seq_dir, x.shape[1]), 1)}
    qt = q[:, 0].astype(np.int64)
    for a in np.unique(qt):
        rows = np.flatnonzero(qt == a)
        points = (q[rows][:, None, [2, 1]] + grid).reshape(-1, 2).astype(np.float32)
        for b in (a - 1, a + 1):
            if (a, b) not in pairs:
                continue
            step = x[rows, b] - x[rows, a]
            flow = edge_sample(np.load(pairs[a, b]), points).reshape(len(rows), len(grid), 2)
            off = np.linalg.norm(flow - step[:, None], axis=-1)
            deviation[rows] = np.where(np.isfinite(step).all(1)[:, None], np.maximum(deviation[rows], off),
                                       deviation[rows])
    support = deviation <= threshold
    support[:, len(grid) // 2] = True
    return support.astype(np.float32).reshape(len(x), 2 * radius + 1, 2 * radius + 1)


def refiner(seq_dir: str, cfg):
    """:func:`refine_tracks` bound to ``seq_dir`` and ``cfg.refine_interval``, then, when set,
    :func:`fastomni.refind.refind_lost` with ``cfg.refind_radius`` and
    :func:`fastomni.subpixel.align_to_query` with ``cfg.align_radius``, both weighting their patches
    by the :func:`surface_support` of the refined tracks (one
    :class:`~fastomni.refind.FrameFeatures` of the sequence for every call, whose blurred frames the
    refinement's colour test reads too), as ``refine(tracks, occluded, query_points, progress=False)``;
    None when the config does not refine."""
    if not cfg.refine_interval:
        return None
    from fastomni.io import load_video
    from fastomni.refind import PATCH, FrameFeatures, refind_lost
    from fastomni.subpixel import align_to_query

    features = (FrameFeatures(load_video(os.path.join(seq_dir, "color")))
                if cfg.refind_radius or cfg.align_radius else None)

    def refine(tracks, occluded, query_points, progress: bool = False):
        tracks, occluded = refine_tracks(tracks, occluded, query_points, seq_dir, cfg.refine_interval,
                                         color_frame=None if features is None else features.color,
                                         frames=None if features is None else features.frames, progress=progress)
        support = surface_support(tracks, query_points, seq_dir, PATCH) if features is not None else None
        if cfg.refind_radius:
            tracks, occluded = refind_lost(tracks, occluded, query_points, features, cfg.refind_radius, support=support)
        if cfg.align_radius:
            tracks = align_to_query(tracks, occluded, query_points, features, cfg.align_radius, support=support)
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
