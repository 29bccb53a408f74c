"""Find points again after an occlusion, by local feature matches to the query frame (the fast
preset's stage after :mod:`fastomni.refine`).

Flow, chained or fitted by a model, loses a point that is hidden for a few frames: when the point
reappears, nothing links it to where it was (docs/fast-preset.md, round 4: 94-97% of reappearing
points lost). This stage links it by appearance. For a query ``(q, y, x)`` and a frame ``t`` that the
refinement reports occluded:

1. SIFT keypoints (rotation and scale invariant; frames upsampled :data:`UPSAMPLE` times, since
   frames of ~128 px give too few) of frame ``q`` are matched to frame ``t`` (Lowe's ratio test,
   :data:`MATCH_RATIO`);
2. the matches whose keypoint in frame ``q`` lies within ``radius`` pixels of the query (of the
   centre of its cell, ``radius /`` :data:`CELLS_PER_RADIUS` px wide: the queries of a cell share
   the fits) are fitted by a similarity transform ``S`` (RANSAC, :data:`RANSAC_PX`), with at least
   ``min_matches`` inliers; up to :data:`MOTIONS` transforms, each fitted to the matches the ones
   before it left out, since the region may hold surfaces that move apart (an object and the
   background behind it);
3. a candidate ``S(x, y)`` passes when the patch around the query warped by ``S`` correlates with
   frame ``t`` (normalised cross-correlation of grey patches of :data:`PATCH` px radius, at least
   ``min_ncc``; the refiner weights the pixels by the query's surface support,
   :func:`fastomni.refine.surface_support`, so that next to an object's edge the other surface
   does not count) and the colour there (frames blurred as in the refinement's colour test) is within
   ``max_color_change`` of the query's; the passing candidate that correlates best is accepted, and
   the frame reported visible;
4. the frames still reported occluded get positions interpolated linearly in time between the
   nearest visible frames (held at the first or last visible one beyond them). The lost track's
   positions there are on another surface; TAP-Vid's position accuracy counts the frames where the
   point is in fact visible, and the interpolation is a better guess there (round 5 of
   docs/fast-preset.md: mean <δ_avg 0.877 against 0.868 with the lost track's positions). Putting
   the unverified candidates there instead scored 0.886 but made tracks jump (TC 2.7 against 0.24).

The query frame is the anchor because the query is the one position known exactly, and there the
point is seen with its surroundings; anchoring at the last frame the track was visible (where an
occluder is already next to it) found 2-4x fewer points (round 5 of docs/fast-preset.md).

Example (a texture moves 10 px right; a red bar hides the point in frame 1)::

    >>> rng = np.random.default_rng(0)
    >>> tex = cv2.GaussianBlur(rng.integers(0, 256, (64, 64, 3)).astype(np.uint8), (0, 0), 1.0)
    >>> frames = np.stack([tex, np.roll(tex, 10, axis=1), np.roll(tex, 10, axis=1)])
    >>> frames[1, :, 32:48] = (255, 0, 0)
    >>> features = FrameFeatures(frames)
    >>> tracks = np.array([[[30.0, 30.0], [0.0, 0.0], [0.0, 0.0]]])   # lost after frame 0
    >>> x, occ = refind_lost(tracks, np.array([[False, True, True]]), [[0, 30, 30]], features)
    >>> occ.tolist(), np.round(x[0]).tolist()   # frame 1: interpolated
    ([[False, True, False]], [[30.0, 30.0], [35.0, 30.0], [40.0, 30.0]])
"""
from __future__ import annotations

import cv2
import numpy as np

from fastomni.inputs import InputError
from fastomni.preprocess import edge_sample
from fastomni.refine import color_blur

__all__ = ["FrameFeatures", "interpolate_in_time", "patch_ncc", "patch_support", "query_patches", "refind_lost",
           "track_arrays", "warped_patches"]

