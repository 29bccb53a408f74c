"""fastomni.viz: trails video and trajectory plot."""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from fastomni.io import load_video
from fastomni.viz import plot_trajectories, point_colors, render_trails

T, H, W = 3, 32, 64  # enlarged 8x to 256 x 512


def one_point():
    """A black video with one point moving right; occluded at the last frame."""
    frames = np.zeros((T, H, W, 3), np.uint8)
    tracks = np.array([[[10.0, 16.0], [30.0, 16.0], [50.0, 16.0]]])
    occluded = np.array([[False, False, True]])
    return frames, tracks, occluded


def big(xy, scale=8):
    x, y = (np.asarray(xy) + 0.5) * scale - 0.5
    return int(round(y)), int(round(x))


def test_render_trails(tmp_path):
    frames, tracks, occluded = one_point()
    out = render_trails(frames, tracks, occluded, tmp_path / "trails.mp4", trail=1)
    assert os.listdir(tmp_path) == ["trails.mp4"]
    video = load_video(out).astype(int)
    assert video.shape == (T, H * 8, W * 8, 3)
    bright = video.sum(axis=-1) > 150
    # Frame 1: a filled dot at the point and its one-step trail back to frame 0's position.
    assert bright[1][big(tracks[0, 1])] and bright[1][big((20.0, 16.0))]
    assert not bright[1][big((50.0, 16.0))]
    # Frame 2: occluded -> hollow (ring lit, centre dark); the step into an occlusion has no trail.
    cy, cx = big(tracks[0, 2])
    assert not bright[2][cy, cx] and bright[2][cy - 5:cy + 6, cx - 5:cx + 6].any()
    assert not bright[2][big((40.0, 16.0))]
    # trail=0 draws no trail at all.
    video0 = load_video(render_trails(frames, tracks, occluded, tmp_path / "t0.mp4", trail=0)).astype(int)
    assert not (video0[1].sum(axis=-1) > 150)[big((20.0, 16.0))]


def test_plot_trajectories(tmp_path):
    frames, tracks, occluded = one_point()
    frames[:] = 90
    out = plot_trajectories(frames, tracks, occluded, tmp_path / "traj.png")
    assert os.listdir(tmp_path) == ["traj.png"]
    img = cv2.imread(out).astype(int)
    assert img.shape == (H * 8, W * 8, 3)
    background = img[5, 5]
    np.testing.assert_array_equal(background, [65, 65, 65])  # the first frame, dimmed
    colored = np.abs(img - background).sum(axis=-1) > 60
    row = big((0.0, 16.0))[0]
    solid = colored[row, big((12.0, 16.0))[1]:big((28.0, 16.0))[1]]
    dotted = colored[row, big((32.0, 16.0))[1]:big((48.0, 16.0))[1]]
    assert solid.all()  # visible step: a solid line
    assert 0.2 < dotted.mean() < 0.9  # a step into an occlusion: dotted
    assert colored[big(tracks[0, 0])]  # the start dot


def test_point_colors_follow_position():
    tracks = np.array([[[5.0, 30.0]] * 2, [[5.0, 1.0]] * 2, [[9.0, 15.0]] * 2])
    occluded = np.zeros((3, 2), bool)
    colors = point_colors(tracks, occluded).astype(int)
    assert colors.shape == (3, 3)
    # turbo: the top point is blue-ish, the bottom one red-ish.
    assert colors[1, 2] > colors[1, 0] and colors[0, 0] > colors[0, 2]


@pytest.mark.parametrize("change, error, match", [
    (dict(tracks=np.zeros((1, 2, 2))), ValueError, "tracks"),
    (dict(occluded=np.zeros((1, T), np.int64)), TypeError, "bool"),
    (dict(occluded=np.zeros((2, T), bool)), ValueError, "occluded"),
    (dict(frames=np.zeros((T, H, W, 3), np.float32)), TypeError, "uint8"),
])
def test_bad_input_writes_nothing(tmp_path, change, error, match):
    frames, tracks, occluded = one_point()
    args = dict(frames=frames, tracks=tracks, occluded=occluded) | change
    with pytest.raises(error, match=match):
        render_trails(args["frames"], args["tracks"], args["occluded"], tmp_path / "t.mp4")
    with pytest.raises(error, match=match):
        plot_trajectories(args["frames"], args["tracks"], args["occluded"], tmp_path / "t.png")
    assert os.listdir(tmp_path) == []


def test_bad_outputs(tmp_path):
    frames, tracks, occluded = one_point()
    with pytest.raises(ValueError, match=r"\.mp4"):
        render_trails(frames, tracks, occluded, tmp_path / "t.gif")
    with pytest.raises(ValueError, match=r"\.png"):
        plot_trajectories(frames, tracks, occluded, tmp_path / "t.jpg")
    with pytest.raises(FileNotFoundError):
        plot_trajectories(frames, tracks, occluded, tmp_path / "missing" / "t.png")
    with pytest.raises(ValueError, match="trail"):
        render_trails(frames, tracks, occluded, tmp_path / "t.mp4", trail=-1)
    assert os.listdir(tmp_path) == []


def test_points_without_estimate_are_not_drawn(tmp_path):
    frames, tracks, occluded = one_point()
    occluded[:] = False
    tracks[0, 1] = np.nan  # no estimate at frame 1
    video = load_video(render_trails(frames, tracks, occluded, tmp_path / "t.mp4", trail=2)).astype(int)
    bright = video.sum(axis=-1) > 150
    assert bright[0][big(tracks[0, 0])] and bright[2][big(tracks[0, 2])]
    assert not bright[1].any()  # neither the point nor a trail at frame 1
    assert not bright[2][big((40.0, 16.0))]  # no trail through the missing frame
    png = cv2.imread(plot_trajectories(frames, tracks, occluded, tmp_path / "t.png"))
    colored = (png.max(-1).astype(int) - png.min(-1)) > 60
    assert colored[big(tracks[0, 0])] and not colored[big((20.0, 16.0))] and not colored[big((40.0, 16.0))]
