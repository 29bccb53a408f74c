"""The ``fastomni`` command: every subcommand end to end on a tiny clip, --help, clear errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastomni.cli import build_parser, evaluate, main
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
    assert set(printed) == {"first", "strided", "temporal_coherence"}
    assert json.loads((tmp_path / "m.json").read_text()) == printed


def test_eval_of_ground_truth_is_perfect(clip, tmp_path):
    root, video = clip
    tracks = video.points * np.array([24, 20])
    save_tracks(str(tmp_path / "gt_tracks.npz"), tracks, video.occluded, video.query_points, image_size=(20, 24))
    m = evaluate(str(tmp_path / "gt_tracks.npz"), str(root / "data" / "gt.npz"))
    for mode in ("first", "strided"):
        assert m[mode]["average_jaccard"] == 1.0 and m[mode]["occlusion_accuracy"] == 1.0
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
