"""Tracking metrics: TAP-Vid's (occlusion accuracy, <delta^x, Jaccard) and OmniMotion's temporal
coherence, for one video.

A predicted position that is not finite (a point whose rays diverged) means "no estimate": the
metrics count it as predicted occluded (so it is never within a threshold), and temporal
coherence skips the triplets that contain one. :func:`no_estimate` finds them.

Both rescale positions to a 256 x 256 image first, as TAP-Vid and OmniMotion evaluate:
``x_256 = x_px * 256 / w`` for predictions in pixels and ``x_256 = x_norm * 256`` for ground truth
normalized as ``(x / w, y / h)`` (the convention of ``fastomni.synthetic``, and what OmniMotion's
evaluation assumes for TAP-Vid: it multiplies the normalized points by ``(w, h)`` and compares
them with pixel predictions directly).

Example::

    >>> import numpy as np
    >>> gt = np.array([[[0.25, 0.5], [0.5, 0.5]]], np.float32)    # one point, two frames
    >>> occ = np.zeros((1, 2), bool)
    >>> m = tapvid_metrics(gt * [32, 32], occ, gt, occ, np.array([[0, 16, 8]]), (32, 32))
    >>> m["average_jaccard"], m["occlusion_accuracy"]
    (1.0, 1.0)
"""
from __future__ import annotations

import os

import numpy as np

from fastomni.inputs import InputError, InputTypeError, load_array

__all__ = ["THRESHOLDS", "error_budget", "evaluate", "evaluate_tracks", "no_estimate", "tapvid_metrics",
           "temporal_coherence"]

THRESHOLDS = (1, 2, 4, 8, 16)  # pixels at 256 x 256
FAR = 4  # pixels at 256 x 256: error_budget counts visible positions farther off than this
EVAL_SIZE = 256


def no_estimate(tracks) -> np.ndarray:
    """``[N, T]`` bool: where ``tracks [N, T, 2]`` holds no estimate (a non-finite coordinate)."""
    return ~np.isfinite(np.asarray(tracks, np.float64)).all(axis=-1)


def _array(x, name: str, shape: tuple, dtype_kind: str, finite: bool = True) -> np.ndarray:
    """``x`` as an array of ``shape`` (-1: any size); float (``"f"``) arrays must be finite unless
    ``finite=False``."""
    a = np.asarray(x)
    if a.ndim != len(shape) or any(s != -1 and s != d for s, d in zip(shape, a.shape)):
        want = "[" + ", ".join("?" if s == -1 else str(s) for s in shape) + "]"
        raise InputError(f"{name} must have shape {want}, got {a.shape}")
    if dtype_kind == "b":
        if a.dtype != bool:
            raise InputTypeError(f"{name} must be a bool array, got {a.dtype}")
    else:
        if a.dtype.kind not in "fiu":
            raise InputTypeError(f"{name} must be numeric, got {a.dtype}")
        a = a.astype(np.float64)
        if finite and not np.isfinite(a).all():
            raise InputError(f"{name} contains NaN or inf")
    return a


