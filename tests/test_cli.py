"""The ``fastomni`` command: every subcommand end to end on a tiny clip, --help, clear errors."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from test_sampler import make_sequence

from fastomni.cli import _config, build_parser, default_threads, main
from fastomni.config import preset
from fastomni.demo import PRESET_DEFAULTS
from fastomni.io import write_video
from fastomni.metrics import evaluate
from fastomni.query import load_tracks, save_tracks
from fastomni.synthetic import make_video, write_synthetic

TINY = ["--preset", "cpu", "--num_iters", "2", "--num_pairs", "2", "--num_pts", "8", "--num_samples_ray", "4",
        "--i_weight", "1", "--i_print", "1", "--chunk_size", "256", "--quiet"]
COMMANDS = ("preprocess", "train", "track", "export", "viz", "eval", "synth", "tapvid", "demo")


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: fastomni {command}" in capsys.readouterr().out


def test_python_dash_m_help():
    out = subprocess.run([sys.executable, "-m", "fastomni", "--help"], capture_output=True, text=True, check=True)
    assert all(c in out.stdout for c in COMMANDS)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 5-frame 20x24 synthetic clip written as frames + mp4 + gt.npz, and its query points."""
    root = tmp_path_factory.mktemp("clip")
    video = make_video(num_frames=5, h=20, w=24, num_points=6, seed=1)
    write_synthetic(video, str(root / "data"))
    np.save(root / "q.npy", video.query_points)
    return root, video


@pytest.fixture(scope="module")
def tracked(clip):
    root, _ = clip
    out = root / "run"
    assert main(["track", str(root / "data" / "video.mp4"), "--queries", str(root / "q.npy"), "--out", str(out),
                 "--max_side", "12", *TINY]) == 0
    return out


def test_track_writes_tracks_in_video_pixels(clip, tracked):
    _, video = clip
    got = load_tracks(str(tracked / "tracks.npz"))
    assert got["tracks"].shape == (6, 5, 2) and got["occluded"].shape == (6, 5) and got["occluded"].dtype == bool
    assert tuple(got["image_size"]) == (20, 24)  # the video's size, though the model ran at 10x12
    q = video.query_points
    np.testing.assert_allclose(got["tracks"][np.arange(6), q[:, 0].astype(int)], q[:, [2, 1]], atol=1e-5)
    assert np.isfinite(got["tracks"]).all()
    info = json.loads((tracked / "video.json").read_text())
    assert info["video_size"] == [20, 24] and info["model_size"] == [10, 12]
    assert (tracked / "model_000002.pth").exists() and (tracked / "seq" / "flow_stats.json").exists()


def test_track_again_resumes_without_training(clip, tracked, capsys):
    root, _ = clip
    before = (tracked / "model_000002.pth").stat().st_mtime_ns
    assert main(["track", str(root / "data" / "video.mp4"), "--queries", str(root / "q.npy"), "--out", str(tracked),
                 "--max_side", "12", *TINY]) == 0
    assert (tracked / "model_000002.pth").stat().st_mtime_ns == before


