"""Align visible track positions to the query's appearance, to a fraction of a pixel (the fast
preset's last stage, after :mod:`fastomni.refind`).

Flow chained or fitted over many frames drifts: on the rotation clip of docs/fast-preset.md the
refined tracks' median error was 0.11 px one or two frames from the query and 0.77 px 16 or more
frames away, so TAP-Vid's finest thresholds (0.5 and 1 px at 128 px) failed for about half the
positions. This stage ties each visible position back to the query frame, where the point is
known exactly. For a query ``(q, y, x)`` and each frame ``t`` where the track is reported visible,
frame by frame outwards from the query in both directions:

1. the template is the grey patch of radius ``radius`` around the query in frame ``q`` (grey
   frames blurred as for :mod:`fastomni.refind`'s correlation);
2. an affine warp ``u -> p + A u`` (``u``: the template's pixel offsets) is fitted to frame ``t`` by
   Gauss-Newton (Lucas-Kanade), started at the track's position and at the ``A`` of the last frame
   aligned nearer the query (the identity at the query). At each iteration the patch's brightness
   and contrast are matched to the template's, and the pixels are weighted by a Gaussian of sigma
   ``radius / 2``, by the query's surface support (the refiner's
   :func:`fastomni.refine.surface_support`: 0 on pixels that do not move with the query) and by
   ``min(1, HUBER * contrast / |residual|)`` (a corner of the patch on another surface counts as
   an outlier);
3. the fit is kept where it can be trusted: the larger patch that
   :mod:`fastomni.refind` verifies with (radius :data:`~fastomni.refind.PATCH`, weighted by the
   same support), warped by the fit, correlates with the query's (normalised cross-correlation at
   least ``min_ncc``, 0.9: of the fits kept at 0.8 on the benchmark's hard clips, the quarter that
   correlated least was more than 0.5 px off in 18-29% of the frames, the quarter that correlated
   most in 0-0.4%; tested on the fitted patch alone, fits matched 40-50% of the frames of an
   unrelated texture); ``A``
   changed by at most :data:`MAX_WARP_CHANGE` per frame since the last frame aligned; the position
   moved by at most ``max_shift`` pixels; both fitted patches lie inside their frames; and the
   patch has texture in every direction (the fit's position uncertainty, in units of the
   template's contrast, at most :data:`MAX_APERTURE` px: on an edge or a smooth patch the fit
   slides);
4. a kept fit and the track are two estimates of the position, each with an error. The fit's
   variance is that of weighted least squares: the residual's variance (the robust weights' mean
   square) times the Hessian's inverse, whose largest position eigenvalue is taken, times
   ``sum(w^2) / sum(w)`` of the robust weights ``w``. The track's is :data:`TRACK_DRIFT` squared
   times the frames from the query (flow drifts like a random walk). The shift ``p - x_t`` is
   weighted by ``var_track / (var_track + var_fit)``: a sharp fit far from the query counts fully,
   a noisy one near the query little (round 12 of docs/fast-preset.md: on the hard clips the
   kept fits and the refined tracks were about as accurate, median 0.08-0.16 px and 0.07-0.17 px);
5. the weighted shifts (0 at the query) are interpolated linearly in time over every frame of the
   track with a position, visible or not, smoothed by ``[1, 2, 1] / 4`` and added to it. Drift
   changes slowly; moving only the aligned frames made the tracks jump between aligned and
   unaligned frames (temporal coherence 0.76 against 0.57 on the mixed clip).

Occlusion flags and non-finite positions are left as they are, and the query frame stays at the
query. Round 6 of docs/fast-preset.md has the measurements and the settings tried.

Example (a texture shifted by 2.3 px; the track is 1 px off one frame from the query, where tracks
are trusted to :data:`TRACK_DRIFT` px; the fit is within 0.1 px of the truth, and the result lies
between the two, nearer the fit)::

    >>> rng = np.random.default_rng(0)
    >>> tex = cv2.GaussianBlur(rng.integers(0, 256, (48, 48, 3)).astype(np.uint8), (0, 0), 1.5)
    >>> moved = cv2.warpAffine(tex, np.float32([[1, 0, 2.3], [0, 1, 0]]), (48, 48))
    >>> features = FrameFeatures(np.stack([tex, moved]))
    >>> tracks = np.array([[[20.0, 24.0], [21.3, 24.0]]])   # the truth in frame 1: (22.3, 24)
    >>> x = align_to_query(tracks, np.zeros((1, 2), bool), [[0, 24, 20]], features)
    >>> float(np.round(x[0, 1, 0], 1))   # the truth: 22.3
    22.0
"""
from __future__ import annotations

