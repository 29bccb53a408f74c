"""fastomni.synthetic: the ground truth must describe the rendered frames."""
from __future__ import annotations

import hashlib
import os

import cv2
import numpy as np
import pytest

from fastomni.io import load_video
from fastomni.synthetic import MOTIONS, SyntheticVideo, _build_scene, make_video, write_synthetic

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


def _checksum(v: SyntheticVideo) -> str:
    h = hashlib.sha256()
    for field in ("frames", "points", "occluded", "query_points"):
        h.update(np.ascontiguousarray(getattr(v, field)).tobytes())
    return h.hexdigest()


def test_default_clip_unchanged():
    """The default motion renders what make_video rendered before motions existed (checksums taken
    before the change; numpy 2 and OpenCV 4 of this environment)."""
    v = make_video(num_frames=4, h=32, w=32, seed=0)
    assert _checksum(v) == "e275304ae9d80f291d6bb4558544f3035039302c4808a564170e01a3f4237ba8"
    assert _checksum(make_video(num_frames=4, h=32, w=32, seed=0, motion="objects")) == _checksum(v)
    v = make_video(num_frames=6, h=40, w=48, num_points=20, seed=7, num_objects=2)
    assert _checksum(v) == "726f561a952247955b9b45b238b2221db2f87c0d5099b3c76f549a0a3d94db28"


@pytest.fixture(scope="module", params=[m for m in MOTIONS if m != "objects"])
def motion_video(request):
    return request.param, make_video(num_frames=8, h=48, w=64, num_points=96, seed=5, motion=request.param)


def test_motion_ground_truth_exact(motion_video):
    """Every motion: queries on their tracks, the colour follows the ground truth where visible,
    occlusion flags agree with the image bounds, and the clip differs from the default one."""
    motion, v = motion_video
    n, t = v.points.shape[:2]
    h, w = v.frames.shape[1:3]
    t_q = v.query_points[:, 0].astype(int)
    np.testing.assert_allclose(v.points[np.arange(n), t_q] * [w, h], v.query_points[:, [2, 1]], atol=1e-3)
    assert not v.occluded[np.arange(n), t_q].any()
    px = v.points * [w, h]
    outside = (px[..., 0] < 0) | (px[..., 0] > w - 1) | (px[..., 1] < 0) | (px[..., 1] > h - 1)
    assert v.occluded[outside].all()
    # Colour at the ground truth vs at the query (frames other than the query's, where visible):
    # close, and far closer than at a track displaced by 1 px. (Single errors can be large where a
    # stretched or squeezed texture's detail falls between pixels, so medians are compared.)
    query_colour = np.stack([bilinear(v.frames[tq], q[None, [2, 1]])[0] for tq, q in zip(t_q, v.query_points)])
    errors = {0.0: [], 1.0: []}
    for j in range(t):
        sel = ~v.occluded[:, j] & (t_q != j)
        for shift, err in errors.items():
            xy = px[sel, j] + shift * np.array([0.6, 0.8])
            err.append(np.abs(bilinear(v.frames[j], xy) - query_colour[sel]).mean(axis=1))
    exact, shifted = (np.median(np.concatenate(e)) for e in errors.values())
    assert exact < 2.5 and shifted > 3 * exact, (exact, shifted)
    default = make_video(num_frames=8, h=48, w=64, num_points=96, seed=5)
    assert not np.array_equal(v.frames, default.frames)


def _similarity(src, dst):
    """Least-squares ``dst = s R(angle) src + b``: ``(s, angle, max residual)``."""
    a = np.stack([src[:, 0], -src[:, 1], np.ones(len(src)), np.zeros(len(src))], 1)
    b = np.stack([src[:, 1], src[:, 0], np.zeros(len(src)), np.ones(len(src))], 1)
    coef = np.linalg.lstsq(np.concatenate([a, b]), np.concatenate([dst[:, 0], dst[:, 1]]), rcond=None)[0]
    fit = np.stack([a @ coef, b @ coef], 1)
    return np.hypot(coef[0], coef[1]), np.arctan2(coef[1], coef[0]), np.abs(fit - dst).max()