UPSAMPLE = 2.0  # SIFT runs on frames upsampled this many times
MAX_KEYPOINTS = 2000  # per frame (bounds memory and matching time on large frames)
MATCH_RATIO = 0.8  # Lowe's ratio test
RANSAC_PX = 2.0  # RANSAC's inlier distance, pixels
PATCH = 6  # the verification patch's radius, pixels
NCC_SIGMA = 1.0  # px: the grey frames' blur before the correlation
CELLS_PER_RADIUS = 6  # queries share a fit per cell of radius / CELLS_PER_RADIUS pixels
MOTIONS = 2  # similarity transforms fitted per cell, one after another (docs/fast-preset.md, round 7)


class FrameFeatures:
    """A video's frames ``[T, H, W, 3]`` uint8 (any channel order, one for all) with what
    :func:`refind_lost` reads from them, each computed once, on first use: blurred colour and grey
    frames, SIFT keypoints ``[K, 2]`` (x, y pixels) and descriptors, and the matches of a pair."""

    def __init__(self, frames: np.ndarray):
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise InputError(f"frames [T, H, W, 3] uint8 expected, got {frames.shape} {frames.dtype}")
        self.frames = frames
        self.colors = [None] * len(frames)
        self.grays = [None] * len(frames)
        self.keys = [None] * len(frames)
        self.pairs: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._sift = cv2.SIFT_create(nfeatures=MAX_KEYPOINTS)
        self._matcher = cv2.BFMatcher(cv2.NORM_L2)

    def color(self, t: int) -> np.ndarray:
        """Frame ``t`` blurred as by the refinement's colour test, float32 ``[H, W, 3]``."""
        if self.colors[t] is None:
            self.colors[t] = color_blur(self.frames[t])
        return self.colors[t]

    def gray(self, t: int) -> np.ndarray:
        """Frame ``t`` in grey, blurred by :data:`NCC_SIGMA`, float32 ``[H, W]``."""
        if self.grays[t] is None:
            gray = cv2.cvtColor(self.frames[t], cv2.COLOR_RGB2GRAY).astype(np.float32)
            self.grays[t] = cv2.GaussianBlur(gray, (0, 0), NCC_SIGMA)
        return self.grays[t]

    def keypoints(self, t: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Frame ``t``'s SIFT keypoints ``[K, 2]`` (x, y pixels of the frame) and descriptors."""
        if self.keys[t] is None:
            gray = cv2.cvtColor(self.frames[t], cv2.COLOR_RGB2GRAY)
            big = cv2.resize(gray, None, fx=UPSAMPLE, fy=UPSAMPLE, interpolation=cv2.INTER_CUBIC)
            found, descriptors = self._sift.detectAndCompute(big, None)
            xy = np.array([k.pt for k in found], np.float64).reshape(-1, 2)
            self.keys[t] = ((xy + 0.5) / UPSAMPLE - 0.5, descriptors)  # pixel centres at integers
        return self.keys[t]

    def matches(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Matched keypoints of frames ``a`` and ``b``, ``([M, 2], [M, 2])`` (x, y pixels)."""
        if (a, b) not in self.pairs:
            (xa, da), (xb, db) = self.keypoints(a), self.keypoints(b)
            rows = []
            if da is not None and db is not None and len(db) >= 2:
                for best in self._matcher.knnMatch(da, db, k=2):
                    if len(best) == 2 and best[0].distance < MATCH_RATIO * best[1].distance:
                        rows.append((best[0].queryIdx, best[0].trainIdx))
            ij = np.array(rows, np.int64).reshape(-1, 2)
            self.pairs[(a, b)] = (xa[ij[:, 0]], xb[ij[:, 1]])
        return self.pairs[(a, b)]


def warped_patches(image: np.ndarray, centers: np.ndarray, transforms: np.ndarray) -> np.ndarray:
    """Patches ``[K, 2P+1, 2P+1]`` of ``image`` at ``transforms [K, 2, 3]`` applied to the pixel grid
    of radius :data:`PATCH` around ``centers [K, 2]`` (bilinear, edges reflected)."""
    side = 2 * PATCH + 1
    grid = np.stack(np.meshgrid(np.arange(-PATCH, PATCH + 1), np.arange(-PATCH, PATCH + 1), indexing="xy"), -1)
    points = centers[:, None, None] + grid[None]  # [K, side, side, 2]
    mapped = np.einsum("kij,kabj->kabi", transforms[:, :, :2], points) + transforms[:, None, None, :, 2]
    maps = mapped.reshape(-1, side, 2).astype(np.float32)
    rows = (2**15 - 1) // side * side  # cv2.remap takes maps of fewer than 2^15 rows: whole patches per call
    out = [cv2.remap(image, block[..., 0], block[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
           for block in np.split(maps, range(rows, len(maps), rows))]
    return np.concatenate(out).reshape(-1, side, side)


def query_patches(image: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """The unwarped patches ``[K, 2P+1, 2P+1]`` of ``image`` around ``centers [K, 2]``: what
    :func:`warped_patches` of the other frames are compared with."""
    return warped_patches(image, centers, np.broadcast_to(np.eye(2, 3), (len(centers), 2, 3)))


def patch_ncc(a: np.ndarray, b: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Normalised cross-correlation of patches ``[K, ...]`` pairwise, ``[K]``, each pixel weighted
    by ``weights [K, ...]`` (non-negative, none all 0; default: all 1)."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    w = np.ones_like(a) if weights is None else weights.reshape(len(a), -1)
    w = w / w.sum(1, keepdims=True)
    a = a - (w * a).sum(1, keepdims=True)
    b = b - (w * b).sum(1, keepdims=True)
    return (w * a * b).sum(1) / (np.sqrt((w * a * a).sum(1) * (w * b * b).sum(1)) + 1e-6)


def patch_support(support, num: int) -> np.ndarray:
    """``support`` as float32 ``[num, 2P+1, 2P+1]`` weights of patch pixels (``P =`` :data:`PATCH`);
    None: all 1. Raises :class:`InputError` on another shape, or weights that are negative,
    non-finite or all 0 for a patch."""
    side = 2 * PATCH + 1
    if support is None:
        return np.ones((num, side, side), np.float32)
    support = np.asarray(support, np.float32)
    if support.shape != (num, side, side) or not np.isfinite(support).all() or (support < 0).any() \
            or not (support.reshape(num, -1).sum(1) > 0).all():
        raise InputError(f"support [{num}, {side}, {side}] of finite non-negative weights, none all 0, expected, "
                         f"got {support.shape}")
    return support


def track_arrays(tracks, occluded, query_points, features: FrameFeatures
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``tracks [N, T, 2]``, ``occluded [N, T]`` and ``query_points [N, 3]`` as float64, bool and
    float64 copies, checked against each other and ``features``' T frames (:class:`InputError`)."""
    x = np.array(tracks, np.float64)
    occ = np.array(occluded, bool)
    q = np.array(query_points, np.float64)
    num, frames = occ.shape
    if x.shape != (num, frames, 2) or q.shape != (num, 3) or frames != len(features.frames):
        raise InputError(f"tracks [N, T, 2], occluded [N, T] and query_points [N, 3] with T = "
                         f"{len(features.frames)} frames expected, got {x.shape}, {occ.shape} and {q.shape}")
    return x, occ, q


def interpolate_in_time(frames: np.ndarray, known: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values [K, 2]`` at the increasing frames ``known [K]``, interpolated linearly at ``frames [M]``
    (held at the first or last value beyond them): ``[M, 2]``."""
    return np.stack([np.interp(frames, known, values[:, c]) for c in range(2)], -1)


def refind_lost(tracks, occluded, query_points, features: FrameFeatures, radius: float = 32.0,
                max_color_change: float = 40.0, min_ncc: float = 0.6, min_matches: int = 3, support=None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Re-find the occluded frames of ``tracks [N, T, 2]`` (x, y pixels of ``features``' frames) with
    ``occluded [N, T]`` bool and ``query_points [N, 3]`` (t, y, x), as the module docstring says.
    ``support [N, 2P+1, 2P+1]`` (``P =`` :data:`PATCH`): the weights of the verification patches'
    pixels (:func:`~fastomni.refine.surface_support`: the query's surface only); default: all 1.
    Non-finite positions (frames of another shot) are left as they are. Returns
    ``(tracks [N, T, 2] float32, occluded [N, T] bool)``."""
    x, occ, q = track_arrays(tracks, occluded, query_points, features)
    num, frames = occ.shape
    if not (radius > 0 and max_color_change > 0 and -1 <= min_ncc <= 1 and min_matches >= 2):
        raise InputError("refind_lost needs radius > 0, max_color_change > 0, min_ncc in [-1, 1] and min_matches >= 2; "
                         f"got {radius}, {max_color_change}, {min_ncc}, {min_matches}")
    support = patch_support(support, num)
    h, w = features.frames.shape[1:3]
    qt = q[:, 0].astype(np.int64)
    anchor = q[:, [2, 1]]
    cell_size = radius / CELLS_PER_RADIUS
    cell = np.floor(anchor / cell_size).astype(np.int64)
    lost = occ & np.isfinite(x).all(-1)
    for a in np.unique(qt[lost.any(1)]):
        own = np.flatnonzero(qt == a)  # rows of query frame a; query_color and query_patch are in this order
        query_color = edge_sample(features.color(a), anchor[own].astype(np.float32))
        query_patch = query_patches(features.gray(a), anchor[own])
        for t in np.flatnonzero(lost[own].any(0)):
            rows = own[lost[own, t]]
            src, dst = features.matches(a, t)
            if len(src) < min_matches:
                continue
            keys, inverse = np.unique(cell[rows], axis=0, return_inverse=True)
            transforms = np.full((MOTIONS, len(keys), 2, 3), np.nan)
            for k, key in enumerate(keys):
                near = np.linalg.norm(src - (key + 0.5) * cell_size, axis=1) < radius
                left_src, left_dst = src[near], dst[near]
                for m in range(MOTIONS):
                    if len(left_src) < min_matches:
                        break
                    fit, inliers = cv2.estimateAffinePartial2D(left_src, left_dst, method=cv2.RANSAC,
                                                               ransacReprojThreshold=RANSAC_PX)
                    if fit is None or inliers.sum() < min_matches:
                        break
                    transforms[m, k] = fit
                    outliers = ~inliers.ravel().astype(bool)
                    left_src, left_dst = left_src[outliers], left_dst[outliers]
            best = np.full(len(rows), -np.inf)  # the best passing candidate's correlation per row
            for fits in transforms[:, inverse.ravel()]:
                found = np.einsum("kij,kj->ki", fits[:, :, :2], anchor[rows]) + fits[:, :, 2]  # NaN: no fit
                inside = np.flatnonzero((found[:, 0] >= 0) & (found[:, 0] <= w - 1)
                                        & (found[:, 1] >= 0) & (found[:, 1] <= h - 1))
                if not len(inside):
                    continue
                at = np.searchsorted(own, rows[inside])
                score = patch_ncc(query_patch[at], warped_patches(features.gray(t), anchor[rows[inside]], fits[inside]),
                                  support[rows[inside]])
                color = edge_sample(features.color(t), found[inside].astype(np.float32))
                change = np.linalg.norm(color - query_color[at], axis=1)
                better = (score >= min_ncc) & (change <= max_color_change) & (score > best[inside])
                best[inside[better]] = score[better]
                x[rows[inside[better]], t] = found[inside[better]]
                occ[rows[inside[better]], t] = False
    for n in np.flatnonzero((occ & np.isfinite(x).all(-1)).any(1)):
        finite = np.isfinite(x[n]).all(-1)
        seen, hidden = np.flatnonzero(finite & ~occ[n]), np.flatnonzero(finite & occ[n])
        if len(seen):
            x[n, hidden] = interpolate_in_time(hidden, seen, x[n, seen])
    return x.astype(np.float32), occ