def _image_size(image_size) -> tuple[int, int]:
    if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
            or not all(isinstance(v, (int, np.integer)) and v > 0 for v in image_size)):
        raise InputError(f"image_size must be (h, w) positive ints, got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def _to_256(pred_tracks: np.ndarray, gt_points: np.ndarray, image_size) -> tuple[np.ndarray, np.ndarray]:
    h, w = _image_size(image_size)
    return pred_tracks * np.array([EVAL_SIZE / w, EVAL_SIZE / h]), gt_points * EVAL_SIZE


def _evaluated(query_frame: np.ndarray, num_frames: int, query_mode: str) -> np.ndarray:
    """``[N, T]`` bool: the entries a query mode evaluates (after the query frame, or all but it)."""
    frames, q = np.arange(num_frames)[None], query_frame.astype(np.int64)[:, None]
    return frames > q if query_mode == "first" else frames != q


def tapvid_metrics(pred_tracks, pred_occluded, gt_points, gt_occluded, query_points, image_size,
                   query_mode: str = "first") -> dict:
    """TAP-Vid metrics of one video with ``N`` query points over ``T`` frames.

    pred_tracks ``[N, T, 2]`` (x, y) pixels; pred_occluded ``[N, T]`` bool; gt_points ``[N, T, 2]``
    normalized (x / w, y / h); gt_occluded ``[N, T]`` bool; query_points ``[N, 3]`` (t, y, x), only
    ``t`` is used; image_size ``(h, w)`` of the predictions' pixels.

    Evaluated entries: frames after the query frame (``query_mode="first"``, where the query is the
    point's first visible frame) or all frames but the query frame (``"strided"``). Over them:

    * ``occlusion_accuracy``: fraction with ``pred_occluded == gt_occluded``;
    * ``pts_within_d`` (d = 1, 2, 4, 8, 16 px at 256 x 256): fraction of ground-truth-visible
      entries predicted strictly within ``d``, whatever the predicted occlusion;
      ``average_pts_within_thresh`` (<delta^x_avg) is their mean;
    * ``jaccard_d = TP / (TP + FN + FP)``: TP visible, predicted visible and within ``d``; FN
      visible but not TP; FP predicted visible but occluded or not within ``d``;
      ``average_jaccard`` is their mean.

    Returns a dict of Python floats. Raises ``ValueError`` when no entry is evaluated or none of
    them is visible (the fractions would be 0/0).
    """
    if query_mode not in ("first", "strided"):
        raise InputError(f"query_mode must be 'first' or 'strided', got {query_mode!r}")
    gt_points = _array(gt_points, "gt_points", (-1, -1, 2), "f")
    n, t = gt_points.shape[:2]
    pred_tracks = _array(pred_tracks, "pred_tracks", (n, t, 2), "f", finite=False)
    missing = no_estimate(pred_tracks)
    pred_occluded = _array(pred_occluded, "pred_occluded", (n, t), "b") | missing
    gt_occluded = _array(gt_occluded, "gt_occluded", (n, t), "b")
    query_points = _array(query_points, "query_points", (n, 3), "f")
    query_frame = query_points[:, 0]
    if np.any(query_frame != np.round(query_frame)) or np.any((query_frame < 0) | (query_frame >= t)):
        raise InputError(f"query_points[:, 0] must be integer frame indices in [0, {t - 1}]")
    pred, gt = _to_256(pred_tracks, gt_points, image_size)

    evaluated = _evaluated(query_frame, t, query_mode)
    visible = ~gt_occluded & evaluated
    if not evaluated.any():
        raise InputError("no frames to evaluate (every query is on the last frame)")
    if not visible.any():
        raise InputError("no ground-truth-visible points in the evaluated frames")
    pred_visible = ~pred_occluded & evaluated

    metrics = {"occlusion_accuracy": float((pred_occluded == gt_occluded)[evaluated].mean())}
    sq_dist = np.where(missing, np.inf, np.sum(np.where(missing[..., None], 0.0, pred - gt) ** 2, axis=-1))
    for d in THRESHOLDS:
        within = sq_dist < d * d
        correct = within & visible
        metrics[f"pts_within_{d}"] = float(correct.sum() / visible.sum())
        true_pos = (correct & pred_visible).sum()
        false_pos = (pred_visible & ~(within & ~gt_occluded)).sum()
        metrics[f"jaccard_{d}"] = float(true_pos / (visible.sum() + false_pos))
    metrics["average_pts_within_thresh"] = float(np.mean([metrics[f"pts_within_{d}"] for d in THRESHOLDS]))
    metrics["average_jaccard"] = float(np.mean([metrics[f"jaccard_{d}"] for d in THRESHOLDS]))
    return metrics


def error_budget(pred_tracks, pred_occluded, gt_points, gt_occluded, query_points, image_size,
                 query_mode: str = "strided") -> dict:
    """What each kind of error costs :func:`tapvid_metrics`' ``average_jaccard`` (arguments as
    there): the score with the truth put into the prediction, part by part,

    * ``found``: every entry predicted occluded (or not estimated) where the point is visible gets
      the true position and is predicted visible, as if every lost point were found exactly;
    * ``exact``: every entry predicted visible where the point is visible gets the true position;
    * ``both``: both; only entries predicted visible where the point is hidden stay wrong;

    beside ``average_jaccard`` itself, and the fractions of the evaluated entries with each kind of
    error: ``occluded_when_visible`` (of the visible entries), ``visible_when_hidden`` (of the
    hidden ones) and ``far_when_visible`` (of the visible entries predicted visible: farther than
    :data:`FAR` px at 256 x 256); None where there is no such entry. Returns Python floats.
    """
    score = tapvid_metrics(pred_tracks, pred_occluded, gt_points, gt_occluded, query_points, image_size,
                           query_mode)["average_jaccard"]  # checks the arguments
    gt = _array(gt_points, "gt_points", (-1, -1, 2), "f")
    pred = _array(pred_tracks, "pred_tracks", gt.shape, "f", finite=False)
    occluded = _array(pred_occluded, "pred_occluded", gt.shape[:2], "b") | no_estimate(pred)
    hidden = _array(gt_occluded, "gt_occluded", gt.shape[:2], "b")
    h, w = _image_size(image_size)
    truth = gt * np.array([w, h])
    lost, seen = occluded & ~hidden, ~occluded & ~hidden

    def jaccard(tracks, occ):
        return tapvid_metrics(tracks, occ, gt, hidden, query_points, image_size, query_mode)["average_jaccard"]

    query_frame = _array(query_points, "query_points", (gt.shape[0], 3), "f")[:, 0]
    evaluated = _evaluated(query_frame, gt.shape[1], query_mode)
    pred_256, gt_256 = _to_256(np.where(seen[..., None], pred, truth), gt, image_size)
    far = np.linalg.norm(pred_256 - gt_256, axis=-1) > FAR

    def fraction(part, whole):
        whole = whole & evaluated
        return float((part & whole).sum() / whole.sum()) if whole.any() else None

    return {"average_jaccard": score,
            "found": jaccard(np.where(lost[..., None], truth, pred), occluded & ~lost),
            "exact": jaccard(np.where(seen[..., None], truth, pred), occluded),
            "both": jaccard(np.where(hidden[..., None], pred, truth), occluded & hidden),
            "occluded_when_visible": fraction(occluded, ~hidden),
            "visible_when_hidden": fraction(~occluded, hidden),
            "far_when_visible": fraction(far, seen)}


def temporal_coherence(pred_tracks, gt_points, gt_occluded, image_size) -> float:
    """OmniMotion's temporal coherence (TC, lower is better): the mean L2 distance at 256 x 256
    between predicted and ground-truth accelerations ``x_{t+1} - 2 x_t + x_{t-1}``, over every
    point and frame ``t`` whose ground truth is visible at ``t-1``, ``t`` and ``t+1`` (as the
    authors' evaluation script computes it; query frames are not excluded).

    pred_tracks ``[N, T, 2]`` (x, y) pixels; gt_points ``[N, T, 2]`` normalized; gt_occluded
    ``[N, T]`` bool; image_size ``(h, w)``. Needs ``T >= 3`` and one visible triplet. Triplets
    with a non-finite prediction (no estimate) are left out.
    """
    gt_points = _array(gt_points, "gt_points", (-1, -1, 2), "f")
    n, t = gt_points.shape[:2]
    pred_tracks = _array(pred_tracks, "pred_tracks", (n, t, 2), "f", finite=False)
    gt_occluded = _array(gt_occluded, "gt_occluded", (n, t), "b")
    if t < 3:
        raise InputError(f"temporal coherence needs at least 3 frames, got {t}")
    pred, gt = _to_256(pred_tracks, gt_points, image_size)
    skip = gt_occluded | no_estimate(pred_tracks)
    visible = ~(skip[:, :-2] | skip[:, 1:-1] | skip[:, 2:])
    if not visible.any():
        raise InputError("no point is visible (and estimated) in three consecutive frames")
    pred = np.where(np.isfinite(pred), pred, 0.0)

    def accel(x):
        return x[:, 2:] - 2 * x[:, 1:-1] + x[:, :-2]

    return float(np.linalg.norm(accel(pred) - accel(gt), axis=-1)[visible].mean())


def evaluate_tracks(pred_tracks, pred_occluded, gt_points, gt_occluded, query_points, image_size,
                    modes=("first", "strided")) -> dict:
    """:func:`tapvid_metrics` for each query mode in ``modes`` (``{mode: metrics}``) and, with at
    least 3 frames, ``"temporal_coherence"``. Arguments as :func:`tapvid_metrics`."""
    out = {mode: tapvid_metrics(pred_tracks, pred_occluded, gt_points, gt_occluded, query_points, image_size, mode)
           for mode in modes}
    if np.shape(gt_points)[1] >= 3:
        out["temporal_coherence"] = temporal_coherence(pred_tracks, gt_points, gt_occluded, image_size)
    return out


def evaluate(tracks_path: str, gt_path: str, modes=("first", "strided")) -> dict:
    """:func:`evaluate_tracks` of a track file (``fastomni.query.load_tracks``) against ground truth
    in TAP-Vid's layout: ``.npz`` with ``points [N, T, 2]`` normalized (x/w, y/h), ``occluded
    [N, T]``, and ``video [T, H, W, 3]`` or the tracks file's ``image_size``; rows must correspond.
    Query points come from the tracks file (else the ground truth's ``query_points``). The result
    also holds ``"no_estimate"``: how many predicted positions are non-finite (counted as occluded),
    and ``"error_budget"``: :func:`error_budget` for each mode."""
    from fastomni.query import load_tracks

    pred = load_tracks(tracks_path)
    with load_array(gt_path, "ground truth", ".npz") as gt:
        missing = [k for k in ("points", "occluded") if k not in gt.files]
        if missing:
            raise InputError(f"{gt_path} lacks {missing} (TAP-Vid layout: points [N,T,2] normalized, occluded [N,T])")
        points, occluded = gt["points"], gt["occluded"]
        queries = pred.get("query_points", gt["query_points"] if "query_points" in gt.files else None)
        size = (tuple(int(v) for v in pred["image_size"]) if "image_size" in pred
                else tuple(gt["video"].shape[1:3]) if "video" in gt.files else None)
    if queries is None:
        raise InputError("no query points: neither the tracks file nor the ground truth has query_points")
    if size is None:
        raise InputError("image size unknown: the tracks file has no image_size and the ground truth no video")
    if occluded.dtype.kind not in "biu":
        raise InputTypeError(f"{gt_path}: occluded must be bool (or 0/1 integers), got {occluded.dtype}")
    if points.shape[:2] != pred["tracks"].shape[:2]:
        raise InputError(f"{os.path.basename(gt_path)} has {points.shape[0]} points x {points.shape[1]} frames "
                         f"(shape {points.shape}), the tracks {pred['tracks'].shape[0]} x {pred['tracks'].shape[1]}: "
                         "rows must correspond")
    out = evaluate_tracks(pred["tracks"], pred["occluded"], points, occluded.astype(bool), queries, size, modes)
    out["no_estimate"] = int(no_estimate(pred["tracks"]).sum())
    out["error_budget"] = {mode: error_budget(pred["tracks"], pred["occluded"], points, occluded.astype(bool), queries,
                                              size, mode) for mode in modes}
    return out
