"""Training batches from a preprocessed sequence, drawn as the original's ``loaders/raft.py`` does.

Each of the ``num_pairs`` pairs of a batch is drawn independently:

1. Frame ``i``: uniform (the original's shuffled index modulo the frame count) or, once a
   hard-mining cache exists (``use_error_map``), with probability ∝ the mean flow error of frame
   ``i``'s cached prediction.
2. Frame ``j`` among the frames ``1 <= |j - i| <= m`` with input flow, ``m = min(start_interval +
   step // 2000, T - 1)``, with probability ∝ the kept-flow count of ``(i, j)``
   (``flow_stats.json``) normalized over ``i``'s pairs, except the two neighbours, which get 0.5
   each before the final normalization.
3. Pixels of frame ``i`` from the valid mask (every pixel for adjacent frames, else
   cycle-consistent or occluded-recoverable; every pixel, with pair weight 0, if the mask is
   empty): with hard mining, ``num_pts`` drawn ∝ the blurred error map of frame ``i`` plus
   ``num_pts`` uniform, and ``num_pts`` of those kept; else ∝ ``1/sqrt(count + 1)``
   (``use_count_map``) or uniform. With replacement only if the mask has fewer than ``num_pts``
   pixels.
4. Pair weight ``cos((|i - j| - 1) / m · π/2)``. Half the pairs are swapped (``j → i``), their
   non-cycle-consistent points then weighted 0.

The hard-mining cache (the model's predicted flow ``i → i+1``, the last frame to ``T-2``, vs the
input flow: per-frame mean error and the per-pixel error map blurred 5×5) lives in the run's own
folder as ``error_cache_{step:06d}.npz``; the original reads it from a hard-coded ``out/`` path,
silently disabling hard mining for any other output folder.

Everything random comes from one ``numpy.random.Generator`` seeded with ``seed``: the same seed
gives the same batches, and :meth:`PairSampler.state_dict` carries its state for exact resumption.

Example::

    >>> sampler = PairSampler("data/seq", num_pairs=2, num_pts=16, seed=0)   # doctest: +SKIP
    >>> batch = sampler.sample(step=1)                                        # doctest: +SKIP
    >>> batch["pts1"].shape, batch["weights"].shape                           # doctest: +SKIP
    (torch.Size([2, 16, 2]), torch.Size([2, 16, 1]))
"""
from __future__ import annotations

import os

import cv2
import numpy as np
import torch

from fastomni._atomic import atomic_output
from fastomni.config import PAIR_SAMPLING
from fastomni.inputs import InputError, read_json
from fastomni.io import frame_files
from fastomni.preprocess import bilinear_sample, read_shots

__all__ = ["INTERVAL_GROWTH_STEPS", "PAIR_SAMPLING", "PairSampler", "error_cache_path"]

INTERVAL_GROWTH_STEPS = 2000  # the largest pair interval grows by one every this many steps


def error_cache_path(folder: str, step: int) -> str:
    return os.path.join(folder, f"error_cache_{step:06d}.npz")


def _read_image(path: str, flags=cv2.IMREAD_COLOR) -> np.ndarray:
    img = cv2.imread(path, flags)
    if img is None:
        raise InputError(f"cannot read image {path} (missing, corrupt or unsupported)")
    return img


