"""The per-video optimization loop: a model trained on a preprocessed sequence, checkpointed and
resumable (the pipeline around it, video -> sequence -> model -> tracks, is :mod:`fastomni.pipeline`).

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
computes the same numbers as one never stopped. A process killed between checkpoints resumes from
the last one: the log lines of the steps it redoes are dropped from ``log.txt`` first.

Where "the same numbers" holds: on the CPU (``reference`` and ``cpu`` backends), where every
gradient is summed in a fixed order (the C++ kernels' results do not depend on the thread count).
On a GPU it does not, bit for bit, wherever a gradient is a sum of float atomics, whose order varies
from run to run: the table gradient of ``grid_encode`` (``triton``, ``cuda``, and the reference's
``index_add_``) and the weight gradients of ``affine_coupling``'s ``cuda`` backend. A resumed GPU run
(or a repeated one) using them continues from the same state but drifts from an unstopped one by
rounding. The ``triton`` ``affine_coupling`` backward uses no atomics (its weight gradients are one
``mm`` per weight over per-point buffers: the same bits on every run of a shape, on one GPU model
and library version), nor do the ``triton`` ``gabor_filter``, ``composite`` and
``stratified_sample`` kernels.

Resuming refuses, before anything in the run folder is rewritten, a run of another clip (another
``data_dir``, frame count or image size) and one whose networks were built with other options.

Under ``torchrun`` (``comm``, :mod:`fastomni.distributed`) the loop is data-parallel: each rank
draws its own pairs, the loss is the global batch's, rank 0 alone writes the run folder, and
checkpoints hold every rank's sampler state (resuming with another world size needs ``allow_resize``).

Example::

    >>> from fastomni.config import preset
    >>> result = optimize("data/seq", "runs/seq", preset("cpu"))   # doctest: +SKIP
    >>> result.step                                                 # doctest: +SKIP
    400
"""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from fastomni._atomic import write_atomic_text
from fastomni.checkpoint import checkpoint_step, latest_checkpoint, read_checkpoint, restore_checkpoint, save_checkpoint
from fastomni.config import FAMILIES, MODEL_KEYS, Config, config_to_text, load_config
from fastomni.inputs import InputError
from fastomni.nn.fast import FAST_LEGACY, FastOmniMotion
from fastomni.nn.model import OmniMotion, RayModel
from fastomni.preprocess import read_shots
from fastomni.query import pair_flows, track_points
from fastomni.sampler import PairSampler
from fastomni.train import make_optimizer, training_step

