"""``fastomni batch``: many videos, one run folder each, sharded over ``torchrun`` ranks.

The manifest is text, one video a line (``#`` starts a comment; relative paths are relative to
the manifest's folder)::

    clips/cat.mp4   queries=cat_q.npy gt=cat_gt.npz          # sparse: track -> DIR/cat/tracks.npz
    clips/dog.mp4   name=dog2 preset=fast num_iters=800      # dense:  export -> DIR/dog2/dense_00000.npz
    frames/bird/    query_frame=5 flow_preset=fast

The first field is the video (file or frame folder); then ``key=value`` fields: ``name`` (the run
folder's name, default the video's file name without extension), ``queries`` (``.npy [N, 3]``
(t, y, x): run ``track``; without it, ``export`` the dense tracks of ``query_frame``), ``gt``
(TAP-Vid ``.npz`` ground truth: its metrics go to the summary), ``preset``, ``flow_preset``,
``max_interval``, ``query_frame``, and any config option (``num_iters=800``), over the command's
own ``--preset`` and option flags (a video's ``preset=`` starts from that preset instead).

Every video writes ``DIR/<name>/`` (the pipeline's run folder) and, when it ends,
``DIR/<name>/status.json``: ``status`` (``done`` or ``failed`` with its ``error``), ``mode``,
``metrics`` (with ``gt``), ``wall_seconds``, ``steps``, ``resumed_from_step``, ``output``.
``DIR/summary.json`` lists every video of the manifest (``pending`` if it has not ended yet) with
the ``rank`` that runs it, and the counts; rank 0 rewrites it after each of its videos and once all
ranks are done. Several nodes must share ``DIR``.

Sharding: video ``i`` of the manifest goes to rank ``i mod world_size``, the same on every
restart. A video whose status is ``done`` is skipped; any other (failed, or killed while running)
is run again and resumes from its run folder's last checkpoint. A failing video is recorded and
the batch goes on; Ctrl-C (or SIGTERM) saves the running video's checkpoint and stops the batch.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field

from fastomni._atomic import write_atomic_text
from fastomni.config import Config, parse_config_text, preset
from fastomni.inputs import InputError

__all__ = ["VideoJob", "read_manifest", "run_batch", "run_video", "write_summary"]

_OWN_KEYS = ("name", "queries", "gt", "preset", "flow_preset", "max_interval", "query_frame")


@dataclass
class VideoJob:
    """One manifest line: the ``video``, its run folder ``name``, optional ``queries`` / ``gt`` paths,
    ``preset``, ``options`` (config overrides, raw strings) and pipeline settings."""

    video: str
    name: str
    line: int
    queries: str | None = None
    gt: str | None = None
    preset: str | None = None
    flow_preset: str | None = None  # None: the preset's (preprocess.default_flow_preset)
    max_interval: int | None = None
    query_frame: int | None = None
    options: dict[str, str] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return "track" if self.queries else "export"

    def config(self, base: Config) -> Config:
        """``base`` (or this video's preset) with this video's option overrides."""
        start = preset(self.preset) if self.preset else base
        text = "".join(f"{k} = {v}\n" for k, v in self.options.items())
        return parse_config_text(text, start, f"manifest line {self.line} ({self.name})")


def read_manifest(path: str) -> list[VideoJob]:
    """The videos of manifest ``path`` (see the module docstring); raises :class:`InputError` naming
    the line of a malformed entry or a repeated name."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    root = os.path.dirname(os.path.abspath(path))
    jobs: list[VideoJob] = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for lineno, raw in enumerate(lines, 1):
        try:
            fields = shlex.split(raw, comments=True)
        except ValueError as exc:
            raise InputError(f"{path} line {lineno}: {exc}") from None
        if not fields:
            continue
        video, kv = fields[0], {}
        for item in fields[1:]:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise InputError(f"{path} line {lineno}: expected key=value after the video, got {item!r}")
            if key in kv:
                raise InputError(f"{path} line {lineno}: {key!r} is given twice")
            kv[key] = value
        resolve = (lambda p: p if os.path.isabs(p) else os.path.join(root, p))
        name = kv.pop("name", None) or os.path.splitext(os.path.basename(os.path.normpath(video)))[0]
        if not name or name in (".", "..") or os.sep in name:
            raise InputError(f"{path} line {lineno}: {name!r} is not a usable run folder name")
        try:
            job = VideoJob(resolve(video), name, lineno,
                           queries=resolve(kv.pop("queries")) if "queries" in kv else None,
                           gt=resolve(kv.pop("gt")) if "gt" in kv else None,
                           preset=kv.pop("preset", None), flow_preset=kv.pop("flow_preset", None),
                           max_interval=int(kv.pop("max_interval")) if "max_interval" in kv else None,
                           query_frame=int(kv.pop("query_frame")) if "query_frame" in kv else None, options=kv)
        except ValueError as exc:
            raise InputError(f"{path} line {lineno}: {exc}") from None
        if job.gt and not job.queries:
            raise InputError(f"{path} line {lineno}: gt= needs queries= (metrics are of tracked query points)")
        jobs.append(job)
    names = [j.name for j in jobs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"{path}: run folder names {repeated} are used twice; give name= to tell them apart")
    if not jobs:
        raise InputError(f"{path} lists no video")
    return jobs


def _status_path(out_dir: str, job: VideoJob) -> str:
    return os.path.join(out_dir, job.name, "status.json")


def read_status(out_dir: str, job: VideoJob) -> dict | None:
    path = _status_path(out_dir, job)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # unreadable: the video is run again


def run_video(job: VideoJob, out_dir: str, base: Config, progress: bool = False) -> dict:
    """Track or export one video into ``out_dir/<name>`` (resuming its run folder); returns its status
    (``done``, or ``failed`` with the error), also written to ``status.json``. Ctrl-C propagates."""
    from fastomni.checkpoint import checkpoint_step, latest_checkpoint

    run_dir = os.path.join(out_dir, job.name)
    latest = latest_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    status = {"name": job.name, "video": job.video, "mode": job.mode,
              "resumed_from_step": checkpoint_step(latest) if latest else 0}
    start = time.perf_counter()
    try:
        cfg = job.config(base)
        work = _track if job.mode == "track" else _export
        status.update(work(job, run_dir, cfg, progress))
        status["status"] = "done"
    except Exception as exc:  # noqa: BLE001 - any failure of one video is recorded; the batch goes on
        status.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc(limit=-3))
    status["wall_seconds"] = round(time.perf_counter() - start, 3)
    os.makedirs(run_dir, exist_ok=True)
    write_atomic_text(_status_path(out_dir, job), json.dumps(status, indent=1) + "\n")
    return status