class PairSampler:
    """Draws training batches from the sequence folder ``seq_dir`` (the original's layout:
    ``color/``, ``raft_exhaustive/{a}_{b}.npy``, ``raft_masks/{a}_{b}.png``, ``count_maps/``,
    ``flow_stats.json``, frames named as in ``color/``).

    ``num_imgs`` limits the frames used to the first ones; ``start_interval``, ``use_count_map``
    and ``use_error_map`` are the original's options. ``pair_sampling``: ``"original"`` (the
    target frame drawn by kept-flow count with adjacent frames boosted, the pair weighted by
    ``cos((|i - j| - 1) / max_interval * pi / 2)``) or ``"uniform"`` (the target drawn uniformly
    among the frame's pairs, every pair weighted 1: long pairs, which pin down drift, count as
    much as adjacent ones). Raises ``FileNotFoundError``/``ValueError``
    naming the missing or malformed part of the folder.
    """

    def __init__(self, seq_dir: str, num_pairs: int = 8, num_pts: int = 256, num_imgs: int | None = None,
                 start_interval: int = 20, use_count_map: bool = True, use_error_map: bool = True, seed: int = 12,
                 pair_sampling: str = "original"):
        if num_pairs < 1 or num_pts < 1:
            raise InputError(f"num_pairs and num_pts must be >= 1, got {num_pairs} and {num_pts}")
        if start_interval < 1:
            raise InputError(f"start_interval must be >= 1, got {start_interval}")
        if pair_sampling not in PAIR_SAMPLING:
            raise InputError(f"pair_sampling must be one of {PAIR_SAMPLING}, got {pair_sampling!r}")
        self.pair_sampling = pair_sampling
        self.seq_dir = os.fspath(seq_dir)
        self.num_pairs, self.num_pts = num_pairs, num_pts
        self.start_interval = start_interval
        self.use_count_map, self.use_error_map = use_count_map, use_error_map
        color = os.path.join(self.seq_dir, "color")
        if not os.path.isdir(color):
            raise FileNotFoundError(f"{self.seq_dir} is not a preprocessed sequence: no color/ folder "
                                    "(run `fastomni preprocess` first)")
        names = [os.path.basename(f) for f in frame_files(color)]
        if num_imgs is not None:
            names = names[:num_imgs]
        if len(names) < 2:
            raise InputError(f"{color} has {len(names)} frame(s); a sequence needs at least 2")
        self.names = names
        self.num_imgs = len(names)
        self.images = np.stack([cv2.cvtColor(_read_image(os.path.join(color, n)), cv2.COLOR_BGR2RGB) for n in names])
        shapes = {img.shape for img in self.images}
        if len(shapes) != 1:
            raise InputError(f"frames in {color} differ in size: {sorted(shapes)}")
        self.h, self.w = self.images.shape[1:3]
        self.pair_probs = self._pair_probabilities()
        # frames with a pair to draw from; None when every frame has one (the original's draw)
        drawable = [i for i, targets in enumerate(self.pair_probs) if targets]
        if not drawable:
            raise InputError(f"{self.seq_dir}: no frame has a flow to another frame (every frame is a shot of its own)")
        self.drawable = None if len(drawable) == self.num_imgs else np.array(drawable)
        self.count_maps = self._count_maps() if use_count_map else None
        ys, xs = np.mgrid[0:self.h, 0:self.w]
        self.grid = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32)  # (x, y), row-major
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.error_maps: np.ndarray | None = None  # [T, H, W] blurred per-pixel flow error
        self.frame_errors: np.ndarray | None = None  # [T] mean flow error per frame
        self.cache_step: int | None = None

    # -- static data ---------------------------------------------------------------------------
    def _pair_probabilities(self) -> list[dict[int, float]]:
        """Per frame i: {j: kept count of (i, j) / total kept count of i's pairs}."""
        path = os.path.join(self.seq_dir, "flow_stats.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found (run `fastomni preprocess` first)")
        stats = read_json(path, "flow stats")
        index = {n: k for k, n in enumerate(self.names)}
        shots = read_shots(self.seq_dir, self.num_imgs)
        alone = np.bincount(shots)[shots] == 1  # a one-frame shot has no pair
        probs = []
        for i, name in enumerate(self.names):
            if name not in stats:
                raise InputError(f"{path} has no entry for frame {name!r}")
            counts = {index[b]: float(c) for b, c in stats[name].items() if b in index and b != name}
            if not counts and not alone[i]:
                raise InputError(f"{path}: frame {name!r} has no flow to any other frame")
            if any(c < 0 or not np.isfinite(c) for c in counts.values()):
                raise InputError(f"{path}: frame {name!r} has a negative or non-finite count")
            total = sum(counts.values()) if counts else 0.0
            probs.append({j: (c / total if total > 0 else 0.0) for j, c in counts.items()})
        return probs

    def _count_maps(self) -> np.ndarray:
        maps = []
        for name in self.names:
            path = os.path.join(self.seq_dir, "count_maps", os.path.splitext(name)[0] + ".png")
            cm = _read_image(path, cv2.IMREAD_UNCHANGED)
            if cm.shape[:2] != (self.h, self.w) or cm.ndim != 2:
                raise InputError(f"count map {path} must be a {self.w}x{self.h} single-channel image, "
                                 f"got shape {cm.shape}")
            maps.append(cm.astype(np.float32))
        return np.stack(maps)

    def _flow(self, i: int, j: int) -> np.ndarray:
        path = os.path.join(self.seq_dir, "raft_exhaustive", f"{self.names[i]}_{self.names[j]}.npy")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input flow {path} not found (is the sequence fully preprocessed?)")
        try:
            flow = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise InputError(f"input flow {path} is not a readable .npy array: {exc}") from None
        if flow.shape != (self.h, self.w, 2) or flow.dtype.kind != "f":
            raise InputError(f"flow {path} must have shape ({self.h}, {self.w}, 2) (float), got "
                             f"{flow.dtype} {flow.shape}")
        if not np.isfinite(flow).all():
            raise InputError(f"flow {path} contains NaN or infinity")
        return flow.astype(np.float32, copy=False)

    def check_flows(self) -> None:
        """Read every input flow the sampler can draw (the pairs of ``flow_stats.json``) once, so that a
        missing, malformed or non-finite flow is reported before training starts, not at the step
        that first draws it."""
        for i, targets in enumerate(self.pair_probs):
            for j in targets:
                self._flow(i, j)

    def _masks(self, i: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(cycle-consistent, occluded-recoverable) ``[H, W]`` bool masks of pair (i, j)."""
        path = os.path.join(self.seq_dir, "raft_masks", f"{self.names[i]}_{self.names[j]}.png")
        img = _read_image(path)  # BGR: R is channel 2
        if img.shape[:2] != (self.h, self.w):
            raise InputError(f"mask {path} must be {self.w}x{self.h}, got {img.shape[1]}x{img.shape[0]}")
        return img[..., 2] > 0, img[..., 1] > 0

    # -- sampling -------------------------------------------------------------------------------
    def max_interval(self, step: int) -> int:
        """The largest frame interval of a pair at ``step``."""
        return min(self.start_interval + step // INTERVAL_GROWTH_STEPS, self.num_imgs - 1)

    def _draw_target(self, i: int, max_interval: int) -> int:
        cands = np.array(sorted(j for j in self.pair_probs[i] if abs(j - i) <= max_interval))
        if cands.size == 0:
            raise InputError(f"frame {self.names[i]} has no flow to a frame within {max_interval} frames")
        if self.pair_sampling == "uniform":
            return int(self.rng.choice(cands))
        p = np.array([self.pair_probs[i][j] for j in cands])
        p = p / p.sum() if p.sum() > 0 else np.full(len(cands), 1.0 / len(cands))
        p[np.abs(cands - i) <= 1] = 0.5
        return int(self.rng.choice(cands, p=p / p.sum()))

    def _choose(self, n: int, size: int, p: np.ndarray | None = None) -> np.ndarray:
        replace = n < size or (p is not None and np.count_nonzero(p) < size)
        return self.rng.choice(n, size, replace=replace, p=p)

    def _draw_pixels(self, i: int, mask: np.ndarray) -> np.ndarray:
        """Indices into ``mask``'s true pixels (row-major)."""
        n, k = int(mask.sum()), self.num_pts
        if self.use_error_map and self.error_maps is not None:
            err = self.error_maps[i][mask].astype(np.float64)
            by_error = self._choose(n, k, err / err.sum()) if err.sum() > 0 else self._choose(n, k)
            uniform = self._choose(n, k)
            return self.rng.choice(np.concatenate([by_error, uniform]), k, replace=False)
        if self.count_maps is not None:
            w = 1.0 / np.sqrt(self.count_maps[i][mask].astype(np.float64) + 1.0)
            return self._choose(n, k, w / w.sum())
        return self._choose(n, k)

    def sample_pair(self, step: int) -> dict[str, object]:
        """One pair: ids, ``pts1``/``pts2`` ``[P, 2]`` (x, y) pixels, ``gt_rgb1`` ``[P, 3]`` in [0, 1],
        ``weights`` ``[P, 1]``."""
        if self.use_error_map and self.frame_errors is not None and self.frame_errors.sum() > 0:
            i = int(self.rng.choice(self.num_imgs, p=self.frame_errors / self.frame_errors.sum()))
        elif self.drawable is None:
            i = int(self.rng.integers(self.num_imgs))
        else:
            i = int(self.drawable[self.rng.integers(len(self.drawable))])
        max_interval = self.max_interval(step)
        j = self._draw_target(i, max_interval)
        flow = self._flow(i, j)
        cycle, occluded = self._masks(i, j)
        mask = np.ones_like(cycle) if abs(j - i) == 1 else (cycle | occluded)
        invalid = not mask.any()
        if invalid:
            mask = np.ones_like(cycle)
        sel = self._draw_pixels(i, mask)
        flat = mask.reshape(-1)
        pts1 = self.grid[flat][sel]
        pts2 = pts1 + flow.reshape(-1, 2)[flat][sel]
        covisible = cycle.reshape(-1)[flat][sel]
        if invalid:
            weight = 0.0
        elif self.pair_sampling == "uniform":
            weight = 1.0
        else:
            weight = float(np.cos((abs(i - j) - 1.0) / max_interval * np.pi / 2))
        weights = np.full((self.num_pts, 1), weight, np.float32)
        rgb1 = self.images[i].reshape(-1, 3)[flat][sel].astype(np.float32) / 255.0
        rgb2 = bilinear_sample(self.images[j], pts2) / np.float32(255.0)  # zero outside, as the original
        if self.rng.integers(2):
            i, j, pts1, pts2, rgb1 = j, i, pts2, pts1, rgb2
            weights[~covisible] = 0.0
        return {"ids1": i, "ids2": j, "pts1": pts1, "pts2": pts2, "gt_rgb1": rgb1, "weights": weights}

    def sample(self, step: int) -> dict[str, torch.Tensor]:
        """A batch for training step ``step``: ``ids1``, ``ids2`` LongTensor ``[n]``; ``pts1``,
        ``pts2`` ``[n, P, 2]``; ``gt_rgb1`` ``[n, P, 3]``; ``weights`` ``[n, P, 1]`` (float32)."""
        pairs = [self.sample_pair(step) for _ in range(self.num_pairs)]
        batch = {k: torch.as_tensor(np.array([p[k] for p in pairs])) for k in ("ids1", "ids2")}
        for k in ("pts1", "pts2", "gt_rgb1", "weights"):
            batch[k] = torch.from_numpy(np.stack([p[k] for p in pairs]).astype(np.float32))
        return batch

    # -- hard-mining cache ----------------------------------------------------------------------
    def cache_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """The pairs whose predicted flow feeds the hard-mining cache: ``(i, i+1)``, the last frame
        of the video (or of a shot) to the one before it. Returns ``(ids1 [T], ids2 [T])``."""
        ids1 = np.arange(self.num_imgs)
        ids2 = ids1 + 1
        ids2[-1] = self.num_imgs - 2
        for i in range(self.num_imgs - 1):
            if ids2[i] not in self.pair_probs[i] and i - 1 in self.pair_probs[i]:
                ids2[i] = i - 1
        return ids1, ids2

    def set_error_cache(self, pred_flows: np.ndarray, step: int, folder: str | None = None) -> None:
        """Refresh the hard-mining cache from the model's flows ``pred_flows [T, H, W, 2]`` (pixels)
        on :meth:`cache_pairs`; with ``folder``, also write it there (atomically) for resumption."""
        pred_flows = np.asarray(pred_flows, dtype=np.float32)
        if pred_flows.shape != (self.num_imgs, self.h, self.w, 2):
            raise InputError(f"pred_flows must have shape {(self.num_imgs, self.h, self.w, 2)}, got {pred_flows.shape}")
        ids1, ids2 = self.cache_pairs()
        maps, errors = [], []
        for i, j in zip(ids1, ids2):
            if int(j) not in self.pair_probs[i]:  # a one-frame shot: nothing to learn from, never drawn
                errors.append(0.0)
                maps.append(np.zeros((self.h, self.w), np.float32))
                continue
            err = np.linalg.norm(pred_flows[i] - self._flow(int(i), int(j)), axis=-1)
            errors.append(err.mean())
            maps.append(cv2.GaussianBlur(err, (5, 5), 0))
        self.error_maps, self.frame_errors = np.stack(maps), np.array(errors, np.float64)
        self.cache_step = step
        if folder is not None:
            os.makedirs(folder, exist_ok=True)
            with atomic_output(error_cache_path(folder, step)) as tmp:
                np.savez(tmp, error_maps=self.error_maps, frame_errors=self.frame_errors, step=step)

    def load_error_cache(self, path: str) -> None:
        """Load a cache written by :meth:`set_error_cache`."""
        with np.load(path) as z:
            maps, errors, step = z["error_maps"], z["frame_errors"], int(z["step"])
        if maps.shape != (self.num_imgs, self.h, self.w):
            raise InputError(f"error cache {path} has shape {maps.shape}, this sequence needs "
                             f"{(self.num_imgs, self.h, self.w)}")
        self.error_maps, self.frame_errors, self.cache_step = maps, errors, step

    def state_dict(self) -> dict:
        """The generator state and the step of the hard-mining cache in use (the cache itself is
        on disk)."""
        return {"rng": self.rng.bit_generator.state, "cache_step": self.cache_step}

    def load_state_dict(self, state: dict, folder: str | None = None) -> None:
        """Restore :meth:`state_dict`; the cache it names is read from ``folder``."""
        self.rng.bit_generator.state = state["rng"]
        self.error_maps = self.frame_errors = self.cache_step = None
        if state["cache_step"] is not None:
            path = error_cache_path(folder or "", state["cache_step"])
            if not os.path.isfile(path):
                raise FileNotFoundError(f"hard-mining cache {path} named by the checkpoint is missing")
            self.load_error_cache(path)