import cv2
import numpy as np

from fastomni.inputs import InputError
from fastomni.refind import (PATCH, FrameFeatures, interpolate_in_time, patch_ncc, patch_support, query_patches,
                             track_arrays, warped_patches)

__all__ = ["align_to_query"]

HUBER = 0.3  # residuals above this many times the template's contrast are down-weighted
MAX_APERTURE = 12.0  # px: the largest position uncertainty (per unit of contrast) of a fit that is kept
MAX_WARP_CHANGE = 0.3  # the largest change of A (Frobenius norm) per frame since the last frame aligned
TRACK_DRIFT = 0.03  # px per square root of a frame from the query: the tracks' assumed error, weighed against the fits'


def _bilinear(images: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``images [H, W, C]`` float32 at ``points [K, P, 2]`` (x, y pixels), bilinear, clamped to the
    image: ``[K, P, C]`` float32."""
    h, w = images.shape[:2]
    x = np.clip(points[..., 0].astype(np.float32), 0, w - 1).ravel()
    y = np.clip(points[..., 1].astype(np.float32), 0, h - 1).ravel()
    x0 = np.minimum(x.astype(np.intp), w - 2)  # floor: x >= 0
    y0 = np.minimum(y.astype(np.intp), h - 2)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    flat, corner = images.reshape(h * w, -1), y0 * w + x0
    top_left, top_right = np.take(flat, corner, 0), np.take(flat, corner + 1, 0)
    bottom_left, bottom_right = np.take(flat, corner + w, 0), np.take(flat, corner + w + 1, 0)
    top = top_left + (top_right - top_left) * fx
    bottom = bottom_left + (bottom_right - bottom_left) * fx
    return (top + (bottom - top) * fy).reshape(points.shape[:-1] + (flat.shape[1],))


def _gray_with_gradients(features: FrameFeatures, t: int) -> np.ndarray:
    """Frame ``t``'s grey image (:meth:`FrameFeatures.gray`) and its x and y derivatives, ``[H, W, 3]``."""
    gray = features.gray(t)
    return np.stack([gray, cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3) / 8,
                     cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3) / 8], -1)