def test_export_viz_eval(clip, tracked, tmp_path, capsys):
    root, _ = clip
    dense = tmp_path / "dense.npz"
    assert main(["export", str(tracked), "--query_frame", "2", "--out", str(dense), "--half", "--quiet"]) == 0
    d = load_tracks(str(dense))
    assert d["tracks"].shape == (10 * 12, 5, 2) and tuple(d["image_size"]) == (20, 24)
    np.testing.assert_array_equal(d["query_points"][:, 0], 2)
    for out in ("trails.mp4", "paths.png"):
        assert main(["viz", str(tracked / "tracks.npz"), "--video", str(root / "data" / "video.mp4"),
                     "--out", str(tmp_path / out), "--quiet"]) == 0
        assert (tmp_path / out).stat().st_size > 0
    assert main(["viz", str(dense), "--video", str(root / "data"), "--out", str(tmp_path / "d.png"),
                 "--max_points", "7"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tracked / "tracks.npz"), "--gt", str(root / "data" / "gt.npz"),
                 "--json", str(tmp_path / "m.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"first", "strided", "temporal_coherence", "no_estimate", "error_budget"}
    assert printed["error_budget"]["strided"]["average_jaccard"] == printed["strided"]["average_jaccard"]
    assert json.loads((tmp_path / "m.json").read_text()) == printed


def test_eval_of_ground_truth_is_perfect(clip, tmp_path):
    root, video = clip
    tracks = video.points * np.array([24, 20])
    save_tracks(str(tmp_path / "gt_tracks.npz"), tracks, video.occluded, video.query_points, image_size=(20, 24))
    m = evaluate(str(tmp_path / "gt_tracks.npz"), str(root / "data" / "gt.npz"))
    for mode in ("first", "strided"):
        assert m[mode]["average_jaccard"] == 1.0 and m[mode]["occlusion_accuracy"] == 1.0
        assert m["error_budget"][mode]["both"] == 1.0 and m["error_budget"][mode]["far_when_visible"] == 0.0
    assert m["temporal_coherence"] < 1e-3


def test_preprocess_train_synth(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "s"), "--num_frames", "4", "--size", "16", "--num_points", "3"]) == 0
    assert (tmp_path / "s" / "gt.npz").exists()
    assert main(["preprocess", str(tmp_path / "s" / "video.mp4"), "--out", str(tmp_path / "seq"), "--max_side", "12",
                 "--quiet"]) == 0
    assert len(os.listdir(tmp_path / "seq" / "raft_exhaustive")) == 12
    assert main(["train", str(tmp_path / "seq"), "--out", str(tmp_path / "run"), *TINY]) == 0
    assert (tmp_path / "run" / "model_000002.pth").exists()
    (tmp_path / "c.txt").write_text(f"data_dir = {tmp_path / 'seq'}\nexpname = e\nsave_dir = {tmp_path / 'out'}\n")
    assert main(["train", "--config", str(tmp_path / "c.txt"), *TINY]) == 0  # the original's way
    assert (tmp_path / "out" / "e_seq" / "model_000002.pth").exists()


def test_demo(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--size", "16", "--num_frames", "4", "--num_points", "6",
                 *TINY]) == 0
    out = capsys.readouterr().out
    assert "omnimotion" in out and "chained_flow" in out and "average_jaccard (strided)" in out
    summary = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert set(summary["metrics"]) == {"omnimotion", "chained_flow"}
    for name in ("trails.mp4", "tracks.npz", "baseline_tracks.npz", "data/gt.npz"):
        assert (tmp_path / "demo" / name).exists()


def test_demo_steps_per_preset_yield_to_flags_and_config_files(tmp_path):
    """The demo's own step count for the fast preset (fastomni.demo.PRESET_DEFAULTS) sits above the
    preset and below a config file and the flags; other presets keep theirs."""
    def steps(*extra):
        return _config(build_parser().parse_args(["demo", "--out", str(tmp_path), "--quiet", *extra]),
                       PRESET_DEFAULTS).num_iters

    assert steps("--preset", "fast") == PRESET_DEFAULTS["fast"]["num_iters"] != preset("fast").num_iters
    assert steps("--preset", "fast", "--num_iters", "7") == 7
    (tmp_path / "c.txt").write_text("num_iters = 5\n")
    assert steps("--preset", "fast", "--config", str(tmp_path / "c.txt")) == 5
    assert steps("--preset", "cpu") == preset("cpu").num_iters


