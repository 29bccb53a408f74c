"""fastomni.synthetic: the ground truth must describe the rendered frames."""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from fastomni.io import load_video
from fastomni.synthetic import SyntheticVideo, make_video, write_synthetic

T, H, W, N = 10, 48, 64, 96


@pytest.fixture(scope="module")
def video():
    return make_video(num_frames=T, h=H, w=W, num_points=N, seed=3)


def bilinear(img, xy):
    """Colours ``[M, 3]`` of ``img [H, W, 3]`` at pixel positions ``xy [M, 2]``."""
    pts = xy.astype(np.float32).reshape(-1, 1, 2)
    return cv2.remap(img.astype(np.float32), pts[..., 0], pts[..., 1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE).reshape(-1, 3)


def test_shapes_dtypes_and_ranges(video):
    assert video.frames.shape == (T, H, W, 3) and video.frames.dtype == np.uint8
    assert video.points.shape == (N, T, 2) and video.points.dtype == np.float32
    assert video.occluded.shape == (N, T) and video.occluded.dtype == bool
    assert video.query_points.shape == (N, 3) and video.query_points.dtype == np.float32
    t, y, x = video.query_points.T
    assert np.all(t == np.round(t)) and t.min() >= 0 and t.max() <= T - 1
    assert y.min() >= 0 and y.max() <= H - 1 and x.min() >= 0 and x.max() <= W - 1
    visible = video.points[~video.occluded]
    assert visible.min() >= 0 and visible[:, 0].max() <= (W - 1) / W and visible[:, 1].max() <= (H - 1) / H


def test_deterministic_in_seed(video):
    again = make_video(num_frames=T, h=H, w=W, num_points=N, seed=3)
    for field in ("frames", "points", "occluded", "query_points"):
        np.testing.assert_array_equal(getattr(video, field), getattr(again, field))
    other = make_video(num_frames=T, h=H, w=W, num_points=N, seed=4)
    assert not np.array_equal(video.frames, other.frames)


def test_query_points_lie_on_their_tracks(video):
    t = video.query_points[:, 0].astype(int)
    at_query = video.points[np.arange(N), t] * [W, H]
    np.testing.assert_allclose(at_query, video.query_points[:, [2, 1]], atol=1e-3)
    assert not video.occluded[np.arange(N), t].any()


def test_ground_truth_warps_frames(video):
    """The colour at a visible ground-truth point matches the colour at its query point (up to
    bilinear interpolation of the rendered texture); at occluded points it mostly does not."""
    t_q = video.query_points[:, 0].astype(int)
    query_colour = np.stack([bilinear(video.frames[t], q[None, [2, 1]])[0] for t, q in zip(t_q, video.query_points)])
    vis_err, occ_err = [], []
    for t in range(T):
        err = np.abs(bilinear(video.frames[t], video.points[:, t] * [W, H]) - query_colour).max(axis=1)
        vis_err.append(err[~video.occluded[:, t]])
        occ_err.append(err[video.occluded[:, t]])
    vis_err, occ_err = np.concatenate(vis_err), np.concatenate(occ_err)
    assert np.median(vis_err) < 3 and np.percentile(vis_err, 90) < 15
    assert np.median(occ_err) > 20


def test_motion_and_real_occlusions():
    v = make_video(num_frames=24, h=64, w=64, num_points=200, seed=0)
    px = v.points * [64, 64]
    inside = (px[..., 0] >= 0) & (px[..., 0] <= 63) & (px[..., 1] >= 0) & (px[..., 1] <= 63)
    # Occluded while inside the image: hidden behind another layer, not just out of view.
    hidden = v.occluded & inside
    assert hidden.sum() > 50
    # Some points disappear and reappear (an object passes in front of them).
    reappear = [np.any(np.diff(o.astype(int)) == -1) and np.any(np.diff(o.astype(int)) == 1) for o in v.occluded]
    assert sum(reappear) >= 3
    # Everything moves: camera pan/zoom and object motion.
    travel = np.linalg.norm(px[:, -1] - px[:, 0], axis=-1)
    assert np.median(travel) > 3


def test_write_synthetic(tmp_path, video):
    out = write_synthetic(video, tmp_path / "syn")
    assert sorted(os.listdir(out)) == ["color", "gt.npz", "video.mp4"]
    assert len(os.listdir(os.path.join(out, "color"))) == T
    assert load_video(os.path.join(out, "video.mp4")).shape == (T, H, W, 3)
    gt = np.load(os.path.join(out, "gt.npz"))
    assert sorted(gt.files) == ["occluded", "points", "query_points", "video"]
    np.testing.assert_array_equal(gt["video"], video.frames)
    np.testing.assert_array_equal(gt["points"], video.points)
    np.testing.assert_array_equal(gt["occluded"], video.occluded)
    np.testing.assert_array_equal(gt["query_points"], video.query_points)
    only_gt = write_synthetic(video, tmp_path / "gt_only", frames=False, mp4=False)
    assert os.listdir(only_gt) == ["gt.npz"]


@pytest.mark.parametrize("kwargs", [dict(num_frames=1), dict(h=8), dict(w=15), dict(num_points=0),
                                    dict(num_frames=2.5), dict(num_objects=-1), dict(h=True)])
def test_make_video_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        make_video(**kwargs)


def test_write_synthetic_bad_input_writes_nothing(tmp_path, video):
    bad = SyntheticVideo(video.frames, video.points[:, :-1], video.occluded, video.query_points)
    with pytest.raises(ValueError, match="inconsistent"):
        write_synthetic(bad, tmp_path / "a")
    nan = SyntheticVideo(video.frames, np.full_like(video.points, np.nan), video.occluded, video.query_points)
    with pytest.raises(ValueError, match="NaN"):
        write_synthetic(nan, tmp_path / "b")
    with pytest.raises(TypeError):
        write_synthetic(video.frames, tmp_path / "c")
    assert os.listdir(tmp_path) == []