def _layer_tracks(motion, t_frames=12, h=64, w=64, seed=2):
    layers = _build_scene(np.random.default_rng(seed), motion, t_frames, h, w, 3)
    tracks = []
    for layer in layers:
        th, tw = layer.texture.shape[:2]
        ys, xs = np.mgrid[0:th:4, 0:tw:4]
        uv = np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float64)
        uv = uv[layer.inside(uv)]
        tracks.append(layer.to_screen(uv[:, None], slice(None)))  # [n, T, 2]
    return layers, tracks


@pytest.mark.parametrize("motion", ["pan", "zoom"])
def test_camera_motions_move_the_whole_scene(motion):
    """pan: every layer translates by the same vector (at least a fifth of the frame); zoom: every
    layer scales by the same factor (by at least 25%) about one point; nothing else moves."""
    _, tracks = _layer_tracks(motion)
    src, dst = np.concatenate([tr[:, 0] for tr in tracks]), np.concatenate([tr[:, -1] for tr in tracks])
    scale, angle, residual = _similarity(src, dst)
    assert residual < 1e-6 and abs(angle) < 1e-9
    if motion == "pan":
        shift = dst - src
        assert abs(scale - 1) < 1e-9 and np.ptp(shift, axis=0).max() < 1e-6
        assert np.hypot(*(shift[0] / 64)) > 0.19
    else:
        assert abs(np.log(scale)) > np.log(1.25)


def test_rotation_motion_rolls_camera_and_spins_objects():
    _, tracks = _layer_tracks("rotation")
    _, cam_angle, residual = _similarity(tracks[0][:, 0], tracks[0][:, -1])
    assert residual < 1e-6 and 0.29 < abs(cam_angle) < 0.61
    for obj in tracks[1:]:
        _, angle, residual = _similarity(obj[:, 0], obj[:, -1])
        assert residual < 1e-6 and abs(np.angle(np.exp(1j * (angle - cam_angle)))) > 0.5  # spins on its own


def test_nonrigid_motion_is_smooth_not_affine_and_invertible():
    layers, tracks = _layer_tracks("nonrigid")
    for layer, tr in zip(layers, tracks):
        assert layer.warp is not None
        for t in (3, 11):
            # Not affine: the best affine map from frame 0 leaves pixels of error ...
            a = np.concatenate([tr[:, 0], np.ones((len(tr), 1))], 1)
            fit = a @ np.linalg.lstsq(a, tr[:, t], rcond=None)[0]
            assert np.abs(fit - tr[:, t]).max() > 0.5
            # ... yet the inverse is exact.
            uv = layer.to_texture(tr[:, t], t)
            np.testing.assert_allclose(layer.to_screen(uv, t), tr[:, t], atol=1e-5)
        # Smooth in time: accelerations are a small fraction of the motion.
        accel = np.linalg.norm(tr[:, 2:] - 2 * tr[:, 1:-1] + tr[:, :-2], axis=-1)
        assert accel.max() < 3


def test_mixed_motion_has_everything():
    layers, tracks = _layer_tracks("mixed")
    scale, angle, residual = _similarity(tracks[0][:, 0], tracks[0][:, -1])
    assert layers[0].warp is not None and residual > 0.5  # warped background
    assert scale > 1.1 and abs(angle) > 0.1  # zoom and roll
    v = make_video(num_frames=16, h=64, w=64, num_points=200, seed=2, motion="mixed")
    hidden = v.occluded & np.all((v.points >= 0) & (v.points <= 63 / 64), axis=-1)
    assert hidden.sum() > 30  # objects occlude


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
                                    dict(num_frames=2.5), dict(num_objects=-1), dict(h=True),
                                    dict(motion="shake")])
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
