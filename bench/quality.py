"""Tracking quality per unit of wall time: OmniMotion's presets against chained optical flow on
synthetic clips with exact ground truth (issue 13, "How it is measured"). A benchmark script, not a
test: a full run takes about an hour on 2 CPU cores.

Clips: :data:`CLIPS`, from :func:`fastomni.synthetic.make_video` (one motion each: camera pan,
camera zoom, crossing occluding objects, rotation, a non-rigid warp, all of them mixed), ``--frames``
frames (default 32) at ``--size`` px square (default 128), 256 query points each.

Systems per clip, each run through what a user runs (:func:`fastomni.pipeline.track_video`: video
-> preprocess -> optimize -> query, whose wall time is reported per stage):

* ``chained``: :func:`fastomni.baseline.chained_flow_tracks` at the clip's resolution;
* ``chained_fine``: the same on the ``"fine"`` flow the fast preset preprocesses with (DIS on
  frames upsampled 2x, :func:`fastomni.preprocess.flow_estimator`): chained flow as good as the
  flow the fast preset is given;
* ``chained_refined``: no OmniMotion: the fast preset's preprocessing, chained flow on its stored
  frames, and its refinement, re-finding and alignment (:func:`fastomni.refine.refiner`) started
  from and anchored to the chain instead of a model (what those stages alone are worth);
* ``fast``: ``preset("fast")`` with ``num_iters`` times ``--budget-scale``;
* ``fast2x``: the same with twice the steps;
* ``original``: ``preset("cpu")`` (the original networks) given the wall time ``fast`` took: a probe
  run times its steps and its query on the same clip, and ``num_iters`` is set so that
  preprocess + optimize + query fit that time.

A budget-scaled run stretches the preset's learning-rate schedule with it (``lrate_decay_steps``
scaled like ``num_iters``) and checkpoints at 1/4, 1/2, 3/4 and all of its steps. Every checkpoint is
evaluated (:func:`fastomni.optimize.load_run` + :func:`fastomni.pipeline.model_tracks`): the "time to
chained AJ" is the wall time of the first checkpoint whose AJ reaches chained flow's (preprocess +
optimize up to that checkpoint, from its file time, + the final query's time), or "not reached".

Metrics: TAP-Vid's (:func:`fastomni.metrics.tapvid_metrics`) with ``query_mode="strided"`` in the
table (the clips' query frames are uniform over the video, not each point's first visible frame);
the JSON also holds ``"first"``. TC: :func:`fastomni.metrics.temporal_coherence` (lower is better).

Run::

    python bench/quality.py --json quality.json                        # the full benchmark
    python bench/quality.py --clips 1 --frames 6 --size 32 --budget-scale 0.05   # a smoke test
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

from fastomni._atomic import atomic_output

# (name, motion, seed)
CLIPS = (
    ("pan", "pan", 101),
    ("zoom", "zoom", 102),
    ("objects", "objects", 103),
    ("rotation", "rotation", 104),
    ("nonrigid", "nonrigid", 105),
    ("mixed", "mixed", 106),
)
SYSTEMS = ("chained", "chained_fine", "chained_refined", "fast", "fast2x", "original")
MODE = "strided"
PROBE_STEPS = 6


def machine(threads: int) -> dict:
    """The machine and software this run measured."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "torch": torch.__version__,
            "threads": threads, "python": platform.python_version(), "platform": platform.platform()}


def budgeted(cfg, factor: float):
    """``cfg`` with ``num_iters`` (and the learning-rate schedule) scaled by ``factor``,
    checkpointing at each quarter of the run."""
    steps = max(1, round(cfg.num_iters * factor))
    decay = max(1, round(cfg.lrate_decay_steps * steps / cfg.num_iters))
    return cfg.replace(num_iters=steps, lrate_decay_steps=decay, i_weight=max(1, math.ceil(steps / 4)),
                       i_print=min(cfg.i_print, steps) or steps)


