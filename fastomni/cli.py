"""The ``fastomni`` command (also ``python -m fastomni``).

Subcommands::

    fastomni preprocess VIDEO --out SEQ            pairwise flow in the original's layout
    fastomni train [SEQ] --out RUN [options]       optimize (resumes from RUN's last checkpoint)
    fastomni track VIDEO --queries Q.npy --out DIR preprocess + optimize + track -> DIR/tracks.npz
    fastomni export RUN [--query_frame N]          every pixel of a frame to every frame -> .npz
    fastomni export RUN --all                      every frame's pixels to every frame -> RUN/field/
    fastomni view RUN_or_EXPORT --video V --out S  a static browser viewer of the field -> S/index.html
    fastomni viz TRACKS.npz --video VIDEO --out X  trails (.mp4) or trajectories (.png)
    fastomni eval TRACKS.npz --gt GT.npz           TAP-Vid metrics, query-first and strided
    fastomni synth --out DIR                       a synthetic clip with ground truth
    fastomni tapvid PKL --video NAME --out DIR     a TAP-Vid video: frames, queries.npy, gt.npz
    fastomni demo --out DIR                        synth -> track -> eval against chained flow
    fastomni batch MANIFEST --out DIR              track/export every video of a manifest -> DIR/summary.json

Options of the optimization (``train``, ``track``, ``demo``) are the original's config keys
(``--num_iters 2000``, ``--use_affine false``), a ``--config`` file (the original's .txt, YAML
or JSON) and a ``--preset``: ``original`` (the default with a GPU), ``fast`` (the grid model family,
the default without one) or ``cpu`` (the original's networks on a small CPU budget).
Errors in the input (:class:`fastomni.inputs.InputError`, missing files) are reported as one line
naming the problem, exit status 1, with nothing written; any other exception is a bug and shows its
traceback. Ctrl-C during an optimization saves a checkpoint and exits with 130 (run again to
resume). Torch (and OpenCV) use ``--threads`` threads, by default half the usable cores (1 to 8):
on a CPU shared with other jobs, as many threads as cores spin-wait on busy cores (a step ran 8x
slower there). Progress bars show the count.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import numpy as np

from fastomni.inputs import USER_ERRORS, InputError, as_input_errors, load_array
from fastomni.metrics import evaluate  # noqa: F401 - also importable from here, as before

__all__ = ["build_parser", "default_threads", "main"]


def default_threads() -> int:
    """Torch threads when ``--threads`` is not given: half the usable cores, 1 to 8 (1 on a 2-core
    machine, where two threads competing with another process spin-wait on a busy core)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // 2))


def _default_preset() -> str:
    import torch

    return "original" if torch.cuda.is_available() else "fast"


def _config(args, defaults: dict | None = None):
    """The command's config; ``defaults``: per preset name, the command's own values for some options
    (above the preset, below a ``--config`` file and flags)."""
    from fastomni.config import config_from_args

    name = args.preset or _default_preset()
    with as_input_errors():
        cfg = config_from_args(args, default_preset=name, defaults=(defaults or {}).get(name))
    if args.preset is None and not args.quiet:
        print(f"preset: {name} ({'GPU found' if name == 'original' else 'no GPU: the fast grid model on a CPU budget'}; "
              "--preset to choose)", file=sys.stderr)
    return cfg


def _report_missing(name: str, tracks: np.ndarray, treated: str) -> None:
    from fastomni.metrics import no_estimate

    missing = int(no_estimate(tracks).sum())
    if missing:
        print(f"{name}: {missing} of {tracks.shape[0] * tracks.shape[1]} track positions have no estimate "
              f"(non-finite); {treated}", file=sys.stderr)


# -- subcommands ------------------------------------------------------------------------------------
def _cmd_preprocess(args) -> int:
    from fastomni.io import load_video
    from fastomni.preprocess import preprocess

    frames = load_video(args.video, max_frames=args.max_frames, resize=args.max_side or None)
    preprocess(frames, args.out, max_interval=args.max_interval, progress=not args.quiet, flow_preset=args.flow_preset,
               pair_near=args.pair_near, frame_format=args.frame_format)
    print(args.out)
    return 0