def _track(job: VideoJob, run_dir: str, cfg: Config, progress: bool) -> dict:
    from fastomni.inputs import load_array
    from fastomni.metrics import evaluate
    from fastomni.pipeline import track_video

    queries = load_array(job.queries, "query file", ".npy")
    out = track_video(job.video, queries, run_dir, cfg, progress=progress, max_interval=job.max_interval,
                      flow_preset=job.flow_preset)
    result = {"output": os.path.relpath(out["path"], os.path.dirname(run_dir)), "steps": _steps(run_dir)}
    if job.gt:
        result["metrics"] = evaluate(out["path"], job.gt)
    return result


def _export(job: VideoJob, run_dir: str, cfg: Config, progress: bool) -> dict:
    from fastomni.optimize import optimize
    from fastomni.pipeline import prepare_sequence
    from fastomni.query import export_dense

    seq_dir, info = prepare_sequence(job.video, run_dir, cfg, progress, job.max_interval, job.flow_preset)
    result = optimize(seq_dir, run_dir, cfg, progress)
    qf = cfg.query_frame_id if job.query_frame is None else job.query_frame
    size = tuple(info["video_size"])
    path = os.path.join(run_dir, f"dense_{qf:05d}.npz")
    export_dense(result.model, qf, path, use_max_loc=cfg.use_max_loc, occlusion_th=cfg.occlusion_th,
                 chunk_size=cfg.chunk_size, scale_to=None if size == (result.model.h, result.model.w) else size,
                 progress=progress)
    return {"output": os.path.relpath(path, os.path.dirname(run_dir)), "steps": result.step}


def _steps(run_dir: str) -> int:
    from fastomni.checkpoint import checkpoint_step, latest_checkpoint

    latest = latest_checkpoint(run_dir)
    return checkpoint_step(latest) if latest else 0


def write_summary(jobs: list[VideoJob], out_dir: str, world_size: int = 1) -> dict:
    """``out_dir/summary.json`` from the videos' status files: per video its status (``pending`` if
    none yet) and the counts. Returns it."""
    videos = []
    for i, job in enumerate(jobs):
        st = read_status(out_dir, job) or {"name": job.name, "video": job.video, "mode": job.mode, "status": "pending"}
        st.pop("traceback", None)
        videos.append({**st, "rank": i % world_size})
    counts = {s: sum(v["status"] == s for v in videos) for s in ("done", "failed", "pending")}
    summary = {"videos": videos, "counts": counts, "world_size": world_size}
    write_atomic_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1) + "\n")
    return summary


def run_batch(manifest: str, out_dir: str, base: Config, comm=None, progress: bool = True) -> dict:
    """Run this rank's share of ``manifest`` into ``out_dir`` (see the module docstring); returns the
    summary (on every rank once all are done). A line per video goes to stderr; ``progress``: each
    video's progress bars too (one process only: ranks would interleave them)."""
    jobs = read_manifest(manifest)
    rank, world = (0, 1) if comm is None else (comm.rank, comm.world_size)
    os.makedirs(out_dir, exist_ok=True)
    mine = [job for i, job in enumerate(jobs) if i % world == rank]
    for job in mine:
        previous = read_status(out_dir, job)
        if previous is not None and previous.get("status") == "done":
            print(f"[rank {rank}] {job.name}: done before, skipped", file=sys.stderr)
            continue
        status = run_video(job, out_dir, base, progress=progress and world == 1)
        print(f"[rank {rank}] {job.name}: {status['status']} ({status['wall_seconds']:.1f} s)"
              + (f": {status['error']}" if status["status"] == "failed" else ""), file=sys.stderr)
        if rank == 0:
            write_summary(jobs, out_dir, world)
    if comm is not None:
        comm.barrier()
    summary = write_summary(jobs, out_dir, world) if rank == 0 else None
    if comm is not None:
        comm.barrier()
        if summary is None:
            with open(os.path.join(out_dir, "summary.json"), encoding="utf-8") as f:
                summary = json.load(f)
    return summary