def evaluate(video, tracks, occluded) -> dict:
    from fastomni.metrics import error_budget, evaluate_tracks

    h, w = video.frames.shape[1:3]
    m = evaluate_tracks(tracks, occluded, video.points, video.occluded, video.query_points, (h, w))
    return {"first": m["first"], "strided": m["strided"], "temporal_coherence": m["temporal_coherence"],
            "error_budget": error_budget(tracks, occluded, video.points, video.occluded, video.query_points,
                                         (h, w), MODE)}


def model_queries(video, model_hw: tuple[int, int]) -> np.ndarray:
    """The clip's query points ``(t, y, x)`` in the model's pixels (as ``track_video`` maps them)."""
    from fastomni.pipeline import queries_to_model

    return queries_to_model(video.query_points, video.frames.shape[1:3], model_hw)


def checkpoint_tracks(run_dir: str, path: str, video) -> tuple[np.ndarray, np.ndarray]:
    """Tracks of the clip's queries by the model of checkpoint ``path``, in the video's pixels
    (as :func:`fastomni.pipeline.track_video` makes them)."""
    from fastomni.optimize import load_run
    from fastomni.pipeline import model_tracks, tracks_to_video

    model, cfg, _ = load_run(run_dir, device="cpu", checkpoint=path)
    q = model_queries(video, (model.h, model.w))
    tracks, occluded, _ = model_tracks(model, q, cfg, os.path.join(run_dir, "seq"))
    return tracks_to_video(tracks, video.query_points, (model.h, model.w), video.frames.shape[1:3]), occluded


def run_omnimotion(video, run_dir: str, cfg, progress: bool) -> dict:
    """One system through ``track_video`` in a fresh ``run_dir``: metrics, stage times, steps, and
    each checkpoint's AJ and wall time."""
    from fastomni.checkpoint import checkpoint_step
    from fastomni.pipeline import track_video

    shutil.rmtree(run_dir, ignore_errors=True)
    result = track_video(video.frames, video.query_points, run_dir, cfg, progress=progress)
    t = result["timings"]
    out = {"metrics": evaluate(video, result["tracks"], result["occluded"]),
           "timings": {"preprocess": t["preprocess"], "optimize": t["optimize"], "query": t["track"],
                       "total": t["preprocess"] + t["optimize"] + t["track"]},
           "num_iters": cfg.num_iters, "config": {k: getattr(cfg, k) for k in ("family", "max_side", "num_pairs",
                                                                              "num_pts", "num_samples_ray",
                                                                              "lrate_decay_steps")}}
    paths = sorted(glob.glob(os.path.join(run_dir, "model_*.pth")), key=checkpoint_step)
    out["steps"] = checkpoint_step(paths[-1]) if paths else 0
    # The optimization ended at about the last checkpoint's file time.
    opt_start = os.path.getmtime(paths[-1]) - t["optimize"] if paths else 0.0
    out["checkpoints"] = []
    for path in paths:
        step = checkpoint_step(path)
        if path == paths[-1]:
            aj = out["metrics"][MODE]["average_jaccard"]
        else:
            aj = evaluate(video, *checkpoint_tracks(run_dir, path, video))[MODE]["average_jaccard"]
        wall = t["preprocess"] + (os.path.getmtime(path) - opt_start) + t["track"]
        out["checkpoints"].append({"step": step, "wall_s": wall, "average_jaccard": aj})
    return out


