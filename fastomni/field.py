"""The complete motion field: every pixel of every frame tracked to every frame, through per-frame
occlusion tables.

The occlusion score of a point that lands at pixel ``p``, depth ``z`` in frame ``j`` is the weight
that frame ``j``'s own ray at ``p`` puts in front of ``z - eps`` (:meth:`RayModel.correspondences_and_occlusion`):
``sum_k w_k(p) [d_k < z - eps]``. The sample depths ``d_k`` are the same on every ray, so the samples
in front form a prefix of ``m(z) = #{k : d_k < z - eps}`` samples and the score is the cumulative
weight ``C_m(p) = sum_{k<m} w_k(p)``. An :class:`OcclusionTables` holds, per frame, every pixel's
``C_0..C_K`` (``[H, W, K+1]``, ``C_0 = 0``), computed with one batched pass of the fused ops per
frame (samples -> canonical -> density -> :func:`~fastomni.ops.composite.composite`). A score is
then a lookup: the step in depth is taken exactly (``m(z)`` by ``searchsorted``, the per-point
mask's strict ``<``), and ``C_m`` is interpolated bilinearly between the four pixels around ``p``
(the only approximation: the per-point path evaluates the networks on the ray at the sub-pixel
``p`` itself).

The same pass gives each pixel's largest-weight canonical sample, which is what a query from that
frame maps into every target (``use_max_loc``, the default), so a query frame's rays are not
evaluated again; and the frame's depth map (depth of that sample) and rendered colour. Per
(pixel, target) the field costs one inverse mapping plus a lookup, and the tables ``K`` mappings
and colour queries per pixel per frame, shared by all ``T`` query frames; the per-pair path costs
``3K`` mappings and ``2K`` colour queries.

Tables are cached in a run folder (``RUN/tables_{step}/``, one ``.npy`` per frame and array,
written atomically, so a killed build resumes). :func:`export_field` writes the complete field:
one ``.npz`` per query frame in :func:`fastomni.query.export_dense`'s format (``load_tracks``
reads each), skipping query frames already written.

Example::

    >>> import torch
    >>> from fastomni.nn import OmniMotion
    >>> m = OmniMotion(num_imgs=3, h=6, w=6, num_samples_ray=4)
    >>> tables = OcclusionTables(m)
    >>> tables.cumulative(0).shape, tables.depth(1).shape, tables.rgb(2).shape
    ((6, 6, 5), (6, 6), (6, 6, 3))
    >>> tracks, occluded, scores = field_tracks(m, 1, tables)
    >>> tracks.shape, tracks[7, 1].tolist()
    ((36, 3, 2), [1.0, 1.0])
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from fastomni._atomic import atomic_output, write_atomic_text
from fastomni.inputs import InputError
from fastomni.nn.model import RayModel
from fastomni.ops.composite import composite
from fastomni.query import _QueryRays, _grid_queries, export_dense, frame_result

__all__ = ["OcclusionTables", "export_field", "field_path", "field_tracks", "iter_field_tracks"]

_ARRAYS = ("cumulative", "canonical", "depth", "rgb")


def _model_key(model: RayModel) -> dict:
    p = next(model.parameters())
    return {"family": model.family, "num_imgs": model.num_imgs, "h": model.h, "w": model.w,
            "num_samples_ray": model.num_samples_ray, "min_depth": model.min_depth, "max_depth": model.max_depth,
            "dtype": str(p.dtype).replace("torch.", "")}


def _where(model: RayModel) -> str:
    """What the progress bars show: the device and torch's thread count."""
    return f"({next(model.parameters()).device.type}, {torch.get_num_threads()} threads)"


def _claim_folder(meta_path: str, settings: dict, refusal) -> None:
    """Write ``settings`` to ``meta_path`` (JSON, atomically), or, when the file exists, check that
    it holds the same settings: a resumed build continues only what it started. ``refusal(found)``
    is the error message otherwise."""
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            found = json.load(f)
        if found != settings:
            raise InputError(refusal(found))
    else:
        write_atomic_text(meta_path, json.dumps(settings, indent=1) + "\n")