def _cmd_train(args) -> int:
    from fastomni.optimize import optimize

    cfg = _config(args)
    seq = args.seq or cfg.data_dir
    if not seq:
        raise InputError("no sequence folder: give SEQ or data_dir in the config")
    out = args.out or os.path.join(cfg.save_dir, f"{cfg.expname}_{os.path.basename(os.path.normpath(seq))}")
    from fastomni.distributed import init_from_env

    comm = init_from_env()  # under torchrun: data-parallel over its ranks (None for one process)
    result = optimize(seq, out, cfg, progress=not args.quiet, comm=comm, allow_resize=args.allow_resize)
    if comm is None or comm.is_main:
        print(result.checkpoint)
    return 0


def _cmd_track(args) -> int:
    from fastomni.pipeline import track_video

    cfg = _config(args)
    queries = load_array(args.queries, "query file", ".npy")
    out = track_video(args.video, queries, args.out, cfg, half=args.half, progress=not args.quiet,
                      max_interval=args.max_interval, flow_preset=args.flow_preset)
    print(out["path"])
    return 0


def _cmd_export(args) -> int:
    from fastomni.optimize import load_run
    from fastomni.pipeline import read_video_info
    from fastomni.query import export_dense

    from fastomni.field import OcclusionTables, export_field
    from fastomni.refine import refiner_settings, run_refiner

    from fastomni.distributed import export_dense_sharded, init_from_env

    comm = init_from_env()  # under torchrun: the query frame's pixels split over ranks, rank 0 writes
    if comm is not None and args.all:
        raise InputError("export --all is not split over ranks: run it as one process (without torchrun)")
    info = read_video_info(args.run) if os.path.isfile(os.path.join(args.run, "video.json")) else None
    model, cfg, step = load_run(args.run, device=args.device)
    qf = cfg.query_frame_id if args.query_frame is None else args.query_frame
    if not args.all and not 0 <= qf < model.num_imgs:
        raise InputError(f"query frame {qf} outside 0..{model.num_imgs - 1}")
    size = info["video_size"] if info else None
    scale_to = None if size is None or size == (model.h, model.w) else size
    refine = None if args.no_refine else run_refiner(args.run, cfg)
    tables = None
    if (args.all or not args.exact_occlusion) and comm is None:  # --all always needs the tables' depth and colour maps
        tables = OcclusionTables(model, os.path.join(args.run, f"tables_{step:06d}"), cfg.chunk_size,
                                 progress=not args.quiet)
    if args.all:
        out = args.out or os.path.join(args.run, "field")
        export_field(model, out, tables, use_max_loc=cfg.use_max_loc, occlusion_th=cfg.occlusion_th, half=args.half,
                     chunk_size=cfg.chunk_size, scale_to=scale_to, exact_occlusion=args.exact_occlusion,
                     progress=not args.quiet, refine=refine, refine_settings=refiner_settings(cfg))
    else:
        out = args.out or os.path.join(args.run, f"dense_{qf:05d}.npz")
        if comm is not None:  # ranks share the exact per-point occlusion ray (no tables)
            export_dense_sharded(comm, model, qf, out, use_max_loc=cfg.use_max_loc, occlusion_th=cfg.occlusion_th,
                                 half=args.half, chunk_size=cfg.chunk_size, scale_to=scale_to, progress=not args.quiet,
                                 refine=refine)
        else:
            export_dense(model, qf, out, use_max_loc=cfg.use_max_loc, occlusion_th=cfg.occlusion_th, half=args.half,
                         chunk_size=cfg.chunk_size, scale_to=scale_to, progress=not args.quiet,
                         tables=None if args.exact_occlusion else tables, refine=refine)
    if comm is None or comm.is_main:
        print(out)
    return 0


def _cmd_view(args) -> int:
    from fastomni.viewer import write_viewer

    export = args.source
    if not os.path.isfile(os.path.join(export, "field.json")):
        if not os.path.isfile(os.path.join(export, "config.txt")):
            raise InputError(f"{export} is neither a field export (field.json) nor a run folder (config.txt)")
        export = os.path.join(args.source, "field")  # a run: export (or finish exporting) its field first
        _cmd_export(build_parser().parse_args(["export", args.source, "--all", "--out", export, "--device", args.device]
                                              + ["--quiet"] * args.quiet))
    print(write_viewer(export, args.video, args.out, max_points=args.max_points, fps=args.fps,
                       progress=not args.quiet))
    return 0


