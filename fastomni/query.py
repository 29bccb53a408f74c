"""Long-range tracks from a trained OmniMotion: sparse query points or every pixel of a frame.

The results are the original's (``trainer.py``: ``get_correspondences_and_occlusion_masks_for_pixels``
per target frame, as ``viz.py``/``eval_video_correspondences`` run it): a query pixel's ray samples
are mapped to the canonical volume, composited, mapped into the target frame (the largest-weight
sample with ``use_max_loc``, else the weight-composited point) and projected; the target frame's
own ray at the predicted pixel gives the occlusion score ``sum_k w_k [d_k < depth - 1.1 (max-min)/K]``,
occluded if above ``occlusion_th``, and (TAP-Vid's convention, not the original's) occluded where the
track leaves the image. At the query's own frame the track is the query pixel, visible.

The work is arranged differently, for the same numbers:

* a query ray's canonical samples and weights are computed once, not once per target frame;
* with ``use_max_loc`` only the chosen sample is mapped into each target frame (the original maps
  all ``K`` and keeps one);
* the occlusion ray evaluates only the samples in front of ``depth - eps``: they form a prefix of
  the ray, and a sample's weight depends only on the samples before it, so the others cannot
  change the score.

Per query pixel and target frame this costs one inverse mapping plus ``m <= K`` forward mappings
and colour queries, against ``3K`` mappings and ``2K`` colour queries.

Files: :func:`save_tracks` / :func:`export_dense` write compressed ``.npz`` (``tracks [N, T, 2]``
(x, y) pixels, ``occluded [N, T]``, ``scores [N, T]``, ``query_points [N, 3]`` (t, y, x),
``image_size`` (h, w)); dense exports are stored one target frame per entry, written as computed,
so a long video never holds all frames in memory. :func:`load_tracks` reads either back.

Example::

    >>> import torch
    >>> from fastomni.nn import OmniMotion
    >>> m = OmniMotion(num_imgs=3, h=8, w=8, num_samples_ray=4)
    >>> tracks, occluded, scores = track_points(m, [[0, 2.0, 3.0], [1, 5.0, 5.0]])
    >>> tracks.shape, occluded.shape, tracks[0, 0].tolist()
    ((2, 3, 2), (2, 3), [3.0, 2.0])
"""
from __future__ import annotations

import io
import os
import warnings
import zipfile
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from fastomni._atomic import atomic_output
from fastomni._nvtx import annotate
from fastomni.inputs import InputError, check_query_points, load_array
from fastomni.nn.model import OmniMotion
from fastomni.ops.composite import composite

__all__ = [
    "HALF_MAX_ERROR",
    "NoEstimateWarning",
    "PrecisionWarning",
    "check_query_points",
    "dense_tracks",
    "export_dense",
    "iter_tracks",
    "load_tracks",
    "pair_flows",
    "rescale_points",
    "save_tracks",
    "track_points",
]


def _device(model: OmniMotion) -> torch.device:
    return next(model.parameters()).device


def _dtype(model: OmniMotion) -> torch.dtype:
    return next(model.parameters()).dtype