def _weighted_stats(values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and standard deviation over the last axis: ``(mean [K, 1], std [K, 1])``."""
    mean = (values * weights).sum(-1, keepdims=True)
    return mean, np.sqrt(((values - mean) ** 2 * weights).sum(-1, keepdims=True)) + 1e-6


def _spread(x: np.ndarray, shift: np.ndarray, qt: np.ndarray) -> np.ndarray:
    """Tracks ``x [N, T, 2]`` moved by ``shift [N, T, 2]`` (NaN where not aligned) interpolated
    linearly in time over each track's finite frames and smoothed by ``[1, 2, 1] / 4``; the query
    frames ``qt [N]`` and non-finite positions stay. Returns float32."""
    x = x.copy()
    for n in np.flatnonzero(np.isfinite(shift).all(-1).sum(1) > 1):  # aligned somewhere besides the query
        known = np.flatnonzero(np.isfinite(shift[n]).all(-1))
        fill = np.flatnonzero(np.isfinite(x[n]).all(-1))
        move = interpolate_in_time(fill, known, shift[n, known])
        if len(fill) > 2:
            padded = np.concatenate([move[:1], move, move[-1:]])
            move = 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]
        move[fill == qt[n]] = 0.0
        x[n, fill] += move
    return x.astype(np.float32)


def align_to_query(tracks, occluded, query_points, features: FrameFeatures, radius: int = 4,
                   max_shift: float = 2.5, min_ncc: float = 0.9, iterations: int = 10, support=None) -> np.ndarray:
    """Align the visible positions of ``tracks [N, T, 2]`` (x, y pixels of ``features``' frames),
    with ``occluded [N, T]`` bool and ``query_points [N, 3]`` (t, y, x), to the query's patch, as the
    module docstring says. ``support [N, 2P+1, 2P+1]`` (``P =`` :data:`~fastomni.refind.PATCH`,
    at least ``radius``): weights of the patches' pixels, as for
    :func:`~fastomni.refind.refind_lost`; the fit's pixels take its centre ``2 radius + 1`` square,
    which must not be all 0. Default: all 1. Returns the tracks ``[N, T, 2]`` float32 (non-finite
    positions as they are)."""
    x, occ, q = track_arrays(tracks, occluded, query_points, features)
    num, frames = occ.shape
    if not (int(radius) == radius >= 1 and max_shift > 0 and -1 <= min_ncc <= 1 and int(iterations) == iterations >= 1
            and (support is None or radius <= PATCH)):
        raise InputError("align_to_query needs an integer radius >= 1 (at most PATCH with a support), max_shift > 0, "
                         f"min_ncc in [-1, 1] and an integer iterations >= 1; got {radius}, {max_shift}, {min_ncc}, "
                         f"{iterations}")
    radius, iterations = int(radius), int(iterations)
    h, w = features.frames.shape[1:3]
    qt = q[:, 0].astype(np.int64)
    anchor = q[:, [2, 1]]
    side = np.arange(-radius, radius + 1, dtype=np.float64)
    offsets = np.stack(np.meshgrid(side, side, indexing="xy"), -1).reshape(-1, 2)  # [P, 2]
    support = patch_support(support, num)
    crop = support[:, PATCH - radius:PATCH + radius + 1, PATCH - radius:PATCH + radius + 1] if radius <= PATCH \
        else np.ones((num, 2 * radius + 1, 2 * radius + 1), np.float32)
    if not (crop.reshape(num, -1).sum(1) > 0).all():
        raise InputError(f"support: the centre {2 * radius + 1}x{2 * radius + 1} square of a patch is all 0")
    weights = np.exp(-(offsets ** 2).sum(1) / (2 * (radius / 2) ** 2)) * crop.reshape(num, -1)  # [N, P]
    weights = (weights / weights.sum(1, keepdims=True)).astype(np.float32)
    lo, hi = np.array([1.0, 1.0]), np.array([w - 2.0, h - 2.0])  # patches keep one pixel from the edge
    template = np.empty((num, len(offsets)), np.float32)
    verify = np.empty((num, 2 * PATCH + 1, 2 * PATCH + 1), np.float32)  # the query's verification patches
    for a in np.unique(qt):
        rows = qt == a
        template[rows] = _bilinear(features.gray(a)[..., None], anchor[rows][:, None] + offsets)[..., 0]
        verify[rows] = query_patches(features.gray(a), anchor[rows])
    template_mean, template_std = _weighted_stats(template, weights)
    template = template - template_mean
    template_inside = ((anchor - radius >= lo) & (anchor + radius <= hi)).all(1)
    images = {}
    shift = np.full_like(x, np.nan)  # aligned minus given position, where aligned; 0 at the query
    shift[np.arange(num), qt] = 0.0
    for direction in (1, -1):
        warp = np.tile(np.eye(2), (num, 1, 1))  # A of the last frame aligned, per track
        warp_frame = qt.copy()  # and that frame
        for step in range(1, frames):
            t = qt + direction * step
            for f in np.unique(t[(t >= 0) & (t < frames)]):
                rows = np.flatnonzero((t == f) & ~occ[:, f] & np.isfinite(x[:, f]).all(-1) & template_inside)
                if not len(rows):
                    continue
                if f not in images:
                    images[f] = _gray_with_gradients(features, f)
                start, a_mat, row_weights = x[rows, f], warp[rows].copy(), weights[rows]
                p = start.copy()
                for it in range(iterations + 1):
                    points = p[:, None] + offsets @ a_mat.transpose(0, 2, 1)
                    sampled = _bilinear(images[f], points)
                    mean, std = _weighted_stats(sampled[..., 0], row_weights)
                    gain = template_std[rows] / std
                    patch = (sampled[..., 0] - mean) * gain
                    residual = patch - template[rows]
                    robust = row_weights * np.minimum(1.0, HUBER * template_std[rows] / (np.abs(residual) + 1e-9))
                    if it == iterations:
                        break
                    gx, gy = sampled[..., 1] * gain, sampled[..., 2] * gain
                    jac = np.stack([gx * offsets[:, 0], gx * offsets[:, 1], gy * offsets[:, 0], gy * offsets[:, 1],
                                    gx, gy], -1)  # d patch / d (A11, A12, A21, A22, px, py)  [K, P, 6]
                    jac -= np.einsum("kp,kpj->kj", row_weights, jac)[:, None]  # the patch's mean moves with it
                    weighted = (jac * robust[..., None]).transpose(0, 2, 1)  # [K, 6, P]
                    hessian = (weighted @ jac).astype(np.float64)
                    # damped relative to its own scale: a fit on a few collinear pixels, or on a patch
                    # without contrast (its gain explodes), is rank-deficient at any size
                    hessian += (1e-6 + 1e-12 * np.trace(hessian, axis1=1, axis2=2))[:, None, None] * np.eye(6)
                    delta = -np.linalg.solve(hessian, (weighted @ residual[..., None]).astype(np.float64))[..., 0]
                    a_mat += delta[:, :4].reshape(-1, 2, 2)
                    p += delta[:, 4:]
                # the fitted warp about the query's position: A (c + u) + p - A c = p + A u
                fitted = np.concatenate([a_mat, (p - np.einsum("kij,kj->ki", a_mat, anchor[rows]))[..., None]], -1)
                ncc = patch_ncc(verify[rows], warped_patches(features.gray(f), anchor[rows], np.nan_to_num(fitted)),
                                support[rows])
                bent = np.linalg.norm((a_mat - warp[rows]).reshape(-1, 4), axis=1) / abs(f - warp_frame[rows])
                position_var = np.linalg.eigvalsh(np.linalg.inv(hessian)[:, 4:, 4:])[:, -1]  # per unit of residual
                aperture = np.sqrt(position_var) * template_std[rows, 0]
                good = ((ncc >= min_ncc) & (bent <= MAX_WARP_CHANGE) & (aperture <= MAX_APERTURE)
                        & np.isfinite(p).all(1) & (np.linalg.norm(p - start, axis=1) <= max_shift)
                        & ((points >= lo) & (points <= hi)).all((1, 2)))
                # weighted least squares: the residual's variance times H^-1 (sum w^2 J J^T) H^-1, about
                # position_var * sum(w^2) / sum(w) for the robust weights w
                fit_var = (robust * residual ** 2).sum(1) * (robust ** 2).sum(1) / robust.sum(1) ** 2 * position_var
                track_var = TRACK_DRIFT ** 2 * abs(f - qt[rows])
                weight = track_var / (track_var + fit_var)
                shift[rows[good], f] = (p[good] - start[good]) * weight[good, None]
                warp[rows[good]] = a_mat[good]
                warp_frame[rows[good]] = f
    return _spread(x, shift, qt)