def _subsample(n: int, max_points: int) -> np.ndarray:
    return np.arange(n) if n <= max_points else np.linspace(0, n - 1, max_points).round().astype(np.int64)


def _cmd_viz(args) -> int:
    from fastomni.io import load_video
    from fastomni.query import load_tracks
    from fastomni.viz import plot_trajectories, render_trails

    if args.max_points < 1:
        raise InputError(f"--max_points must be >= 1, got {args.max_points}")
    ext = os.path.splitext(args.out)[1].lower()
    if ext not in (".mp4", ".png"):
        raise InputError(f"--out must end in .mp4 (trails) or .png (trajectories), got {args.out}")
    data = load_tracks(args.tracks)
    tracks, occluded = data["tracks"], data["occluded"]
    size = tuple(int(v) for v in data["image_size"]) if "image_size" in data else None
    frames = load_video(args.video, max_frames=tracks.shape[1], resize=size)
    if frames.shape[0] != tracks.shape[1]:
        raise InputError(f"{args.video} has {frames.shape[0]} frames, the tracks span {tracks.shape[1]}")
    _report_missing(f"fastomni {args.command}", tracks, "not drawn")
    keep = _subsample(len(tracks), args.max_points)
    if ext == ".mp4":
        render_trails(frames, tracks[keep], occluded[keep], args.out, trail=args.trail, progress=not args.quiet)
    else:
        plot_trajectories(frames, tracks[keep], occluded[keep], args.out)
    print(args.out)
    return 0


def _cmd_eval(args) -> int:
    from fastomni._atomic import write_atomic_text

    modes = ("first", "strided") if args.query_mode == "both" else (args.query_mode,)
    metrics = evaluate(args.tracks, args.gt, modes)
    if metrics["no_estimate"]:
        print(f"fastomni eval: {metrics['no_estimate']} track positions have no estimate (non-finite); counted as "
              "occluded", file=sys.stderr)
    text = json.dumps(metrics, indent=1)
    if args.json:
        write_atomic_text(args.json, text + "\n")
    print(text)
    return 0


def _cmd_synth(args) -> int:
    from fastomni.synthetic import make_video, write_synthetic

    with as_input_errors():
        video = make_video(num_frames=args.num_frames, h=args.size, w=args.size, num_points=args.num_points,
                           seed=args.seed)
    write_synthetic(video, args.out)
    print(args.out)
    return 0


def _cmd_tapvid(args) -> int:
    from fastomni._atomic import atomic_output
    from fastomni.synthetic import write_synthetic
    from fastomni.tapvid import load_tapvid, tapvid_names

    if args.video is None:
        with as_input_errors():
            print("\n".join(tapvid_names(args.pkl)))
        return 0
    if args.out is None:
        raise InputError("tapvid: --out is required with --video")
    with as_input_errors():
        video = load_tapvid(args.pkl, args.video, args.query_mode)
    write_synthetic(video, args.out)
    with atomic_output(os.path.join(args.out, "queries.npy")) as tmp:
        np.save(tmp, video.query_points)
    out = args.out
    print(f"{out}: {video.frames.shape[0]} frames of {video.frames.shape[2]}x{video.frames.shape[1]}, "
          f"{len(video.query_points)} queries ({args.query_mode})\n"
          f"next: fastomni track {out}/video.mp4 --queries {out}/queries.npy --out {out}/run\n"
          f"      fastomni eval {out}/run/tracks.npz --gt {out}/gt.npz --query_mode {args.query_mode}")
    return 0


def _cmd_demo(args) -> int:
    from fastomni.demo import PRESET_DEFAULTS, format_table, run_demo

    cfg = _config(args, PRESET_DEFAULTS)
    summary = run_demo(args.out, cfg, size=args.size, num_frames=args.num_frames, num_points=args.num_points,
                       seed=args.clip_seed, progress=not args.quiet)
    print(format_table(summary["metrics"]))
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["timings"].items()))
    print(f"trails: {summary['paths']['trails']}")
    return 0


def _cmd_batch(args) -> int:
    from datetime import timedelta

    from fastomni.batch import run_batch
    from fastomni.distributed import init_from_env

    cfg = _config(args)
    comm = init_from_env(timeout=timedelta(days=7))  # ranks wait for each other's videos at the end
    summary = run_batch(args.manifest, args.out, cfg, comm, progress=not args.quiet)
    if comm is not None and not comm.is_main:
        return 0
    print(json.dumps(summary["counts"]))
    return 1 if summary["counts"]["failed"] else 0