def rescale_points(xy: np.ndarray, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> np.ndarray:
    """(x, y) pixels ``[..., 2]`` of an image of size ``from_hw`` -> the same scene points in a resized
    image of size ``to_hw`` (pixel centres at integers, as ``cv2.resize`` samples)."""
    sx, sy = to_hw[1] / from_hw[1], to_hw[0] / from_hw[0]
    out = np.array(xy, dtype=np.float64, copy=True)
    out[..., 0] = (out[..., 0] + 0.5) * sx - 0.5
    out[..., 1] = (out[..., 1] + 0.5) * sy - 0.5
    return out


class _QueryRays:
    """Canonical samples of query rays: per query ``u [N, S, 3]`` (S = 1, the largest-weight
    sample, with ``use_max_loc``; else all K samples and their densities ``density [N, K]``)."""

    def __init__(self, model: OmniMotion, frames: np.ndarray, px: Tensor, use_max_loc: bool, chunk: int):
        self.use_max_loc = use_max_loc
        s = 1 if use_max_loc else model.num_samples_ray
        self.u = px.new_empty(len(px), s, 3)
        self.density = None if use_max_loc else px.new_empty(len(px), s)
        for f in np.unique(frames):
            rows = torch.from_numpy(np.flatnonzero(frames == f)).to(px.device)
            for part in rows.split(chunk):
                x, _ = model.sample_rays(px[part][None])
                u = model.map_to_canonical(x, [int(f)])[0]  # [P, K, 3]
                density = model.color_density(u)[1]  # [P, K]
                if use_max_loc:
                    self.u[part] = composite(density, points=u, select_max=True).point[:, None]
                else:
                    self.u[part], self.density[part] = u, density

    def to_frame(self, model: OmniMotion, j: int, chunk: int) -> tuple[Tensor, Tensor]:
        """Predicted pixels ``[N, 2]`` and depths ``[N, 1]`` in frame ``j``."""
        out = []
        for rows in torch.arange(len(self.u), device=self.u.device).split(chunk):
            x2 = model.map_from_canonical(self.u[rows][None], [j])[0]  # [P, S, 3]
            x2 = x2[:, 0] if self.use_max_loc else composite(self.density[rows], points=x2).point
            out.append(x2)
        return model.project(torch.cat(out))


def _occlusion_scores(model: OmniMotion, j: int, px2: Tensor, depth: Tensor, chunk: int) -> Tensor:
    """Occlusion scores ``[N]`` of predicted pixels ``px2 [N, 2]`` at depths ``depth [N, 1]`` in frame
    ``j``, evaluating only the ray samples in front of ``depth - eps`` (the rest weigh nothing)."""
    eps = model.occlusion_eps
    scores = []
    for rows in torch.arange(len(px2), device=px2.device).split(max(1, chunk)):
        x, d = model.sample_rays(px2[rows][None])
        x, d = x[0], d[0, ..., 0]  # [P, K, 3], [P, K]
        finite = torch.isfinite(px2[rows]).all(-1) & torch.isfinite(depth[rows, 0])
        front = (d < depth[rows] - eps) & finite[:, None]  # a prefix of each ray: depths increase
        density = torch.zeros_like(d)
        if bool(front.any()):
            u = model.map_to_canonical(x[front][None], [j])
            density[front] = model.color_density(u)[1][0]
        score = composite(density, mask=d < depth[rows] - eps).opacity[:, 0]
        scores.append(torch.where(finite, score, torch.nan))  # a diverged model's point: no score
    return torch.cat(scores)


@torch.no_grad()
def iter_tracks(model: OmniMotion, query_points, use_max_loc: bool = True, occlusion_th: float = 0.99,
                chunk_size: int = 10000, progress: bool = False
                ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield, per target frame ``j``, ``(j, xy [N, 2] float32 (x, y) pixels, occluded [N] bool,
    scores [N] float32)`` for query points ``[N, 3]`` rows (t, y, x).

    A point mapped outside the image is reported occluded (TAP-Vid's convention, which its ground
    truth follows). A point the model maps to a non-finite location (a diverged model) keeps that
    location ("no estimate", see :func:`fastomni.metrics.no_estimate`), gets score NaN and is
    reported occluded."""
    q = check_query_points(query_points, model.num_imgs, model.h, model.w)
    if chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
    was_training = model.training
    model.eval()
    try:
        dev, dt = _device(model), _dtype(model)
        frames = q[:, 0].astype(np.int64)
        px = torch.from_numpy(q[:, [2, 1]]).to(dev, dt)
        with annotate("query.canonical"):
            rays = _QueryRays(model, frames, px, use_max_loc, chunk_size)
        desc = f"track ({dev.type}, {torch.get_num_threads()} threads)"
        for j in tqdm(range(model.num_imgs), desc=desc, unit="frame", disable=not progress):
            with annotate("query.to_frame"):
                px2, depth = rays.to_frame(model, j, chunk_size)
            with annotate("query.occlusion"):
                scores = _occlusion_scores(model, j, px2, depth, chunk_size)
            yield frame_result(model, q, j, px2, scores, occlusion_th)
    finally:
        model.train(was_training)


def frame_result(model: OmniMotion, q: np.ndarray, j: int, px2: Tensor, scores: Tensor, occlusion_th: float
                 ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """``(j, xy [N, 2], occluded [N], scores [N])`` for queries ``q [N, 3]`` mapped to frame ``j``:
    a query's own frame gives its pixel (score 0); occluded where the score exceeds ``occlusion_th``,
    is NaN, the point is not finite or outside the image. In a video with shot cuts
    (``model.shots``), a query has no estimate (NaN, occluded) in another shot's frames."""
    xy = px2.float().cpu().numpy()
    sc = scores.float().cpu().numpy()
    own = q[:, 0].astype(np.int64) == j
    xy[own], sc[own] = q[own][:, [2, 1]], 0.0
    if model.shots is not None:
        other = model.shots[q[:, 0].astype(np.int64)] != model.shots[j]
        xy[other], sc[other] = np.nan, np.nan
    outside = (xy[:, 0] < 0) | (xy[:, 0] > model.w - 1) | (xy[:, 1] < 0) | (xy[:, 1] > model.h - 1)
    return j, xy, (sc > occlusion_th) | np.isnan(sc) | ~np.isfinite(xy).all(-1) | outside, sc


def track_points(model: OmniMotion, query_points, use_max_loc: bool = True, occlusion_th: float = 0.99,
                 chunk_size: int = 10000, progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Track query points ``[N, 3]`` rows (t, y, x) pixels through every frame.

    Returns ``(tracks [N, T, 2] float32 (x, y) pixels, occluded [N, T] bool, scores [N, T]
    float32)``; ``occluded``: ``scores > occlusion_th``, or outside the image (see :func:`iter_tracks`).
    """
    q = check_query_points(query_points, model.num_imgs, model.h, model.w)
    n, t = len(q), model.num_imgs
    tracks, occluded, scores = np.zeros((n, t, 2), np.float32), np.zeros((n, t), bool), np.zeros((n, t), np.float32)
    for j, xy, occ, sc in iter_tracks(model, q, use_max_loc, occlusion_th, chunk_size, progress=progress):
        tracks[:, j], occluded[:, j], scores[:, j] = xy, occ, sc
    return tracks, occluded, scores


def _grid_queries(model: OmniMotion, query_frame: int) -> np.ndarray:
    if not 0 <= query_frame < model.num_imgs:
        raise InputError(f"query frame {query_frame} outside 0..{model.num_imgs - 1}")
    ys, xs = np.mgrid[0:model.h, 0:model.w]
    return np.stack([np.full(xs.size, query_frame), ys.ravel(), xs.ravel()], axis=1).astype(np.float64)


def dense_tracks(model: OmniMotion, query_frame: int, use_max_loc: bool = True, occlusion_th: float = 0.99,
                 chunk_size: int = 10000, progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pixel of ``query_frame`` tracked through every frame: :func:`track_points` on the
    pixel grid, rows in row-major pixel order (``n = y * w + x``). Returns ``(tracks [H*W, T, 2],
    occluded [H*W, T], scores [H*W, T])``."""
    return track_points(model, _grid_queries(model, query_frame), use_max_loc, occlusion_th, chunk_size, progress)


@torch.no_grad()
def pair_flows(model: OmniMotion, ids1, ids2, use_max_loc: bool = True, chunk_size: int = 10000) -> np.ndarray:
    """The model's flow over every pixel from frame ``ids1[n]`` to ``ids2[n]``: ``[n, H, W, 2]`` float32
    pixels (the original's ``get_pred_flows``, which feeds the hard-mining cache)."""
    if len(ids1) != len(ids2):
        raise ValueError(f"ids1 and ids2 must have the same length, got {len(ids1)} and {len(ids2)}")
    was_training = model.training
    model.eval()
    try:
        dev, dt = _device(model), _dtype(model)
        ys, xs = torch.meshgrid(torch.arange(model.h), torch.arange(model.w), indexing="ij")
        grid = torch.stack([xs, ys], -1).reshape(-1, 2).to(dev, dt)
        flows = []
        for i, j in zip(ids1, ids2):
            rays = _QueryRays(model, np.full(len(grid), int(i)), grid, use_max_loc, chunk_size)
            px2, _ = rays.to_frame(model, int(j), chunk_size)
            flows.append((px2 - grid).reshape(model.h, model.w, 2).float().cpu().numpy())
        return np.stack(flows)
    finally:
        model.train(was_training)


# -- files ------------------------------------------------------------------------------------------
def _check_npz_path(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder {folder} does not exist")
    if not path.endswith(".npz"):
        raise InputError(f"track files are .npz; {path} does not end in .npz")


def _write_entry(zf: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    zf.writestr(name + ".npy", buf.getvalue())


def _check_tracks(tracks, occluded, scores, query_points):
    tracks, occluded = np.asarray(tracks), np.asarray(occluded)
    if tracks.ndim != 3 or tracks.shape[-1] != 2:
        raise InputError(f"tracks must have shape [N, T, 2], got {tracks.shape}")
    if occluded.shape != tracks.shape[:2]:
        raise InputError(f"occluded must have shape {tracks.shape[:2]}, got {occluded.shape}")
    if scores is not None and np.shape(scores) != tracks.shape[:2]:
        raise InputError(f"scores must have shape {tracks.shape[:2]}, got {np.shape(scores)}")
    if query_points is not None and np.shape(query_points) != (tracks.shape[0], 3):
        raise InputError(f"query_points must have shape ({tracks.shape[0]}, 3), got {np.shape(query_points)}")
    return tracks, occluded


class PrecisionWarning(UserWarning):
    """``half=True`` could not store some tracks as float16 within :data:`HALF_MAX_ERROR`; they were
    stored as float32."""


class NoEstimateWarning(UserWarning):
    """A track file holds non-finite positions: points whose rays diverged, with no estimate (see
    :func:`fastomni.metrics.no_estimate`)."""


def _warn_no_estimate(path: str, missing: int, total: int) -> None:
    if missing:
        warnings.warn(f"{path}: {missing} of {total} track positions have no estimate (non-finite: in another "
                      "shot of a video with cuts, or where the model diverged); stored as they are, read as occluded",
                      NoEstimateWarning, stacklevel=3)


HALF_MAX_ERROR = 0.05  # pixels: the largest rounding error accepted for float16 displacements


def _stored_xy(xy: np.ndarray, start: np.ndarray | None, half: bool) -> tuple[np.ndarray, str | None]:
    """Tracks as stored, and why float16 was refused (None if it was not). Without ``half``: float32
    pixels. With it: displacements from the query points ``start``, float16 if every finite one is
    within float16's range and rounds by at most ``HALF_MAX_ERROR``, else float32 (float16 keeps
    ~3 significant digits: 0.06 px at 128-256 px, 0.25 px at 512-1024)."""
    if not half:
        return xy.astype(np.float32), None
    disp = np.asarray(xy, np.float64) - start
    with np.errstate(over="ignore"):
        f16 = disp.astype(np.float16)
    finite = np.isfinite(disp)  # a diverged point stays non-finite: "no estimate" in either dtype
    if (finite & ~np.isfinite(f16)).any():
        reason = f"displacements up to {np.abs(disp[finite]).max():.0f} px exceed float16's range (65504)"
    else:
        err = float(np.abs(f16[finite].astype(np.float64) - disp[finite]).max(initial=0.0))
        if err <= HALF_MAX_ERROR:
            return f16, None
        reason = f"float16 would round displacements by up to {err:.3f} px (limit {HALF_MAX_ERROR} px)"
    return disp.astype(np.float32), reason


def save_tracks(path: str, tracks, occluded, query_points=None, scores=None, image_size=None,
                half: bool = False) -> str:
    """Write tracks as a compressed ``.npz`` (atomically): ``tracks [N, T, 2]`` (x, y) pixels,
    ``occluded [N, T]`` bool, optional ``scores [N, T]``, ``query_points [N, 3]`` (t, y, x) and
    ``image_size`` (h, w). ``half`` stores tracks as float16 displacements from the query points
    (needs ``query_points``) and scores as float16; where float16 would round a displacement by
    more than ``HALF_MAX_ERROR`` px or overflow, the tracks are stored float32 with a
    :class:`PrecisionWarning`. Non-finite tracks (no estimate) are stored as they are, with a
    :class:`NoEstimateWarning` giving their count."""
    tracks, occluded = _check_tracks(tracks, occluded, scores, query_points)
    if half and query_points is None:
        raise InputError("half=True stores displacements from the query points: pass query_points")
    _check_npz_path(path)
    with atomic_output(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            start = None if query_points is None else np.asarray(query_points, np.float64)[:, None, [2, 1]]
            stored, refused = _stored_xy(tracks, start, half)
            _write_entry(zf, "tracks", stored)
            _write_entry(zf, "occluded", occluded.astype(bool))
            _write_entry(zf, "relative", np.array(half))
            if scores is not None:
                _write_entry(zf, "scores", np.asarray(scores).astype(np.float16 if half else np.float32))
            if query_points is not None:
                _write_entry(zf, "query_points", np.asarray(query_points, np.float32))
            if image_size is not None:
                _write_entry(zf, "image_size", np.asarray(image_size, np.int64))
    if refused:
        warnings.warn(f"{path}: {refused}; stored float32 instead of float16", PrecisionWarning, stacklevel=2)
    _warn_no_estimate(path, int((~np.isfinite(tracks).all(-1)).sum()), tracks.shape[0] * tracks.shape[1])
    return path


def export_dense(model: OmniMotion, query_frame: int, path: str, use_max_loc: bool = True,
                 occlusion_th: float = 0.99, half: bool = False, chunk_size: int = 10000,
                 scale_to: tuple[int, int] | None = None, progress: bool = True, tables=None, results=None,
                 refine=None) -> str:
    """Track every pixel of ``query_frame`` to every frame and write ``path`` (``.npz``), one entry
    per target frame (``tracks_{t:05d} [H*W, 2]``, ``occluded_…``, ``scores_…``) written as it is
    computed. ``scale_to`` (h, w) rescales tracks and query points to another image size (the
    video's, when the model ran on downscaled frames). ``half``: as in :func:`save_tracks`, decided
    per target frame (one :class:`PrecisionWarning` lists the frames stored float32).
    :func:`load_tracks` reassembles ``[H*W, T, ...]``. ``tables``: an
    :class:`fastomni.field.OcclusionTables` of ``model`` for the occlusion scores (else the exact
    per-point occlusion ray). ``results``: the per-frame ``(j, xy, occluded, scores)`` computed
    elsewhere (:func:`fastomni.distributed.export_dense_sharded`: split over ranks). ``refine``: a
    function ``(tracks [H*W, T, 2], occluded [H*W, T], queries [H*W, 3]) -> (tracks, occluded)`` in the
    model's pixels (:func:`fastomni.refine.refine_tracks` on the run's flow), applied to all frames
    at once before any is written (it then holds ``H*W*T`` tracks in memory)."""
    queries = _grid_queries(model, query_frame)
    out_q = queries.copy()
    size = (model.h, model.w)
    if scale_to is not None:
        out_q[:, [2, 1]] = rescale_points(queries[:, [2, 1]], size, scale_to)
        size = tuple(scale_to)
    start = out_q[:, [2, 1]]
    refused, missing = {}, 0
    _check_npz_path(path)
    with atomic_output(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            _write_entry(zf, "query_points", out_q.astype(np.float32))
            _write_entry(zf, "image_size", np.asarray(size, np.int64))
            _write_entry(zf, "num_frames", np.asarray(model.num_imgs))
            _write_entry(zf, "relative", np.array(half))
            if results is None and tables is None:
                results = iter_tracks(model, queries, use_max_loc, occlusion_th, chunk_size, progress=progress)
            elif results is None:
                from fastomni.field import iter_field_tracks

                results = iter_field_tracks(model, query_frame, tables, use_max_loc, occlusion_th, chunk_size, progress)
            if refine is not None:
                results = _refined(results, queries, model.num_imgs, refine)
            for j, xy, occ, sc in results:
                if scale_to is not None:
                    xy = rescale_points(xy, (model.h, model.w), scale_to)
                stored, refused[j] = _stored_xy(xy, start, half)
                missing += int((~np.isfinite(xy).all(-1)).sum())
                _write_entry(zf, f"tracks_{j:05d}", stored)
                _write_entry(zf, f"occluded_{j:05d}", occ)
                _write_entry(zf, f"scores_{j:05d}", sc.astype(np.float16 if half else np.float32))
    frames32 = [j for j, why in refused.items() if why]
    if frames32:
        warnings.warn(f"{path}: {len(frames32)} of {model.num_imgs} target frames stored float32 instead of float16 "
                      f"(frame {frames32[0]}: {refused[frames32[0]]})", PrecisionWarning, stacklevel=2)
    _warn_no_estimate(path, missing, len(queries) * model.num_imgs)
    return path


def _refined(results, queries: np.ndarray, num_frames: int, refine) -> Iterator:
    """Every frame of ``results`` (``(j, xy, occluded, scores)``) collected, passed through
    ``refine`` (see :func:`export_dense`), and yielded again frame by frame."""
    n = len(queries)
    tracks, occluded = np.empty((n, num_frames, 2), np.float32), np.empty((n, num_frames), bool)
    scores = np.empty((n, num_frames), np.float32)
    for j, xy, occ, sc in results:
        tracks[:, j], occluded[:, j], scores[:, j] = xy, occ, sc
    tracks, occluded = refine(tracks, occluded, queries)
    for j in range(num_frames):
        yield j, tracks[:, j], occluded[:, j], scores[:, j]


def load_tracks(path: str, frames=None) -> dict[str, np.ndarray]:
    """Read a track file written by :func:`save_tracks` or :func:`export_dense`.

    Returns a dict with ``tracks [N, T, 2]`` float32 (x, y) pixels, ``occluded [N, T]`` bool and,
    when stored, ``scores [N, T]`` float32, ``query_points [N, 3]`` (t, y, x), ``image_size`` (h, w).
    ``frames``: for dense files, read only these target frames (``T = len(frames)``).
    """
    z = load_array(path, "track file", ".npz")
    with z:
        keys = set(z.files)
        out = {k: z[k] for k in ("query_points", "image_size", "num_frames") if k in keys}
        relative = bool(z["relative"]) if "relative" in keys else False
        if "tracks" in keys:
            if "occluded" not in keys:
                raise InputError(f"{path} has tracks but no occluded array")
            if frames is not None:
                raise InputError(f"{path} is a sparse track file; frames= applies to dense exports only")
            out["tracks"], out["occluded"] = z["tracks"], z["occluded"]
            if "scores" in keys:
                out["scores"] = z["scores"]
        elif "num_frames" in keys:
            total = int(out.pop("num_frames"))
            frames = range(total) if frames is None else [int(j) for j in frames]
            if any(not 0 <= j < total for j in frames):
                raise InputError(f"frames {list(frames)} outside 0..{total - 1} of {path}")
            missing = [j for j in frames if f"tracks_{j:05d}" not in keys]
            if missing:
                raise InputError(f"{path} lacks target frames {missing[:5]} (of 0..{total - 1}); incomplete export?")
            out["tracks"] = np.stack([z[f"tracks_{j:05d}"] for j in frames], axis=1)
            out["occluded"] = np.stack([z[f"occluded_{j:05d}"] for j in frames], axis=1)
            out["scores"] = np.stack([z[f"scores_{j:05d}"] for j in frames], axis=1)
        else:
            raise InputError(f"{path} is not a fastomni track file (no 'tracks' entry)")
    if relative:
        if "query_points" not in out:
            raise InputError(f"{path} stores relative tracks but no query_points")
        out["tracks"] = (out["tracks"].astype(np.float64) + out["query_points"][:, None, [2, 1]]).astype(np.float32)
    out["tracks"] = out["tracks"].astype(np.float32)
    out["occluded"] = out["occluded"].astype(bool)
    if "scores" in out:
        out["scores"] = out["scores"].astype(np.float32)
    return out