@pytest.mark.parametrize("argv, msg", [
    (["track", "{root}/none.mp4", "--queries", "{root}/q.npy", "--out", "{tmp}/o"], "does not exist"),
    (["track", "{root}/data/video.mp4", "--queries", "{root}/none.npy", "--out", "{tmp}/o"], "query file not found"),
    (["track", "{root}/data/video.mp4", "--queries", "{tmp}/bad_q.npy", "--out", "{tmp}/o"], "shape \\[N, 3\\]"),
    (["track", "{root}/data/video.mp4", "--queries", "{tmp}/late_q.npy", "--out", "{tmp}/o"], "frame index in 0..4"),
    (["train", "{tmp}", "--out", "{tmp}/o", "--num_pts", "0"], "num_pts must be >= 1"),
    (["train", "{tmp}", "--out", "{tmp}/o", "--config", "{tmp}/none.txt"], "config file not found"),
    (["train", "--out", "{tmp}/o"], "no sequence folder"),
    (["train", "{tmp}", "--out", "{tmp}/o"], "no color/"),
    (["export", "{tmp}"], "not a fastomni run folder"),
    (["eval", "{tmp}/none.npz", "--gt", "{root}/data/gt.npz"], "track file not found"),
    (["viz", "{root}/none.npz", "--video", "{root}/data", "--out", "{tmp}/x.gif"], "must end in .mp4"),
    (["--threads", "0", "synth", "--out", "{tmp}/s"], "--threads must be >= 1"),
    (["synth", "--out", "{tmp}/s", "--size", "4"], "h must be an int >= 16"),
])
def test_bad_input_is_one_clear_line(argv, msg, clip, tmp_path, capsys):
    root, _ = clip
    np.save(tmp_path / "bad_q.npy", np.zeros((3, 2)))
    np.save(tmp_path / "late_q.npy", np.array([[7.0, 1, 1]]))
    argv = [a.format(root=root, tmp=tmp_path) for a in argv]
    assert main(argv + ["--quiet"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error:" in err
    assert __import__("re").search(msg, err), err
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()  # nothing written


def test_parser_lists_config_options():
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for key in ("--num_iters", "--use_affine", "--i_weight", "--occlusion_th", "--preset", "--config"):
        assert key in help_text


def test_threads_flag_is_scoped_to_the_command(tmp_path):
    import torch

    before = torch.get_num_threads()
    assert main(["--threads", str(before + 1), "synth", "--out", str(tmp_path / "s"), "--num_frames", "2",
                 "--size", "16", "--num_points", "1"]) == 0
    assert torch.get_num_threads() == before


@pytest.fixture(scope="module")
def bad(clip, tracked):
    """Broken inputs beside the clip and its run (``B``): the table below feeds them to every
    subcommand."""
    root, video = clip
    b = root / "bad"
    b.mkdir()
    write_video(video.frames[:1], str(b / "one.mp4"))
    (b / "notes.txt").write_text("not a video\n")
    (b / "fake.mp4").write_bytes(b"\x00" * 64)
    q = video.query_points
    np.save(b / "q_shape.npy", q[:, :2])
    np.save(b / "q_dtype.npy", q.astype(str))
    np.save(b / "q_empty.npy", np.zeros((0, 3)))
    np.save(b / "q_frame.npy", np.array([[9.0, 1.0, 1.0]]))
    np.save(b / "q_nan.npy", np.array([[0.0, np.nan, 1.0]]))
    np.savez(b / "q_archive.npy", q=q)  # an .npz under an .npy name
    os.rename(b / "q_archive.npy.npz", b / "q_archive.npy")
    shutil.copytree(tracked / "seq", b / "seq_nan")
    flow = b / "seq_nan" / "raft_exhaustive" / "00000.jpg_00001.jpg.npy"
    np.save(flow, np.full_like(np.load(flow), np.nan))
    make_sequence(b / "seq_one", t=2)
    os.remove(b / "seq_one" / "color" / "00001.jpg")
    make_sequence(b / "seq_other", t=5, h=10, w=12)
    for name in ("run_trunc", "run_info", "run_other"):
        shutil.copytree(tracked, b / name, ignore=shutil.ignore_patterns("seq"))
    ckpt = b / "run_trunc" / "model_000002.pth"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    info = json.loads((b / "run_info" / "video.json").read_text())
    del info["video_size"]
    (b / "run_info" / "video.json").write_text(json.dumps(info))
    np.savez(b / "gt_shape.npz", points=np.zeros((2, 5, 2)), occluded=np.zeros((2, 5), bool))
    (b / "junk.pkl").write_bytes(b"not a pickle")
    return root


def _snapshot(folder):
    """{path: (size, mtime, sha1)} of everything under ``folder``."""
    out = {}
    for top, dirs, names in os.walk(folder):
        for n in dirs + names:
            path = os.path.join(top, n)
            st = os.stat(path)
            digest = hashlib.sha1(open(path, "rb").read()).hexdigest() if os.path.isfile(path) else "dir"
            out[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns, digest)
    return out


V, Q, GT, RUN, B = "{r}/data/video.mp4", "{r}/q.npy", "{r}/data/gt.npz", "{r}/run", "{r}/bad"
TRACK = ["track", V, "--queries", Q, "--out", B + "/o"]


@pytest.mark.parametrize("argv, msg", [
    # preprocess
    (["preprocess", "{r}/none.mp4", "--out", B + "/o"], "does not exist"),
    (["preprocess", B + "/one.mp4", "--out", B + "/o"], "1 frame"),
    (["preprocess", B + "/notes.txt", "--out", B + "/o"], "not a video file"),
    (["preprocess", B + "/fake.mp4", "--out", B + "/o"], "cannot open video|no decodable frames"),
    # train
    (["train", B + "/none", "--out", B + "/o"], "no color/"),
    (["train", B + "/seq_one", "--out", B + "/o"], "1 frame"),
    (["train", B + "/seq_nan", "--out", B + "/o"], "00000.jpg_00001.jpg.npy contains NaN"),
    (["train", RUN + "/seq", "--out", B + "/run_trunc"], "model_000002.pth is not a readable torch checkpoint"),
    (["train", B + "/seq_other", "--out", B + "/run_other"], r"run of another clip \(data_dir: "),
    # track
    (["track", "{r}/none.mp4", "--queries", Q, "--out", B + "/o"], "does not exist"),
    (["track", B + "/one.mp4", "--queries", Q, "--out", B + "/o"], "1 frame"),
    (["track", B + "/notes.txt", "--queries", Q, "--out", B + "/o"], "not a video file"),
    (["track", V, "--queries", B + "/none.npy", "--out", B + "/o"], "query file not found"),
    (["track", V, "--queries", B + "/q_shape.npy", "--out", B + "/o"], r"shape \[N, 3\]"),
    (["track", V, "--queries", B + "/q_dtype.npy", "--out", B + "/o"], "must be numbers"),
    (["track", V, "--queries", B + "/q_empty.npy", "--out", B + "/o"], "no query points"),
    (["track", V, "--queries", B + "/q_frame.npy", "--out", B + "/o"], "frame index in 0..4"),
    (["track", V, "--queries", B + "/q_nan.npy", "--out", B + "/o"], "NaN"),
    (["track", V, "--queries", B + "/q_archive.npy", "--out", B + "/o"], "is a NumPy .npz file; expected a NumPy .npy"),
    (["track", V, "--queries", V, "--out", B + "/o"], "is not a NumPy file"),
    # export
    (["export", B + "/none"], "not a fastomni run folder"),
    (["export", B + "/run_trunc", "--out", B + "/o.npz"], "not a readable torch checkpoint"),
    (["export", RUN, "--query_frame", "9", "--out", B + "/o.npz"], "query frame 9 outside 0..4"),
    (["export", B + "/run_info", "--out", B + "/o.npz"], "video.json is missing video_size"),
    # viz
    (["viz", B + "/none.npz", "--video", V, "--out", B + "/o.png"], "track file not found"),
    (["viz", V, "--video", V, "--out", B + "/o.png"], "is not a NumPy file"),
    (["viz", RUN + "/tracks.npz", "--video", "{r}/none.mp4", "--out", B + "/o.png"], "does not exist"),
    (["viz", RUN + "/tracks.npz", "--video", B + "/one.mp4", "--out", B + "/o.png"], "1 frame"),
    (["viz", RUN + "/tracks.npz", "--video", B + "/notes.txt", "--out", B + "/o.png"], "not a video file"),
    # eval
    (["eval", V, "--gt", GT], "track file .*video.mp4 is not a NumPy file; expected a NumPy .npz file"),
    (["eval", RUN + "/tracks.npz", "--gt", B + "/none.npz"], "ground truth not found"),
    (["eval", RUN + "/tracks.npz", "--gt", B + "/gt_shape.npz", "--json", B + "/o.json"], "rows must correspond"),
    (["eval", RUN + "/tracks.npz", "--gt", B + "/junk.pkl"], "is not a NumPy file"),
    # synth, tapvid, demo
    (["synth", "--out", B + "/o", "--size", "4"], "h must be an int >= 16"),
    (["tapvid", B + "/none.pkl", "--video", "x", "--out", B + "/o"], "not found"),
    (["tapvid", B + "/junk.pkl", "--video", "x", "--out", B + "/o"], "not a readable TAP-Vid pickle"),
    (["demo", "--out", B + "/o", "--num_frames", "1"], "num_frames must be >= 3"),
])
def test_bad_input_table(argv, msg, bad, capsys):
    """Every subcommand, fed broken input: one clear line on stderr, exit 1, nothing written or changed."""
    argv = [a.format(r=bad) for a in argv]
    if argv[0] in ("train", "track", "demo"):
        argv += TINY
    before = _snapshot(bad)
    capsys.readouterr()
    assert main(argv + ["--quiet"]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fastomni {argv[0]}: error: "), err
    assert re.search(msg, err), err
    assert _snapshot(bad) == before


def test_internal_errors_show_a_traceback(tmp_path, monkeypatch):
    """A bug (here a KeyError inside fastomni) is not dressed up as bad input."""
    import fastomni.synthetic

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(fastomni.synthetic, "write_synthetic", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["synth", "--out", str(tmp_path / "s"), "--size", "16", "--num_frames", "2", "--num_points", "1"])


def test_threads_default_is_chosen_and_shown(clip, tracked, tmp_path, capsys):
    import torch

    root, _ = clip
    seen = []
    real = torch.set_num_threads
    torch.set_num_threads = lambda n: (seen.append(n), real(n))
    try:
        assert main(["export", str(tracked), "--out", str(tmp_path / "d.npz")]) == 0
    finally:
        torch.set_num_threads = real
    assert seen[0] == default_threads() >= 1
    assert f"{default_threads()} threads" in capsys.readouterr().err  # in the progress bar


def test_eval_and_viz_report_points_without_estimate(clip, tracked, tmp_path, capsys):
    root, _ = clip
    got = load_tracks(str(tracked / "tracks.npz"))
    got["tracks"][0, 1:3] = np.nan  # a diverged point
    path = str(tmp_path / "t.npz")
    with pytest.warns(UserWarning, match="2 of 30 track positions have no estimate"):
        save_tracks(path, got["tracks"], got["occluded"], got["query_points"], image_size=got["image_size"])
    capsys.readouterr()
    assert main(["eval", path, "--gt", str(root / "data" / "gt.npz")]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["no_estimate"] == 2 and "2 track positions have no estimate" in out.err
    assert main(["viz", path, "--video", str(root / "data" / "video.mp4"), "--out", str(tmp_path / "p.png"),
                 "--quiet"]) == 0
    assert "2 of 30 track positions have no estimate (non-finite); not drawn" in capsys.readouterr().err


def test_half_export_of_a_large_video_says_it_stored_float32(clip, tracked, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tracked, run, ignore=shutil.ignore_patterns("seq"))
    info = json.loads((run / "video.json").read_text())
    # The 2-step model moves points by ~0.03 px: scaled 20000x, that is hundreds of pixels.
    info["video_size"] = [10 * 20000, 12 * 20000]
    (run / "video.json").write_text(json.dumps(info))
    assert main(["export", str(run), "--half", "--out", str(tmp_path / "d.npz"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"fastomni export: warning: .*target frames stored float32 instead of float16", err), err