class OcclusionTables:
    """Per-frame ray profiles of ``model``: for frame ``j``, :meth:`cumulative` ``[H, W, K+1]``
    (``C_k``, the weight of the first ``k`` samples), :meth:`canonical` ``[H*W, 3]`` (each pixel's
    largest-weight sample in the canonical volume), :meth:`depth` ``[H, W]`` (that sample's depth)
    and :meth:`rgb` ``[H, W, 3]`` (the rendered colour), all in the model's dtype.

    ``cache_dir``: keep the tables there (built frames are reused, missing ones built; a folder
    built for another model shape is refused). Without it they are kept in memory.
    """

    def __init__(self, model: RayModel, cache_dir: str | None = None, chunk_size: int = 10000,
                 progress: bool = False):
        if chunk_size < 1:
            raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
        self.model, self.cache_dir, self.chunk_size = model, cache_dir, chunk_size
        self._memory: dict[tuple[str, int], np.ndarray] = {}
        self._depths = None
        if cache_dir is not None:
            self._check_cache(cache_dir)
        todo = [j for j in range(model.num_imgs) if not self._has(j)]
        for j in tqdm(todo, desc=f"occlusion tables {_where(model)}", unit="frame", disable=not progress or not todo):
            self._store(j, self._build(j))

    # -- building -------------------------------------------------------------------------------
    def _check_cache(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        key = _model_key(self.model)
        _claim_folder(os.path.join(folder, "tables.json"), key,
                      lambda found: f"{folder} holds occlusion tables of another model ({found}, this one is {key}); "
                                    "delete the folder to rebuild")

    def _path(self, name: str, j: int) -> str:
        return os.path.join(self.cache_dir, f"{name}_{j:05d}.npy")

    def _has(self, j: int) -> bool:
        if self.cache_dir is None:
            return ("cumulative", j) in self._memory
        return all(os.path.isfile(self._path(name, j)) for name in _ARRAYS)

    @torch.no_grad()
    def _build(self, j: int) -> dict[str, np.ndarray]:
        """One frame's pixel rays, batched: samples -> canonical -> density -> composite."""
        m = self.model
        was_training = m.training
        m.eval()
        try:
            p = next(m.parameters())
            ys, xs = torch.meshgrid(torch.arange(m.h), torch.arange(m.w), indexing="ij")
            grid = torch.stack([xs, ys], -1).reshape(-1, 2).to(p.device, p.dtype)
            parts = {name: [] for name in _ARRAYS}
            for rows in grid.split(self.chunk_size):
                x, d = m.sample_rays(rows[None])
                u = m.map_to_canonical(x, [j])[0]  # [P, K, 3]
                colors, density = m.color_density(u)
                out = composite(density, colors, points=torch.cat([u, d[0]], -1), select_max=True)
                cum = torch.cat([torch.zeros_like(out.weights[:, :1]), out.weights.cumsum(-1)], -1)
                for name, value in zip(_ARRAYS, (cum, out.point[:, :3], out.point[:, 3], out.rgb)):
                    parts[name].append(value.cpu().numpy())
        finally:
            m.train(was_training)
        shapes = {"cumulative": (m.h, m.w, m.num_samples_ray + 1), "canonical": (m.h * m.w, 3),
                  "depth": (m.h, m.w), "rgb": (m.h, m.w, 3)}
        return {name: np.concatenate(parts[name]).reshape(shapes[name]) for name in _ARRAYS}

    def _store(self, j: int, arrays: dict[str, np.ndarray]) -> None:
        for name, value in arrays.items():
            if self.cache_dir is None:
                self._memory[name, j] = value
            else:
                with atomic_output(self._path(name, j)) as tmp:
                    np.save(tmp, value)

    def _get(self, name: str, j: int) -> np.ndarray:
        if not 0 <= j < self.model.num_imgs:
            raise InputError(f"frame {j} outside 0..{self.model.num_imgs - 1}")
        if self.cache_dir is None:
            return self._memory[name, j]
        return np.load(self._path(name, j), mmap_mode="r")

    # -- reading --------------------------------------------------------------------------------
    def cumulative(self, j: int) -> np.ndarray:
        """``[H, W, K+1]``: ``C_k``, the total weight of the first ``k`` samples of each pixel's ray."""
        return self._get("cumulative", j)

    def canonical(self, j: int) -> np.ndarray:
        """``[H*W, 3]``: each pixel's largest-weight sample mapped to the canonical volume."""
        return self._get("canonical", j)

    def depth(self, j: int) -> np.ndarray:
        """``[H, W]``: the depth of each pixel's largest-weight sample."""
        return self._get("depth", j)

    def rgb(self, j: int) -> np.ndarray:
        """``[H, W, 3]``: the rendered colour."""
        return self._get("rgb", j)

    def occlusion_scores(self, j: int, px: Tensor, depth: Tensor) -> Tensor:
        """Occlusion scores ``[N]`` of points at pixels ``px [N, 2]`` (x, y), depths ``depth [N, 1]``
        in frame ``j``: ``C_m`` with ``m = #{k : d_k < depth - eps}``, bilinear in the pixel (clamped
        to the image); NaN where the point is not finite."""
        m = self.model
        if self._depths is None:
            _, d = m.sample_rays(px.new_zeros(1, 1, 2))
            self._depths = d[0, 0, :, 0]
        finite = torch.isfinite(px).all(-1) & torch.isfinite(depth[:, 0])
        count = torch.searchsorted(self._depths, (depth[:, 0] - m.occlusion_eps).contiguous(), side="left")
        x = torch.nan_to_num(px[:, 0]).clamp(0, m.w - 1)
        y = torch.nan_to_num(px[:, 1]).clamp(0, m.h - 1)
        x0, y0 = x.floor().long().clamp(max=m.w - 2), y.floor().long().clamp(max=m.h - 2)
        fx, fy = x - x0, y - y0
        table = self.cumulative(j).reshape(-1)  # read only the entries needed (a cached table is memory-mapped)
        k1 = m.num_samples_ray + 1

        def at(yy, xx):
            return torch.from_numpy(table[((yy * m.w + xx) * k1 + count).cpu().numpy()]).to(px.device)

        score = ((1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x0 + 1))
                 + fy * ((1 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1)))
        return torch.where(finite, score.to(px.dtype), torch.nan)


