"""TAP-Vid pickles as inputs: decoding, TAP-Vid's query sampling, the CLI, clear errors."""
import pickle

import cv2
import numpy as np
import pytest

from fastomni.cli import evaluate, main
from fastomni.query import save_tracks
from fastomni.tapvid import QUERY_STRIDE, load_tapvid, sample_queries, tapvid_names

T, H, W = 12, 16, 20


def _entry(seed=0):
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 256, (T, H, W, 3), dtype=np.uint8)
    points = rng.uniform(0.05, 0.95, (4, T, 2)).astype(np.float32)
    occluded = np.zeros((4, T), bool)
    occluded[1, :3] = True     # first visible at frame 3
    occluded[2, 5:] = True     # visible at frame 0 only among the strided frames 0, 5, 10
    occluded[3] = True         # never visible: no query
    return {"video": video, "points": points, "occluded": occluded}


@pytest.fixture
def davis_pkl(tmp_path):
    path = tmp_path / "tapvid_davis.pkl"
    with open(path, "wb") as f:
        pickle.dump({"bear": _entry(0), "car": _entry(1)}, f)
    return str(path)


def test_query_first_is_first_visible_frame(davis_pkl):
    video = load_tapvid(davis_pkl, "bear", "first")
    entry = _entry(0)
    np.testing.assert_array_equal(video.frames, entry["video"])
    assert video.query_points[:, 0].tolist() == [0, 3, 0]  # point 3 is never visible
    np.testing.assert_array_equal(video.points, entry["points"][:3])
    want_xy = entry["points"][[0, 1, 2], [0, 3, 0]] * [W, H]
    np.testing.assert_allclose(video.query_points[:, [2, 1]], want_xy, rtol=1e-6)
    assert not video.occluded[np.arange(3), video.query_points[:, 0].astype(int)].any()


def test_query_strided_every_fifth_visible_frame():
    entry = _entry(0)
    rows, q = sample_queries(entry["points"], entry["occluded"], H, W, "strided")
    starts = range(0, T, QUERY_STRIDE)
    want = [(n, t) for t in starts for n in range(4) if not entry["occluded"][n, t]]  # frame-major
    assert list(zip(rows.tolist(), q[:, 0].astype(int).tolist())) == want


def test_kinetics_style_list_of_jpeg_frames(tmp_path):
    entry = _entry(2)
    smooth = np.stack([cv2.GaussianBlur(f, (7, 7), 3) for f in entry["video"]])  # JPEG-friendly content
    entry["video"] = [cv2.imencode(".jpg", f[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes() for f in smooth]
    path = tmp_path / "kinetics.pkl"
    with open(path, "wb") as f:
        pickle.dump([entry], f)
    assert tapvid_names(str(path)) == ["0"]
    video = load_tapvid(str(path), "0")
    assert video.frames.shape == (T, H, W, 3)
    assert np.abs(video.frames.astype(int) - smooth.astype(int)).mean() < 3  # RGB order, JPEG loss only


def test_cli_extract_then_perfect_tracks_score_one(davis_pkl, tmp_path, capsys):
    assert main(["tapvid", davis_pkl]) == 0
    assert capsys.readouterr().out.split() == ["bear", "car"]
    out = tmp_path / "bear"
    assert main(["tapvid", davis_pkl, "--video", "bear", "--out", str(out), "--query_mode", "strided"]) == 0
    assert "fastomni track" in capsys.readouterr().out
    gt = np.load(out / "gt.npz")
    q = np.load(out / "queries.npy")
    np.testing.assert_array_equal(q, gt["query_points"])
    assert (out / "video.mp4").is_file()
    # the ground truth itself, as a tracks file, scores perfectly: the conventions agree
    save_tracks(str(tmp_path / "tracks.npz"), gt["points"] * [W, H], gt["occluded"], q, image_size=(H, W))
    metrics = evaluate(str(tmp_path / "tracks.npz"), str(out / "gt.npz"), modes=("strided",))
    assert metrics["strided"]["average_jaccard"] == 1.0
    assert metrics["strided"]["occlusion_accuracy"] == 1.0


def test_errors_name_the_problem(davis_pkl, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tapvid(str(tmp_path / "missing.pkl"), "bear")
    with pytest.raises(KeyError, match="bear, car"):
        load_tapvid(davis_pkl, "dog")
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a readable TAP-Vid pickle"):
        load_tapvid(str(tmp_path / "junk.pkl"), "bear")
    bad = _entry(0)
    bad["points"] = bad["points"][:, :5]
    with open(tmp_path / "bad.pkl", "wb") as f:
        pickle.dump({"bad": bad}, f)
    with pytest.raises(ValueError, match=r"must be\s+\[N, 12, 2\]"):
        load_tapvid(str(tmp_path / "bad.pkl"), "bad")
    assert main(["tapvid", davis_pkl, "--video", "bear"]) == 1
    assert "--out is required" in capsys.readouterr().err
    assert not any(tmp_path.glob("bear*"))


def test_list_of_decoded_frames(tmp_path):
    entry = _entry(3)
    frames = entry["video"]
    entry["video"] = list(frames)
    with open(tmp_path / "frames.pkl", "wb") as f:
        pickle.dump({"v": entry}, f)
    np.testing.assert_array_equal(load_tapvid(str(tmp_path / "frames.pkl"), "v").frames, frames)
