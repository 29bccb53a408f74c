"""``fastomni batch``: a manifest of tiny synthetic clips, 2 torchrun ranks (gloo, CPU), a broken clip
recorded while the others complete, and a killed batch resumed with the same command."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fastomni.batch import read_manifest
from fastomni.config import preset
from fastomni.inputs import InputError
from fastomni.query import load_tracks
from fastomni.synthetic import make_video, write_synthetic

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FLAGS = ["--preset", "cpu", "--num_iters", "4", "--num_pairs", "2", "--num_pts", "16", "--num_samples_ray", "4",
         "--i_weight", "2", "--chunk_size", "256", "--quiet"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    for k in range(2):
        video = make_video(num_frames=5, h=24, w=24, num_points=6, seed=k)
        write_synthetic(video, root / f"c{k}", frames=False)
        np.save(root / f"c{k}" / "queries.npy", video.query_points)
    (root / "broken.mp4").write_bytes(b"not a video")
    return root


def _manifest(root, text: str) -> str:
    path = root / "manifest.txt"
    path.write_text(text)
    return str(path)


def _summary(out) -> dict:
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def test_manifest_errors(tmp_path):
    with pytest.raises(InputError, match="line 2: expected key=value"):
        read_manifest(_manifest(tmp_path, "a.mp4\nb.mp4 queries\n"))
    with pytest.raises(InputError, match=r"\['a'\] are used twice"):
        read_manifest(_manifest(tmp_path, "x/a.mp4\ny/a.mp4\n"))
    with pytest.raises(InputError, match="gt= needs queries="):
        read_manifest(_manifest(tmp_path, "a.mp4 gt=g.npz\n"))
    with pytest.raises(InputError, match="no video"):
        read_manifest(_manifest(tmp_path, "# nothing\n\n"))
    jobs = read_manifest(_manifest(tmp_path, "v/a.mp4 name=x preset=fast num_iters=7  # note\nb/ query_frame=2\n"))
    assert [(j.name, j.mode, j.preset, j.options, j.query_frame) for j in jobs] == [
        ("x", "export", "fast", {"num_iters": "7"}, None), ("b", "export", None, {}, 2)]
    assert jobs[0].video == str(tmp_path / "v" / "a.mp4")
    with pytest.raises(ValueError, match="num_iters"):
        read_manifest(_manifest(tmp_path, "a.mp4 num_iters=zero\n"))[0].config(preset("cpu"))


def test_two_ranks_three_clips_one_broken(clips, tmp_path):
    manifest = _manifest(clips, "c0/video.mp4 name=a queries=c0/queries.npy gt=c0/gt.npz\n"
                                "c1/video.mp4 name=b query_frame=1 num_iters=3\n"
                                "broken.mp4 queries=c0/queries.npy\n")
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastomni", "batch", manifest, "--out", out, *FLAGS]
    run = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert run.returncode != 0  # a video failed: rank 0 exits 1, after writing the summary
    summary = _summary(out)
    assert summary["counts"] == {"done": 2, "failed": 1, "pending": 0} and summary["world_size"] == 2
    a, b, broken = summary["videos"]
    assert (a["name"], a["status"], a["mode"], a["rank"], a["steps"]) == ("a", "done", "track", 0, 4)
    assert (b["name"], b["status"], b["mode"], b["rank"], b["steps"]) == ("b", "done", "export", 1, 3)
    assert (broken["status"], broken["rank"]) == ("failed", 0) and "broken.mp4" in broken["error"]
    assert 0 <= a["metrics"]["strided"]["average_jaccard"] <= 1 and a["wall_seconds"] > 0
    assert load_tracks(os.path.join(out, a["output"]))["tracks"].shape == (6, 5, 2)
    assert load_tracks(os.path.join(out, b["output"]))["tracks"].shape == (24 * 24, 5, 2)
    # the same command again: the finished videos are skipped, the failed one is tried again
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert "a: done before, skipped" in again.stderr and "b: done before, skipped" in again.stderr
    assert "broken: failed" in again.stderr
    assert _summary(out)["videos"][:2] == summary["videos"][:2]


def test_killed_batch_resumes_unfinished_videos_from_their_checkpoints(clips, tmp_path):
    manifest = _manifest(clips, "c0/video.mp4 name=a queries=c0/queries.npy\n"
                                "c1/video.mp4 name=b queries=c1/queries.npy num_iters=20 i_weight=2\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fastomni", "batch", manifest, "--out", str(out), *FLAGS]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "b" / "model_000004.pth").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the batch to kill ended or stalled"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    first = _summary(out)
    assert [v["status"] for v in first["videos"]] == ["done", "pending"]
    done_a = (out / "a" / "status.json").read_text()
    killed_at = max(int(p.name[6:12]) for p in (out / "b").glob("model_*.pth"))
    assert 4 <= killed_at < 20
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    assert "a: done before, skipped" in again.stderr
    assert (out / "a" / "status.json").read_text() == done_a
    b = _summary(out)["videos"][1]
    assert (b["status"], b["steps"], b["resumed_from_step"]) == ("done", 20, killed_at)
