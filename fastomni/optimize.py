"""The per-video optimization loop and the pipeline around it (video -> sequence -> model -> tracks).

A run folder holds everything of one optimization::

    RUN/config.txt                 the options, ``key = value`` (the original's args.txt format)
    RUN/model_{step:06d}.pth       checkpoints (the original's keys, plus step, sizes and RNG states)
    RUN/error_cache_{step:06d}.npz hard-mining caches (see fastomni.sampler)
    RUN/log.txt                    a loss line every ``i_print`` steps
    RUN/vis/                       trajectory snapshots every ``i_img`` steps
    RUN/seq/, RUN/video.json       (pipeline runs) the preprocessed sequence and the input's size

Checkpoints are written atomically every ``i_weight`` steps, at the last step, and when the run is
stopped by Ctrl-C or SIGTERM: the signal is deferred to the end of the current step, the state is
saved, and :class:`Interrupted` is raised (a second signal aborts at once). Running again resumes
from the latest checkpoint with nothing lost: model, Adam moments, learning-rate schedule, step,
the ray-jitter generator, the sampler's generator and its hard-mining cache, so a resumed run
computes the same numbers as one never stopped.

Example::

    >>> from fastomni.config import preset
    >>> result = optimize("data/seq", "runs/seq", preset("cpu"))   # doctest: +SKIP
    >>> result.step                                                 # doctest: +SKIP
    400
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from fastomni.checkpoint import checkpoint_step, latest_checkpoint, load_checkpoint, save_checkpoint
from fastomni.config import MODEL_KEYS, Config, config_to_text, load_config
from fastomni.nn.model import OmniMotion
from fastomni.query import pair_flows, track_points
from fastomni.sampler import PairSampler
from fastomni.train import make_optimizer, training_step

__all__ = [
    "Interrupted",
    "OptimizeResult",
    "build_model",
    "load_run",
    "optimize",
    "prepare_sequence",
    "resolve_device",
    "track_video",
    "write_atomic_text",
]


class Interrupted(KeyboardInterrupt):
    """The optimization was stopped by a signal after saving ``checkpoint`` at ``step``."""

    def __init__(self, step: int, checkpoint: str, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; saved {checkpoint}; "
                         "run the same command again to resume")
        self.step, self.checkpoint, self.signum = step, checkpoint, signum


@dataclass
class OptimizeResult:
    """The trained ``model`` (eval mode), the ``step`` reached, the last ``checkpoint`` path, the
    ``run_dir`` and the wall-clock ``seconds`` spent in this call."""

    model: OmniMotion
    step: int
    checkpoint: str
    run_dir: str
    seconds: float


def resolve_device(name: str) -> torch.device:
    """``'auto'`` -> cuda when available, else cpu; otherwise ``torch.device(name)`` (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device {name!r} is not a torch device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def build_model(cfg: Config, num_imgs: int, h: int, w: int, device: torch.device | str = "cpu") -> OmniMotion:
    """A fresh ``OmniMotion`` for ``cfg``, its weights drawn from ``cfg.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = OmniMotion(num_imgs, h, w, num_samples_ray=cfg.num_samples_ray, min_depth=cfg.min_depth,
                           max_depth=cfg.max_depth, pe_freq=cfg.pe_freq, use_affine=cfg.use_affine)
    return model.to(device)


def write_atomic_text(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


class _DeferredSignals:
    """Turn SIGINT/SIGTERM into a flag checked between steps; a second signal aborts at once.
    Only installable from the main thread (elsewhere signals stay as they are)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            self.restore()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting without saving")
        self.signum = signum
        tqdm.write(f"{signal.Signals(signum).name}: saving after this step (send again to abort now)", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def __exit__(self, *exc):
        self.restore()


def _check_resume_config(run_dir: str, cfg: Config) -> None:
    path = os.path.join(run_dir, "config.txt")
    if not os.path.isfile(path):
        return
    saved = load_config(path)
    changed = [f"{k}: {getattr(saved, k)} -> {getattr(cfg, k)}" for k in MODEL_KEYS if getattr(saved, k) != getattr(cfg, k)]
    if changed and latest_checkpoint(run_dir):
        raise ValueError(f"{run_dir} holds checkpoints of a model with other options ({'; '.join(changed)}); "
                         "use another output folder or the same options")


def _restore(ckpt_path: str, model, optimizer, scheduler, sampler: PairSampler, generator: torch.Generator,
             cfg: Config, run_dir: str) -> int:
    ckpt = load_checkpoint(ckpt_path, model, optimizer if cfg.load_opt else None,
                           scheduler if cfg.load_scheduler else None, map_location=next(model.parameters()).device)
    if "num_imgs" in ckpt and int(ckpt["num_imgs"]) != model.num_imgs:
        raise ValueError(f"{ckpt_path} was trained on {ckpt['num_imgs']} frames, the sequence has {model.num_imgs}")
    step = int(ckpt["step"]) if "step" in ckpt else checkpoint_step(ckpt_path)
    rng = ckpt.get("rng")
    if rng is not None and os.path.dirname(os.path.abspath(ckpt_path)) == os.path.abspath(run_dir):
        generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        sampler.load_state_dict(rng["sampler"], run_dir)
    return step


def _snapshot(model: OmniMotion, sampler: PairSampler, cfg: Config, run_dir: str, step: int) -> None:
    """A trajectory plot of an 8 x 8 grid of points of the query frame (``i_img``)."""
    from fastomni.viz import plot_trajectories

    q = min(cfg.query_frame_id, model.num_imgs - 1)
    ys, xs = np.meshgrid(np.linspace(0, model.h - 1, 8), np.linspace(0, model.w - 1, 8), indexing="ij")
    queries = np.stack([np.full(xs.size, q), ys.ravel(), xs.ravel()], 1)
    tracks, occluded, _ = track_points(model, queries, cfg.use_max_loc, cfg.occlusion_th, cfg.chunk_size)
    os.makedirs(os.path.join(run_dir, "vis"), exist_ok=True)
    plot_trajectories(sampler.images, tracks, occluded if cfg.vis_occlusion else np.zeros_like(occluded),
                      os.path.join(run_dir, "vis", f"tracks_{step:06d}.png"))


def optimize(seq_dir: str, run_dir: str, cfg: Config, progress: bool = True) -> OptimizeResult:
    """Optimize OmniMotion on the preprocessed sequence ``seq_dir`` for ``cfg.num_iters`` steps,
    continuing from ``run_dir``'s latest checkpoint (or ``cfg.ckpt_path``) unless ``cfg.no_reload``.

    Returns an :class:`OptimizeResult`; raises :class:`Interrupted` (a ``KeyboardInterrupt``) after
    saving when stopped by SIGINT/SIGTERM.
    """
    start_time = time.perf_counter()
    device = resolve_device(cfg.device)
    sampler = PairSampler(seq_dir, cfg.num_pairs, cfg.num_pts, cfg.num_imgs, cfg.start_interval,
                          cfg.use_count_map, cfg.use_error_map, seed=cfg.loader_seed)
    os.makedirs(run_dir, exist_ok=True)
    existing = latest_checkpoint(run_dir)
    if cfg.no_reload and existing:
        raise ValueError(f"{run_dir} already holds checkpoints (latest {os.path.basename(existing)}) and no_reload "
                         "is set: delete them or use another output folder")
    if cfg.ckpt_path and not os.path.isfile(cfg.ckpt_path):
        raise FileNotFoundError(f"ckpt_path {cfg.ckpt_path} does not exist")
    _check_resume_config(run_dir, cfg)
    write_atomic_text(os.path.join(run_dir, "config.txt"), config_to_text(dataclasses.replace(cfg, data_dir=seq_dir)))

    model = build_model(cfg, sampler.num_imgs, sampler.h, sampler.w, device)
    optimizer, scheduler = make_optimizer(model, cfg.lr_feature, cfg.lr_deform, cfg.lr_color, cfg.lrate_decay_steps,
                                          cfg.lrate_decay_factor)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    step, ckpt = 0, ""
    source = "" if cfg.no_reload else (existing or cfg.ckpt_path)
    if source:
        step = _restore(source, model, optimizer, scheduler, sampler, generator, cfg, run_dir)
        ckpt = source
        if progress:
            tqdm.write(f"resuming from {source} at step {step}")

    def save(s: int) -> str:
        rng = {"generator": generator.get_state(), "torch": torch.get_rng_state(), "sampler": sampler.state_dict()}
        return save_checkpoint(run_dir, s, model, optimizer, scheduler, rng=rng, num_imgs=model.num_imgs,
                               image_size=(model.h, model.w))

    log_path = os.path.join(run_dir, "log.txt")
    bar = tqdm(total=cfg.num_iters, initial=min(step, cfg.num_iters), desc="optimize", unit="step",
               disable=not progress, dynamic_ncols=True)
    try:
        with _DeferredSignals() as signals:
            while step < cfg.num_iters:
                # The cache of step s is made when step s + 1 needs it: never after the last step.
                if cfg.use_error_map and cfg.i_cache and step and step % cfg.i_cache == 0 and sampler.cache_step != step:
                    flows = pair_flows(model, *sampler.cache_pairs(), use_max_loc=cfg.use_max_loc,
                                       chunk_size=cfg.chunk_size)
                    sampler.set_error_cache(flows, step, run_dir)
                step += 1
                batch = sampler.sample(step)
                result = training_step(model, optimizer, scheduler, batch, step, generator=generator,
                                       grad_clip=cfg.grad_clip, max_padding=cfg.max_padding, mask_near=cfg.mask_near)
                if cfg.i_img and step % cfg.i_img == 0:
                    _snapshot(model, sampler, cfg, run_dir, step)
                if (cfg.i_print and step % cfg.i_print == 0) or step == cfg.num_iters:
                    terms = " ".join(f"{k}: {v:.5f}" for k, v in result.terms.items())
                    with open(log_path, "a", encoding="utf-8") as f:
                        f.write(f"step: {step} | loss: {result.loss:.5f} | {terms} | "
                                f"lr: {optimizer.param_groups[0]['lr']:.3g}\n")
                    bar.set_postfix(loss=f"{result.loss:.4f}", flow=f"{result.terms.get('flow', float('nan')):.3f}")
                bar.update(1)
                if (cfg.i_weight and step % cfg.i_weight == 0) or step == cfg.num_iters or signals.signum:
                    ckpt = save(step)
                if signals.signum is not None:
                    raise Interrupted(step, ckpt, signals.signum)
    finally:
        bar.close()
    model.eval()
    return OptimizeResult(model, step, ckpt, run_dir, time.perf_counter() - start_time)


def load_run(run_dir: str, device: str = "auto", checkpoint: str | None = None) -> tuple[OmniMotion, Config, int]:
    """The trained model of ``run_dir`` (its latest checkpoint, or ``checkpoint``), its config and
    step. The model is in eval mode."""
    cfg_path = os.path.join(run_dir, "config.txt")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{run_dir} is not a fastomni run folder (no config.txt); train first")
    cfg = load_config(cfg_path)
    path = checkpoint or latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint (model_XXXXXX.pth); train first")
    meta = torch.load(path, map_location="cpu", weights_only=False)
    if "image_size" not in meta or "num_imgs" not in meta:
        raise ValueError(f"{path} lacks num_imgs/image_size (not written by fastomni); cannot size the model")
    h, w = meta["image_size"]
    dev = resolve_device(device)
    model = build_model(cfg, int(meta["num_imgs"]), int(h), int(w), dev)
    load_checkpoint(path, model, map_location=dev)
    return model.eval(), cfg, int(meta["step"]) if "step" in meta else checkpoint_step(path)


def prepare_sequence(video, run_dir: str, cfg: Config, progress: bool = True, max_interval: int | None = None,
                     flow_preset: str = "full") -> tuple[str, dict]:
    """Read ``video`` (a file, a frame folder or ``[T, H, W, 3]`` uint8), downscale it to
    ``cfg.max_side``, keep ``cfg.num_imgs`` frames and preprocess it into ``run_dir/seq``.

    Returns ``(seq_dir, info)`` with ``info = {"video_size": (h, w), "model_size": (h, w),
    "num_frames": T, "sha256": of the frames}``, also written to ``run_dir/video.json``. A second
    call with the same video reuses the stored frames and valid flows.
    """
    from fastomni.io import check_frames, load_video
    from fastomni.preprocess import preprocess

    if isinstance(video, np.ndarray):
        full = check_frames(video, "video", min_frames=2)[: cfg.num_imgs]
    else:
        full = load_video(video, max_frames=cfg.num_imgs)
    h, w = full.shape[1:3]
    frames = full
    if cfg.max_side and max(h, w) > cfg.max_side:
        scale = cfg.max_side / max(h, w)
        size = (max(2, round(h * scale)), max(2, round(w * scale)))
        import cv2

        frames = np.stack([cv2.resize(f, (size[1], size[0]), interpolation=cv2.INTER_AREA) for f in full])
    info = {"video_size": [int(h), int(w)], "model_size": [int(frames.shape[1]), int(frames.shape[2])],
            "num_frames": int(frames.shape[0]), "sha256": hashlib.sha256(frames.tobytes()).hexdigest()}
    os.makedirs(run_dir, exist_ok=True)
    seq_dir = os.path.join(run_dir, "seq")
    info_path = os.path.join(run_dir, "video.json")
    same = False
    if os.path.isfile(info_path) and os.path.isdir(os.path.join(seq_dir, "color")):
        with open(info_path) as f:
            same = json.load(f).get("sha256") == info["sha256"]
    # The stored JPEGs of this very video are reused as they are (a pixel-wise comparison with
    # fresh frames would have to allow for JPEG noise); another video is left to preprocess to refuse.
    preprocess(seq_dir if same else frames, seq_dir, max_interval=max_interval, progress=progress,
               flow_preset=flow_preset)
    write_atomic_text(info_path, json.dumps(info, indent=1) + "\n")
    return seq_dir, info


def track_video(video, query_points, run_dir: str, cfg: Config, half: bool = False, progress: bool = True,
                max_interval: int | None = None, flow_preset: str = "full") -> dict:
    """The whole pipeline for query points of a video: :func:`prepare_sequence`, :func:`optimize`
    (resuming when ``run_dir`` holds checkpoints), :func:`fastomni.query.track_points`, and
    ``run_dir/tracks.npz`` in the video's pixels.

    query_points: ``[N, 3]`` rows (t, y, x) in the video's pixels, checked before any work.
    Returns ``{"path", "tracks" [N, T, 2], "occluded" [N, T], "scores" [N, T], "timings"}`` (seconds
    per stage).
    """
    from fastomni.io import check_frames, load_video
    from fastomni.query import check_query_points, rescale_points, save_tracks

    timings = {}
    start = time.perf_counter()
    frames = (check_frames(video, "video", min_frames=2) if isinstance(video, np.ndarray)
              else load_video(video, max_frames=cfg.num_imgs))[: cfg.num_imgs]
    q = check_query_points(query_points, len(frames), *frames.shape[1:3])
    seq_dir, info = prepare_sequence(frames, run_dir, cfg, progress, max_interval, flow_preset)
    timings["preprocess"] = time.perf_counter() - start
    result = optimize(seq_dir, run_dir, cfg, progress)
    timings["optimize"] = result.seconds
    start = time.perf_counter()
    video_size, model_size = tuple(info["video_size"]), tuple(info["model_size"])
    q_model = q.copy()
    q_model[:, [2, 1]] = rescale_points(q[:, [2, 1]], video_size, model_size)
    q_model[:, 2] = q_model[:, 2].clip(0, model_size[1] - 1)  # a border query stays on the border pixel
    q_model[:, 1] = q_model[:, 1].clip(0, model_size[0] - 1)
    tracks, occluded, scores = track_points(result.model, q_model, cfg.use_max_loc, cfg.occlusion_th, cfg.chunk_size,
                                            progress=progress)
    tracks = rescale_points(tracks, model_size, video_size).astype(np.float32)
    tracks[np.arange(len(q)), q[:, 0].astype(np.int64)] = q[:, [2, 1]]  # the query itself, exactly
    path = save_tracks(os.path.join(run_dir, "tracks.npz"), tracks, occluded, q, scores, video_size, half=half)
    timings["track"] = time.perf_counter() - start
    return {"path": path, "tracks": tracks, "occluded": occluded, "scores": scores, "timings": timings}