__all__ = [
    "Interrupted",
    "OptimizeResult",
    "build_model",
    "load_run",
    "optimize",
    "resolve_device",
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
        raise InputError(f"device {name!r} is not a torch device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def build_model(cfg: Config, num_imgs: int, h: int, w: int, device: torch.device | str = "cpu",
                family: str | None = None, options: dict | None = None) -> RayModel:
    """A fresh model of ``family`` (default ``cfg.family``: ``OmniMotion`` or ``FastOmniMotion``
    with the shape ``options``) for ``cfg``, its weights drawn from ``cfg.seed``."""
    family = family or cfg.family
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if family == "fast":
            # a checkpoint's options miss those added after it was written: they take their old value
            shape = {} if options is None else {**FAST_LEGACY, **options}
            model = FastOmniMotion(num_imgs, h, w, num_samples_ray=cfg.num_samples_ray, min_depth=cfg.min_depth,
                                   max_depth=cfg.max_depth, **shape)
        elif family == "original":
            model = OmniMotion(num_imgs, h, w, num_samples_ray=cfg.num_samples_ray, min_depth=cfg.min_depth,
                               max_depth=cfg.max_depth, pe_freq=cfg.pe_freq, use_affine=cfg.use_affine)
        else:
            raise InputError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    return model.to(device)


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
        raise InputError(f"{run_dir} holds checkpoints of a model with other options ({'; '.join(changed)}); "
                         "use another output folder or the same options")


def _check_same_clip(source: str, ckpt: dict, sampler: PairSampler, run_dir: str, seq_dir: str) -> None:
    """Refuse to continue ``ckpt`` (read from ``source``) on another clip than it was trained on."""
    differ = []
    if "num_imgs" in ckpt and int(ckpt["num_imgs"]) != sampler.num_imgs:
        differ.append(f"frames: {int(ckpt['num_imgs'])} -> {sampler.num_imgs}")
    if "image_size" in ckpt and tuple(int(v) for v in ckpt["image_size"]) != (sampler.h, sampler.w):
        h, w = (int(v) for v in ckpt["image_size"])
        differ.append(f"image size: {w}x{h} -> {sampler.w}x{sampler.h}")
    own = os.path.dirname(os.path.abspath(source)) == os.path.abspath(run_dir)
    cfg_path = os.path.join(run_dir, "config.txt")
    if own and os.path.isfile(cfg_path):
        trained_on = load_config(cfg_path).data_dir
        if trained_on and os.path.realpath(trained_on) != os.path.realpath(seq_dir):
            differ.append(f"data_dir: {trained_on} -> {seq_dir}")
    if differ:
        where = f"{run_dir} holds a run" if own else f"{source} is a checkpoint"
        raise InputError(f"{where} of another clip ({'; '.join(differ)}); use another output folder "
                         "(or the same sequence)")


_LOG_STEP = re.compile(r"^step: (\d+) ")


def _truncate_log(log_path: str, step: int) -> None:
    """Drop the lines of steps after ``step`` (and a torn last line) from ``log_path``, atomically: a
    run killed after its last checkpoint redoes those steps."""
    if not os.path.isfile(log_path):
        return
    with open(log_path, encoding="utf-8") as f:
        lines = f.readlines()
    if lines and not lines[-1].endswith("\n"):
        lines[-1] = ""  # torn by the kill: a line half written
    kept = [line for line in lines if line and not ((m := _LOG_STEP.match(line)) and int(m.group(1)) > step)]
    if len(kept) != len(lines):
        write_atomic_text(log_path, "".join(kept))


def _restore(ckpt: dict, source: str, model, optimizer, scheduler, sampler: PairSampler, generator: torch.Generator,
             cfg: Config, run_dir: str, comm=None) -> int:
    restore_checkpoint(ckpt, model, optimizer if cfg.load_opt else None, scheduler if cfg.load_scheduler else None)
    step = int(ckpt["step"]) if "step" in ckpt else checkpoint_step(source)
    rng = ckpt.get("rng")
    if rng is not None and os.path.dirname(os.path.abspath(source)) == os.path.abspath(run_dir):
        generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if comm is None:
            sampler.load_state_dict(rng["sampler"], run_dir)
        else:
            from fastomni.distributed import rank_generator

            states = rng.get("sampler_ranks", [rng["sampler"]])
            if comm.rank < len(states):
                sampler.load_state_dict(states[comm.rank], run_dir)
            else:  # --allow-resize to more ranks: a new rank's stream, fresh at this step
                sampler.load_state_dict({**states[0], "rng": sampler.rng.bit_generator.state}, run_dir)
                sampler.rng = rank_generator(cfg.loader_seed + step, comm.rank)
    return step


def _check_world_size(ckpt: dict, source: str, comm, allow_resize: bool) -> None:
    """Refuse to resume a run of another world size (the ranks' sampler streams would not continue)."""
    saved = int(ckpt.get("world_size", 1))
    now = 1 if comm is None else comm.world_size
    if saved != now and not allow_resize:
        raise InputError(f"{source} was written by a run of {saved} rank(s), this one has {now}: resuming would "
                         "not continue its sampler streams; use the same number of ranks or --allow-resize")


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


def optimize(seq_dir: str, run_dir: str, cfg: Config, progress: bool = True, comm=None,
             allow_resize: bool = False) -> OptimizeResult:
    """Optimize OmniMotion on the preprocessed sequence ``seq_dir`` for ``cfg.num_iters`` steps,
    continuing from ``run_dir``'s latest checkpoint (or ``cfg.ckpt_path``) unless ``cfg.no_reload``.

    ``comm`` (:func:`fastomni.distributed.init_from_env`): data-parallel over its ranks, rank 0
    alone writing; a checkpoint of another world size is refused unless ``allow_resize``.

    Returns an :class:`OptimizeResult`; raises :class:`Interrupted` (a ``KeyboardInterrupt``) after
    saving when stopped by SIGINT/SIGTERM.
    """
    start_time = time.perf_counter()
    device = resolve_device(cfg.device)
    sampler = PairSampler(seq_dir, cfg.num_pairs, cfg.num_pts, cfg.num_imgs, cfg.start_interval,
                          cfg.use_count_map, cfg.use_error_map, seed=cfg.loader_seed, pair_sampling=cfg.pair_sampling)
    sampler.check_flows()  # a bad flow file is found now, not at the step that first draws it
    main = comm is None or comm.is_main
    if comm is not None:
        from fastomni.distributed import pair_flows_sharded, rank_generator

        sampler.rng = rank_generator(cfg.loader_seed, comm.rank)
        progress = progress and main
    existing = latest_checkpoint(run_dir)
    if cfg.no_reload and existing:
        raise InputError(f"{run_dir} already holds checkpoints (latest {os.path.basename(existing)}) and no_reload "
                         "is set: delete them or use another output folder")
    if cfg.ckpt_path and not os.path.isfile(cfg.ckpt_path):
        raise FileNotFoundError(f"ckpt_path {cfg.ckpt_path} does not exist")
    _check_resume_config(run_dir, cfg)
    source = "" if cfg.no_reload else (existing or cfg.ckpt_path)
    ckpt = read_checkpoint(source, map_location=device) if source else None
    if ckpt is not None:
        _check_same_clip(source, ckpt, sampler, run_dir, seq_dir)
        _check_world_size(ckpt, source, comm, allow_resize)
    # Everything is checked: only now is the run folder written.
    if main:
        os.makedirs(run_dir, exist_ok=True)
        write_atomic_text(os.path.join(run_dir, "config.txt"),
                          config_to_text(dataclasses.replace(cfg, data_dir=seq_dir)))

    model = build_model(cfg, sampler.num_imgs, sampler.h, sampler.w, device,
                        options=None if ckpt is None else ckpt.get("model_options"))
    shots = read_shots(seq_dir, sampler.num_imgs)
    model.shots = shots if shots.max() > 0 else None
    optimizer, scheduler = make_optimizer(model, cfg.lr_feature, cfg.lr_deform, cfg.lr_color, cfg.lrate_decay_steps,
                                          cfg.lrate_decay_factor)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    step = 0
    if ckpt is not None:
        step = _restore(ckpt, source, model, optimizer, scheduler, sampler, generator, cfg, run_dir, comm)
        if progress:
            tqdm.write(f"resuming from {source} at step {step}")
    saved = source
    log_path = os.path.join(run_dir, "log.txt")
    if main:
        _truncate_log(log_path, step)

    def save(s: int) -> str:
        rng = {"generator": generator.get_state(), "torch": torch.get_rng_state(), "sampler": sampler.state_dict()}
        if comm is not None:  # every rank's sampler; rank 0 writes
            rng["sampler_ranks"] = comm.all_gather_object(sampler.state_dict())
            if not main:
                return os.path.join(run_dir, f"model_{s:06d}.pth")
            return save_checkpoint(run_dir, s, model, optimizer, scheduler, rng=rng, num_imgs=model.num_imgs,
                                   image_size=(model.h, model.w), world_size=comm.world_size)
        return save_checkpoint(run_dir, s, model, optimizer, scheduler, rng=rng, num_imgs=model.num_imgs,
                               image_size=(model.h, model.w))

    bar = tqdm(total=cfg.num_iters, initial=min(step, cfg.num_iters), unit="step",
               desc=f"optimize ({device.type}, {torch.get_num_threads()} threads)",
               disable=not progress, dynamic_ncols=True)
    try:
        with _DeferredSignals() as signals:
            while step < cfg.num_iters:
                # The cache of step s is made when step s + 1 needs it: never after the last step.
                if cfg.use_error_map and cfg.i_cache and step and step % cfg.i_cache == 0 and sampler.cache_step != step:
                    if comm is None:
                        flows = pair_flows(model, *sampler.cache_pairs(), use_max_loc=cfg.use_max_loc,
                                           chunk_size=cfg.chunk_size)
                    else:  # the frames split over ranks, gathered
                        flows = pair_flows_sharded(comm, model, *sampler.cache_pairs(), use_max_loc=cfg.use_max_loc,
                                                   chunk_size=cfg.chunk_size)
                    sampler.set_error_cache(flows, step, run_dir if main else None)
                step += 1
                batch = sampler.sample(step)
                result = training_step(model, optimizer, scheduler, batch, step, generator=generator,
                                       grad_clip=cfg.grad_clip, max_padding=cfg.max_padding, mask_near=cfg.mask_near,
                                       **({} if comm is None else {"comm": comm}))
                if cfg.i_img and step % cfg.i_img == 0 and main:
                    _snapshot(model, sampler, cfg, run_dir, step)
                if main and ((cfg.i_print and step % cfg.i_print == 0) or step == cfg.num_iters):
                    terms = " ".join(f"{k}: {v:.5f}" for k, v in result.terms.items())
                    with open(log_path, "a", encoding="utf-8") as f:
                        f.write(f"step: {step} | loss: {result.loss:.5f} | {terms} | "
                                f"lr: {optimizer.param_groups[0]['lr']:.3g}\n")
                    bar.set_postfix(loss=f"{result.loss:.4f}", flow=f"{result.terms.get('flow', float('nan')):.3f}")
                bar.update(1)
                if comm is not None and comm.any(signals.signum is not None):  # a signal on any rank stops all
                    signals.signum = signals.signum or signal.SIGTERM
                if (cfg.i_weight and step % cfg.i_weight == 0) or step == cfg.num_iters or signals.signum:
                    saved = save(step)
                if signals.signum is not None:
                    raise Interrupted(step, saved, signals.signum)
    finally:
        bar.close()
    model.eval()
    return OptimizeResult(model, step, saved, run_dir, time.perf_counter() - start_time)


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
    dev = resolve_device(device)
    ckpt = read_checkpoint(path, map_location=dev)
    if "image_size" not in ckpt or "num_imgs" not in ckpt:
        raise InputError(f"{path} lacks num_imgs/image_size (not written by fastomni); cannot size the model")
    h, w = ckpt["image_size"]
    model = build_model(cfg, int(ckpt["num_imgs"]), int(h), int(w), dev, family=ckpt.get("family", "original"),
                        options=ckpt.get("model_options"))
    restore_checkpoint(ckpt, model)
    if ckpt.get("shots") is not None:
        model.shots = np.asarray(ckpt["shots"], np.int64)
    return model.eval(), cfg, int(ckpt["step"]) if "step" in ckpt else checkpoint_step(path)