# -- parser -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from fastomni.config import add_config_arguments

    parser = argparse.ArgumentParser(prog="fastomni", description="Track every pixel through a video (OmniMotion).",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:4]))
    parser.add_argument("--threads", type=int, default=None,
                        help=f"CPU threads for torch and OpenCV (default: half the usable cores, 1 to 8: "
                             f"{default_threads()} here)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, func, help, **kw):
        p = sub.add_parser(name, help=help, description=help, **kw)
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(func=func)
        return p

    from fastomni.config import FLOW_PRESETS, FRAME_FORMATS

    p = command("preprocess", _cmd_preprocess, "compute filtered pairwise optical flow for a video")
    p.add_argument("video", help="video file, frame folder or sequence folder")
    p.add_argument("--out", required=True, help="sequence folder to write")
    p.add_argument("--max_frames", type=int, default=None, help="keep the first N frames")
    p.add_argument("--max_side", type=int, default=0, help="downscale so the longer side is at most this")
    p.add_argument("--max_interval", type=int, default=None, help="only pairs at most this many frames apart")
    p.add_argument("--pair_near", type=int, default=0,
                   help="0: every pair (the original); k: pairs within k frames, then 2k, 4k, ... apart")
    p.add_argument("--flow_preset", choices=FLOW_PRESETS, default="full",
                   help="fine: DIS on frames upsampled 2x (the fast preset's; about 4x the time per pair)")
    p.add_argument("--frame_format", choices=FRAME_FORMATS, default="jpg",
                   help="store the frames as JPEG (the original's) or lossless PNG (flow is computed on them)")

    p = command("train", _cmd_train, "optimize OmniMotion on a preprocessed sequence (resumes when stopped)")
    p.add_argument("seq", nargs="?", default=None, help="sequence folder (default: data_dir of the config)")
    p.add_argument("--out", default=None, help="run folder (default: save_dir/{expname}_{sequence name})")
    p.add_argument("--allow-resize", action="store_true",
                   help="resume a run saved with another number of torchrun ranks (new ranks get new sampler streams)")
    add_config_arguments(p)

    p = command("track", _cmd_track, "track query points through a video: preprocess, optimize, query")
    p.add_argument("video", help="video file or frame folder")
    p.add_argument("--queries", required=True, help=".npy [N, 3] rows (t, y, x): frame index and pixel")
    p.add_argument("--out", required=True, help="run folder; tracks go to OUT/tracks.npz")
    p.add_argument("--half", action="store_true",
                   help="store tracks as float16 displacements (float32, with a warning, where float16 would round "
                        "by more than 0.05 px)")
    p.add_argument("--max_interval", type=int, default=None, help="preprocess only pairs this close")
    p.add_argument("--flow_preset", choices=FLOW_PRESETS, default=None,
                   help="default: fine for the fast preset, full otherwise")
    add_config_arguments(p)

    p = command("export", _cmd_export, "track every pixel of one frame to every frame (dense .npz)")
    p.add_argument("run", help="run folder (from train or track)")
    p.add_argument("--query_frame", type=int, default=None, help="default: query_frame_id of the run's config")
    p.add_argument("--out", default=None, help="output .npz (default: RUN/dense_{frame}.npz); with --all a folder")
    p.add_argument("--half", action="store_true",
                   help="float16 displacements, smaller files (float32, with a warning, for frames where float16 "
                        "would round by more than 0.05 px)")
    p.add_argument("--device", default="auto")
    p.add_argument("--all", action="store_true",
                   help="the complete field: every frame as query frame, one .npz each in --out (default RUN/field/); "
                        "resumes, skipping frames already written")
    p.add_argument("--exact_occlusion", action="store_true",
                   help="score occlusion with the per-point ray in the target frame (slow) instead of the per-frame "
                        "occlusion tables (cached in RUN/tables_STEP/)")
    p.add_argument("--no_refine", action="store_true",
                   help="the model's tracks as they are, without the refinement on the run's flow, the re-finding "
                        "after occlusions and the alignment to the query that its config asks for (refine_interval, "
                        "refind_radius, align_radius: the fast preset's last stages)")

    p = command("view", _cmd_view, "write a static browser viewer of the complete field (open OUT/index.html)")
    p.add_argument("source", metavar="RUN_or_EXPORT",
                   help="a field export folder (export --all), or a run folder (its field is exported first)")
    p.add_argument("--video", required=True, help="the tracked video (file or frame folder)")
    p.add_argument("--out", required=True, help="folder to write the site into")
    p.add_argument("--max_points", type=int, default=16384, help="tracks per query frame (a pixel grid)")
    p.add_argument("--fps", type=float, default=10.0, help="playback frames per second")
    p.add_argument("--device", default="auto", help="for exporting a run's field")

    p = command("viz", _cmd_viz, "draw tracks over the video: trails (.mp4) or trajectories (.png)")
    p.add_argument("tracks", help="tracks .npz (track or export output)")
    p.add_argument("--video", required=True, help="the tracked video (file or frame folder)")
    p.add_argument("--out", required=True, help="output .mp4 or .png")
    p.add_argument("--trail", type=int, default=10, help="frames of trail behind each point (mp4)")
    p.add_argument("--max_points", type=int, default=400, help="draw at most this many tracks (evenly chosen)")

    p = command("eval", _cmd_eval, "TAP-Vid metrics of a tracks file against ground truth")
    p.add_argument("tracks", help="tracks .npz")
    p.add_argument("--gt", required=True, help="ground truth .npz: points [N,T,2] normalized, occluded [N,T]")
    p.add_argument("--query_mode", choices=("first", "strided", "both"), default="both")
    p.add_argument("--json", default=None, help="also write the metrics to this file")

    p = command("synth", _cmd_synth, "write a synthetic clip with ground-truth tracks")
    p.add_argument("--out", required=True)
    p.add_argument("--num_frames", type=int, default=24)
    p.add_argument("--size", type=int, default=128, help="frame height and width")
    p.add_argument("--num_points", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)

    p = command("tapvid", _cmd_tapvid, "extract a TAP-Vid video (frames, queries.npy, gt.npz) from its pickle")
    p.add_argument("pkl", help="TAP-Vid pickle (tapvid_davis.pkl, ...); only open files you trust")
    p.add_argument("--video", default=None, help="video name (or list index); without it, list the names")
    p.add_argument("--out", default=None, help="output folder (required with --video)")
    p.add_argument("--query_mode", choices=("first", "strided"), default="first",
                   help="TAP-Vid's query sampling: first visible frame, or every 5th visible frame")

    p = command("demo", _cmd_demo, "synthetic clip -> OmniMotion tracks -> metrics beside chained flow, trails mp4")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=None, help="frame height and width (default 64)")
    p.add_argument("--num_frames", type=int, default=24)
    p.add_argument("--num_points", type=int, default=256)
    p.add_argument("--clip_seed", type=int, default=0, help="seed of the synthetic clip")
    add_config_arguments(p)

    p = command("batch", _cmd_batch, "track or export every video of a manifest (sharded over torchrun ranks); "
                "resumes, skipping finished videos")
    p.add_argument("manifest", help="text file, one video a line: VIDEO [queries=Q.npy] [gt=GT.npz] [name=N] "
                                    "[preset=P] [option=value ...] (see fastomni.batch)")
    p.add_argument("--out", required=True, help="output folder: OUT/<name>/ per video, OUT/summary.json")
    add_config_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    name = f"fastomni {args.command}"
    try:
        threads = default_threads() if args.threads is None else args.threads
        if threads < 1:
            raise InputError(f"--threads must be >= 1, got {threads}")
        import cv2
        import torch

        previous = torch.get_num_threads(), cv2.getNumThreads()
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
        try:
            with warnings.catch_warnings():
                warnings.showwarning = lambda message, *_, **__: print(f"{name}: warning: {message}", file=sys.stderr)
                return args.func(args)
        finally:
            torch.set_num_threads(previous[0])  # main() called in-process leaves no trace
            cv2.setNumThreads(previous[1])
            from fastomni.distributed import leave

            leave()  # a torchrun rank leaves the process group its command joined
    except KeyboardInterrupt as exc:
        print(f"{name}: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 1

if __name__ == "__main__":
    sys.exit(main())