@torch.no_grad()
def iter_field_tracks(model: RayModel, query_frame: int, tables: OcclusionTables, use_max_loc: bool = True,
                      occlusion_th: float = 0.99, chunk_size: int = 10000, progress: bool = False
                      ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """As :func:`fastomni.query.iter_tracks` for every pixel of ``query_frame`` (rows ``y * w + x``),
    with occlusion scores from ``tables``: yields ``(j, xy [H*W, 2], occluded [H*W], scores [H*W])``.
    With ``use_max_loc`` the query rays come from the tables too."""
    queries = _grid_queries(model, query_frame)
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        frames = queries[:, 0].astype(np.int64)
        if use_max_loc:
            u = torch.from_numpy(np.array(tables.canonical(query_frame))).to(p.device, p.dtype)
        else:
            px = torch.from_numpy(queries[:, [2, 1]]).to(p.device, p.dtype)
            rays = _QueryRays(model, frames, px, False, chunk_size)
        group = max(1, chunk_size // len(queries))  # small frames: map into several targets per call
        mapped = {}
        for j in tqdm(range(model.num_imgs), desc=f"field of frame {query_frame} {_where(model)}", unit="frame",
                      disable=not progress):
            if use_max_loc:
                if j not in mapped:
                    ids = list(range(j, min(j + group, model.num_imgs)))
                    if len(ids) > 1:
                        x2 = model.map_from_canonical(u.expand(len(ids), -1, -1), ids)  # [G, H*W, 3]
                    else:
                        parts = [model.map_from_canonical(part[None], [j])[0] for part in u.split(chunk_size)]
                        x2 = torch.cat(parts)[None]
                    mapped = dict(zip(ids, x2))
                px2, depth = model.project(mapped.pop(j))
            else:
                px2, depth = rays.to_frame(model, j, chunk_size)
            scores = tables.occlusion_scores(j, px2, depth)
            yield frame_result(model, queries, j, px2, scores, occlusion_th)
    finally:
        model.train(was_training)


def field_tracks(model: RayModel, query_frame: int, tables: OcclusionTables, use_max_loc: bool = True,
                 occlusion_th: float = 0.99, chunk_size: int = 10000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pixel of ``query_frame`` to every frame through the tables: ``(tracks [H*W, T, 2],
    occluded [H*W, T], scores [H*W, T])``, as :func:`fastomni.query.dense_tracks` returns."""
    n, t = model.h * model.w, model.num_imgs
    tracks, occluded, scores = np.zeros((n, t, 2), np.float32), np.zeros((n, t), bool), np.zeros((n, t), np.float32)
    for j, xy, occ, sc in iter_field_tracks(model, query_frame, tables, use_max_loc, occlusion_th, chunk_size):
        tracks[:, j], occluded[:, j], scores[:, j] = xy, occ, sc
    return tracks, occluded, scores


def field_path(folder: str, query_frame: int) -> str:
    """The file of ``query_frame`` in a field export folder."""
    return os.path.join(folder, f"dense_{query_frame:05d}.npz")


def export_field(model: RayModel, out_dir: str, tables: OcclusionTables | None = None, use_max_loc: bool = True,
                 occlusion_th: float = 0.99, half: bool = False, chunk_size: int = 10000,
                 scale_to: tuple[int, int] | None = None, exact_occlusion: bool = False,
                 progress: bool = True, refine=None, refine_settings: dict | None = None) -> list[str]:
    """The complete field: every frame's pixels to every frame, one ``dense_{i:05d}.npz`` per query
    frame ``i`` in ``out_dir`` (:func:`fastomni.query.export_dense`'s format and ``half`` checks),
    plus ``field.json`` (frames, sizes, settings) and ``maps.npz`` (per-frame ``depth [T, H, W]``
    and ``rgb [T, H, W, 3]`` from the tables). Query frames whose file exists are skipped (each is
    written atomically, so a killed export resumes). ``exact_occlusion`` uses the per-point
    occlusion ray instead of the tables. ``refine``: as in :func:`fastomni.query.export_dense`, with
    ``refine_settings`` (its settings, :func:`fastomni.refine.refiner_settings`) recorded in
    ``field.json``, so that a resumed export cannot mix files of two settings. Returns the files,
    in query-frame order."""
    if not os.path.isdir(out_dir):
        os.makedirs(out_dir)
    if tables is None:
        tables = OcclusionTables(model, chunk_size=chunk_size, progress=progress)
    size = tuple(int(v) for v in (scale_to or (model.h, model.w)))
    info = {"num_frames": model.num_imgs, "model_size": [model.h, model.w], "image_size": list(size),
            "family": model.family, "use_max_loc": use_max_loc, "occlusion_th": occlusion_th, "half": half,
            "occlusion": "exact" if exact_occlusion else "tables", "refiner": refine_settings if refine else None}
    _claim_folder(os.path.join(out_dir, "field.json"), info,
                  lambda found: f"{out_dir} holds an export with other settings ({found}); use another folder or "
                                "delete it")
    maps = os.path.join(out_dir, "maps.npz")
    if not os.path.isfile(maps):
        frames = range(model.num_imgs)
        with atomic_output(maps) as tmp:
            np.savez_compressed(tmp, depth=np.stack([tables.depth(j) for j in frames]).astype(np.float32),
                                rgb=np.stack([tables.rgb(j) for j in frames]).astype(np.float32))
    paths = [field_path(out_dir, i) for i in range(model.num_imgs)]
    todo = [i for i, path in enumerate(paths) if not os.path.isfile(path)]
    with tqdm(total=len(paths), initial=len(paths) - len(todo), desc=f"field {_where(model)}", unit="query frame",
              disable=not progress) as bar:
        for i in todo:
            export_dense(model, i, paths[i], use_max_loc=use_max_loc, occlusion_th=occlusion_th, half=half,
                         chunk_size=chunk_size, scale_to=scale_to, progress=False,
                         tables=None if exact_occlusion else tables, refine=refine)
            bar.update(1)
    return paths