def run_chained_refined(video, run_dir: str, cfg, progress: bool) -> dict:
    """The ``chained_refined`` system (module docstring) with ``cfg``'s preprocessing and
    refinement stages: metrics and stage times."""
    from fastomni.baseline import chained_flow_tracks
    from fastomni.io import load_video
    from fastomni.pipeline import prepare_sequence, tracks_to_video
    from fastomni.refine import refiner

    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    seq_dir, info = prepare_sequence(video.frames, run_dir, cfg, progress=progress)
    pre = time.perf_counter() - t0
    t0 = time.perf_counter()
    model_hw = tuple(info["model_size"])
    q = model_queries(video, model_hw)
    tracks, occluded = chained_flow_tracks(load_video(os.path.join(seq_dir, "color")), q)
    tracks, occluded = refiner(seq_dir, cfg)(tracks, occluded, q)
    tracks = tracks_to_video(tracks, video.query_points, model_hw, video.frames.shape[1:3])
    query = time.perf_counter() - t0
    return {"metrics": evaluate(video, tracks, occluded), "steps": 0,
            "timings": {"preprocess": pre, "optimize": 0.0, "query": query, "total": pre + query}}


def original_budget(video, probe_dir: str, cfg, seconds: float, progress: bool) -> tuple[int, dict]:
    """Steps of ``cfg`` that fit ``seconds`` of preprocess + optimize + query on ``video``, from a
    probe run of :data:`PROBE_STEPS` steps in ``probe_dir`` (removed after)."""
    from fastomni.optimize import optimize
    from fastomni.pipeline import model_tracks, prepare_sequence

    shutil.rmtree(probe_dir, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        seq_dir, info = prepare_sequence(video.frames, probe_dir, cfg, progress=progress)
        pre = time.perf_counter() - t0
        # A checkpoint after every step: their file times give the step time without the setup.
        probe = cfg.replace(num_iters=PROBE_STEPS, i_weight=1, i_print=PROBE_STEPS)
        result = optimize(seq_dir, probe_dir, probe, progress=progress)
        times = sorted(os.path.getmtime(p) for p in glob.glob(os.path.join(probe_dir, "model_*.pth")))
        per_step = (times[-1] - times[0]) / (len(times) - 1)
        t0 = time.perf_counter()
        q = model_queries(video, tuple(info["model_size"]))
        model_tracks(result.model, q, cfg, seq_dir)
        query = time.perf_counter() - t0
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    steps = max(1, int((seconds - pre - query) / per_step))
    return steps, {"probe_preprocess_s": pre, "probe_step_s": per_step, "probe_query_s": query, "target_s": seconds}


def run_clip(name: str, motion: str, seed: int, args, workdir: str) -> dict:
    from fastomni.baseline import chained_flow_tracks
    from fastomni.config import preset
    from fastomni.synthetic import make_video

    say = print if args.progress else (lambda *a, **k: None)
    clip = {"name": name, "motion": motion, "seed": seed, "frames": args.frames, "size": [args.size, args.size],
            "num_points": args.points, "systems": {}}
    t0 = time.perf_counter()
    video = make_video(num_frames=args.frames, h=args.size, w=args.size, num_points=args.points, seed=seed,
                       motion=motion)
    clip["render_s"] = time.perf_counter() - t0
    clip["occluded_gt_fraction"] = float(video.occluded.mean())
    systems = clip["systems"]
    fast = preset("fast")
    for system in args.systems:
        say(f"[{name}] {system} ...", flush=True)
        run_dir = os.path.join(workdir, name, system)
        try:
            if system in ("chained", "chained_fine"):
                t0 = time.perf_counter()
                tracks, occluded = chained_flow_tracks(video.frames, video.query_points,
                                                       flow_preset="fine" if system == "chained_fine" else "full")
                wall = time.perf_counter() - t0
                systems[system] = {"metrics": evaluate(video, tracks, occluded), "steps": 0,
                                   "timings": {"preprocess": wall, "optimize": 0.0, "query": 0.0, "total": wall}}
            elif system == "chained_refined":
                systems[system] = run_chained_refined(video, run_dir, fast, args.verbose)
            elif system in ("fast", "fast2x"):
                factor = args.budget_scale * (2 if system == "fast2x" else 1)
                systems[system] = run_omnimotion(video, run_dir, budgeted(fast, factor), args.verbose)
            elif system == "original":
                if "total" not in systems.get("fast", {}).get("timings", {}):
                    raise RuntimeError("the original preset's budget is fast's wall time: run 'fast' too")
                cpu = preset("cpu")
                steps, probe = original_budget(video, run_dir + "_probe", cpu, systems["fast"]["timings"]["total"],
                                               args.verbose)
                systems[system] = run_omnimotion(video, run_dir, budgeted(cpu, steps / cpu.num_iters), args.verbose)
                systems[system]["budget"] = probe
            else:
                raise ValueError(f"unknown system {system!r}")
        except Exception as exc:  # noqa: BLE001 - a failed system is recorded, the run goes on
            systems[system] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            say(f"[{name}] {system} FAILED: {type(exc).__name__}: {exc}", flush=True)
            continue
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        s = systems[system]
        say(f"[{name}] {system}: AJ {s['metrics'][MODE]['average_jaccard']:.3f} in {s['timings']['total']:.1f} s, "
            f"{s['steps']} steps", flush=True)
    if not args.keep:
        shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
    target = systems.get("chained", {}).get("metrics", {}).get(MODE, {}).get("average_jaccard")
    for s in systems.values():
        if "checkpoints" in s and target is not None:
            s["time_to_chained_aj_s"] = next((c["wall_s"] for c in s["checkpoints"] if c["average_jaccard"] >= target),
                                             None)
    return clip


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), torch {m['torch']}, "
             f"{m['threads']} threads. Metrics: TAP-Vid, query mode `{MODE}`; TC lower is better. "
             f"Wall time = preprocess + optimize + query.", "",
             "| clip | system | AJ | <δ_avg | OA | TC | wall s (pre + opt + query) | steps | s to chained AJ |",
             "|---|---|---|---|---|---|---|---|---|"]
    for clip in report["clips"]:
        if "error" in clip:
            lines.append(f"| {clip['name']} | — | failed: {clip['error']} | | | | | | |")
            continue
        for system, s in clip["systems"].items():
            if "error" in s:
                lines.append(f"| {clip['name']} | {system} | failed: {s['error'].splitlines()[0]} | | | | | | |")
                continue
            mm, t = s["metrics"][MODE], s["timings"]
            reach = ("—" if "time_to_chained_aj_s" not in s  # no checkpoints, or no chained system to reach
                     else "not reached" if s["time_to_chained_aj_s"] is None else f"{s['time_to_chained_aj_s']:.1f}")
            lines.append(f"| {clip['name']} | {system} | {mm['average_jaccard']:.3f} | "
                         f"{mm['average_pts_within_thresh']:.3f} | {mm['occlusion_accuracy']:.3f} | "
                         f"{s['metrics']['temporal_coherence']:.2f} | {t['total']:.1f} ({t['preprocess']:.1f} + "
                         f"{t['optimize']:.1f} + {t['query']:.1f}) | {s['steps']} | {reach} |")
    budget_keys = ("average_jaccard", "found", "exact", "both", "occluded_when_visible", "visible_when_hidden",
                   "far_when_visible")
    lines += ["", "Error budget (`fastomni.metrics.error_budget`): AJ with the truth put in, part by part; "
              "found: every lost point found exactly; exact: every visible position exact. The last three "
              "columns are fractions of the visible, hidden and visible-and-predicted-visible entries.", "",
              "| clip | system | AJ | found | exact | both | occluded, visible | visible, hidden "
              "| visible, > 4 px at 256 |", "|---|---|---|---|---|---|---|---|---|"]
    for clip in report["clips"]:
        for system, s in clip.get("systems", {}).items():
            if "error" not in s:
                b = s["metrics"]["error_budget"]
                cells = ["—" if b[k] is None else f"{b[k]:.3f}" for k in budget_keys]
                lines.append(f"| {clip['name']} | {system} | " + " | ".join(cells) + " |")
    means = report["summary"]["mean_average_jaccard"]
    if means:
        lines += ["", "Mean AJ over the clips every system finished: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in means.items())]
    return "\n".join(lines)


def summarize(clips: list[dict]) -> dict:
    done = [c for c in clips if "error" not in c]
    names = {k for c in done for k in c["systems"]}
    ok = [c for c in done if all("error" not in c["systems"].get(k, {"error": 1}) for k in names)]
    means = {k: float(np.mean([c["systems"][k]["metrics"][MODE]["average_jaccard"] for c in ok]))
             for k in sorted(names)} if ok else {}
    return {"mean_average_jaccard": means, "clips_in_mean": [c["name"] for c in ok]}


def select_clips(spec: str) -> list[tuple[str, str, int]]:
    if spec == "all":
        return list(CLIPS)
    if spec.isdigit():
        n = int(spec)
        if not 1 <= n <= len(CLIPS):
            raise SystemExit(f"--clips N must be 1..{len(CLIPS)}, got {n}")
        return list(CLIPS[:n])
    by_name = {c[0]: c for c in CLIPS}
    unknown = [n for n in spec.split(",") if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown clips {unknown}; choose from {list(by_name)}")
    return [by_name[n] for n in spec.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    from fastomni.cli import default_threads

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clips", default="all", help=f"all, a count N (the first N), or names from {[c[0] for c in CLIPS]}")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--size", type=int, default=128, help="frame height and width, px")
    p.add_argument("--points", type=int, default=256, help="query points per clip")
    p.add_argument("--budget-scale", type=float, default=1.0, help="fast's num_iters times this (fast2x: twice)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {SYSTEMS}")
    p.add_argument("--threads", type=int, default=default_threads(), help="torch threads (default: the CLI's)")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--workdir", default=None, help="run folders (default: a temporary folder, removed)")
    p.add_argument("--keep", action="store_true", help="keep the run folders")
    p.add_argument("--verbose", action="store_true", help="the pipeline's own progress bars")
    p.add_argument("--quiet", dest="progress", action="store_false", help="no progress lines")
    args = p.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    bad = [s for s in args.systems if s not in SYSTEMS]
    if bad or not args.systems:
        p.error(f"--systems: unknown {bad}; choose from {SYSTEMS}")
    if "original" in args.systems and "fast" not in args.systems:
        p.error("--systems: 'original' is given fast's wall time, so 'fast' must run too")
    args.systems.sort(key=SYSTEMS.index)
    if not args.budget_scale > 0 or args.frames < 3 or args.size < 16 or args.points < 1 or args.threads < 1:
        p.error("need --budget-scale > 0, --frames >= 3, --size >= 16, --points >= 1, --threads >= 1")
    return args


def main(argv=None) -> dict:
    import cv2

    args = parse_args(argv)
    clips = select_clips(args.clips)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    workdir = args.workdir or tempfile.mkdtemp(prefix="fastomni_quality_")
    report = {"machine": machine(torch.get_num_threads()),
              "settings": {k: getattr(args, k) for k in ("frames", "size", "points", "budget_scale", "systems")}
              | {"query_mode": MODE, "clips": [c[0] for c in clips]}, "clips": []}
    start = time.perf_counter()

    def write_report() -> None:
        report["summary"] = summarize(report["clips"])
        report["total_s"] = time.perf_counter() - start
        if args.json:
            with atomic_output(args.json) as tmp, open(tmp, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
                f.write("\n")

    try:
        for name, motion, seed in clips:
            if args.progress:
                print(f"== clip {name} (motion {motion}, seed {seed}) ==", flush=True)
            try:
                report["clips"].append(run_clip(name, motion, seed, args, workdir))
            except Exception as exc:  # noqa: BLE001 - a failed clip is recorded, the run goes on
                report["clips"].append({"name": name, "motion": motion, "seed": seed,
                                        "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
                print(f"clip {name} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            write_report()  # after every clip: a stopped run keeps what it measured
    except KeyboardInterrupt:
        report["interrupted"] = True
        print("interrupted: reporting the clips finished so far", file=sys.stderr, flush=True)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    write_report()
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
